"""Dotted keys over nested config sections, generic over any pydantic model: `a.b=1` overrides
parsed as YAML values, set into a nested tree with every key checked against the model (the
error names the dotted key and suggests the closest one), and YAML files read as such trees."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


class ConfigError(ValueError):
    """A config that cannot run; the message names the dotted key."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=[1,2]"] → {"a.b": 1, "c": [1, 2]} (values parsed as YAML)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def set_dotted(tree: dict, key: str, value: Any, model: type[BaseModel]) -> None:
    parts = key.split(".")
    node, cls = tree, model
    for i, part in enumerate(parts):
        fields = cls.model_fields if cls is not None else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            hint = difflib.get_close_matches(part, list(fields), n=1)
            raise ConfigError(
                f"unknown config key {key!r}: no {part!r} in {where}"
                + (f" (did you mean {'.'.join(parts[:i] + hint)!r}?)" if hint else "")
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        ann = fields[part].annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")


def check_keys(tree: dict, model: type[BaseModel], prefix: str, root: type[BaseModel]) -> None:
    """Reject unknown keys in a nested YAML tree with the full dotted path."""
    for key, value in tree.items():
        set_dotted({}, prefix + key, None, root)
        ann = model.model_fields[key].annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            check_keys(value, ann, prefix + key + ".", root)


def read_tree(path: str | Path, what: str) -> dict:
    """A YAML file's top-level mapping of config keys (a config file, or a profile fragment)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{what} {path} must hold a mapping of config keys at the top level (e.g. train: {{epochs: 8}})"
        )
    return tree


def reference(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every value under `model`, depth first; a
    section's own docstring is its row with an empty type."""
    rows = []
    for name, field in model.model_fields.items():
        key, ann = prefix + name, field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.append((key, "", "", field.description or " ".join((ann.__doc__ or "").split())))
            rows += reference(ann, key + ".")
            continue
        kind = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        kind = kind or str(ann).replace("typing.", "")
        default = "required" if field.is_required() else repr(field.default)
        limits = [_limit(m) for m in field.metadata]
        rows.append((key, kind, default, "; ".join(filter(None, [field.description or "", *limits]))))
    return rows


def _limit(meta) -> str:
    """A field's constraint as a reader writes it: `ge 0`, `pattern ^[a-z]+$`."""
    if dataclasses.is_dataclass(meta):
        return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(meta).items())
    return (
        ", ".join(f"{k} {v}" for k, v in vars(meta).items() if v is not None)
        if hasattr(meta, "__dict__")
        else str(meta)
    )
