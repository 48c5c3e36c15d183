"""The embedded default's pretrained DINOv3 teacher: its labels, a deterministic cached
training run, and `teachers.dinov3.path: embedded` loading it."""

import numpy as np
import torch

from raytrain.config import make_config
from raytrain.teachers import build_dinov3, embedded
from raytrain.teachers.dinov3 import describe
from raytrain.teachers.embedded import ensure_teacher, labels, scene_labels


def test_scene_labels_name_what_is_in_the_scene():
    index = {n: i for i, n in enumerate(labels())}
    scene = {
        "background": "grey",
        "objects": [
            {"shape": "circle", "color": "red", "size": "large", "texture": "striped", "x": 0.2, "y": 0.9},
            {"shape": "square", "color": "blue", "size": "small", "texture": "solid", "x": 0.5, "y": 0.5},
        ],
    }
    got = {n for n, i in index.items() if scene_labels(scene, index)[i]}
    assert got == {
        "grey background",
        "2 objects",
        "red circle",
        "red",
        "circle",
        "striped",
        "large",
        "large circle",
        "striped circle",
        "red at 2,0",
        "blue square",
        "blue",
        "square",
        "solid",
        "small",
        "small square",
        "solid square",
        "blue at 1,1",
    }


def test_trained_once_deterministic_and_loaded_by_config(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "DATA", {**embedded.DATA, "n_train": 256})  # a smaller private dataset
    a = ensure_teacher(steps=8, root=tmp_path / "a")
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_teacher(steps=8, root=tmp_path / "a") == a and (a / "model.safetensors").stat().st_mtime_ns == stamp
    b = ensure_teacher(steps=8, root=tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()  # same recipe, same weights
    assert not list(a.parent.glob(f".{a.name}.*[!k]"))  # no temp directory left behind (only the lock file)

    monkeypatch.setenv("RAYTRAIN_HOME", str(tmp_path / "a"))
    monkeypatch.setattr(embedded, "STEPS", 8)
    cfg = make_config({}, ["teachers.dinov3.path=embedded"]).teachers.dinov3
    teacher, random = build_dinov3(cfg), build_dinov3(make_config({}).teachers.dinov3)
    assert teacher.fingerprint() != random.fingerprint()
    assert describe(cfg) == describe(make_config({}).teachers.dinov3)  # shapes known without training
    out = teacher(torch.randn(2, 3, 32, 32))
    assert out.cls.shape == (2, 64) and out.multiscale.shape == (2, 4, 16, 64)
    assert np.isfinite(out.multiscale.numpy()).all()
