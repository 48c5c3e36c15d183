"""Methods by name: each is a small file composing registered parts (timm-style registry)."""

from __future__ import annotations

from collections.abc import Callable

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        cls.name = name
        return cls

    return add


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type:
    """The class registered as `name` (for what a method declares, e.g. DCLIP's preceding_stage)."""
    return _METHODS[name]


def build_method(cfg, vocab_size: int, pad_id: int = 0):
    """The configured method (an nn.Module whose forward returns (loss, logs))."""
    return _METHODS[cfg.method](cfg, vocab_size, pad_id)


from raytrain.methods import alip, clip, cyclip, dclip, dinorankclip, freeze_align, rankclip, tipsv2  # noqa: E402,F401  (registers them)
