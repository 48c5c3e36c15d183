"""Checkpoints: a directory with the method's weights and the config that built it, written
atomically (temp dir, then rename) and loaded with weights_only=True."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

WEIGHTS, CONFIG = "model.pt", "config.json"


def save(directory: str | Path, state: dict, cfg, extra: dict | None = None) -> Path:
    """Write state + config under `directory` (created; must not exist yet) atomically."""
    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({"config": cfg.model_dump(mode="json"), **(extra or {})}, indent=2))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load(directory: str | Path) -> tuple[dict, dict]:
    """(state, metadata with "config") from a checkpoint directory."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG).read_text())
    return torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True), meta
