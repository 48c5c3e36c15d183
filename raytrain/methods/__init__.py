"""Methods by name (a timm-style registry), discovered from this package.

Each module declares its methods with `@register_method(name)`, and a method class declares
everything the rest of the system needs of it (raytrain.methods.base.Method): its own config
section, its consistency checks, the teacher outputs it reads from the cache and any run that
must come first. Adding a method is adding one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        owner = next((m for m in _METHODS.values() if cls.section and m.section == cls.section), None)
        if owner is not None and owner.settings is not cls.settings:
            raise ValueError(f"method {name!r}: section {cls.section!r} is {owner.name!r}'s, with other settings")
        _METHODS[name] = cls
        cls.name = name
        return cls

    return add


def discover() -> None:
    """Import every module of this package (each registers its methods). Called on import; call
    again after adding a directory to `__path__` (plug-in methods, tests)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type:
    """The class registered as `name` (what it declares: section, checks, needs, preceding stage)."""
    return _METHODS[name]


def sections() -> dict[str, type]:
    """Config section name → its settings model, over every registered method that has one."""
    return {cls.section: cls.settings for cls in _METHODS.values() if cls.section}


def build_method(cfg, vocab_size: int, pad_id: int = 0):
    """The configured method (an nn.Module whose forward returns (loss, logs))."""
    return _METHODS[cfg.method](cfg, vocab_size, pad_id)


discover()
