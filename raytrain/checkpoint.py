"""Checkpoints: a directory with the method's weights and the config that built it, written
atomically (temp dir, then rename) and read with weights_only=True, from local disk or S3."""

from __future__ import annotations

import io
import json
import posixpath
import random
from pathlib import Path

import numpy as np
import torch

from raytrain.data.sources import atomic_dir, read_bytes, resolve

WEIGHTS, CONFIG = "model.pt", "config.json"


def save(directory: str | Path, state: dict, cfg, extra: dict | None = None) -> Path:
    """Write state + config under `directory` (created; must not exist yet) atomically."""
    with atomic_dir(directory) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **(extra or {})}, indent=2))
    return Path(directory)


def load(path: str | Path, s3=None) -> tuple[dict, dict]:
    """(state, metadata with "config") of a checkpoint directory, local or s3:// (`s3`: data.s3)."""
    fs, base = resolve(str(path), s3)
    try:
        meta = json.loads(read_bytes(fs, posixpath.join(base, CONFIG)))
        raw = read_bytes(fs, posixpath.join(base, WEIGHTS))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is not a raytrain checkpoint directory (it needs {CONFIG} and {WEIGHTS})"
        ) from None
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True), meta


def get_rng_state() -> dict:
    """Python, numpy and torch RNG states in types that torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
