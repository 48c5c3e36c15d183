"""The embedded default's pretrained DINOv3 teacher (`teachers.dinov3.path: embedded`).

A random-weight teacher knows nothing, so on the embedded default no method that distils
or injects it, or ranks by it, can beat one that ignores it. The paper's teacher is a
DINOv3 pretrained on far more data than the student sees; this stands in for it: a
DINOv3 ViT of the configured size trained, once per machine, to recognise the embedded
scenes' attributes (which colour-shape objects are present, their size, texture,
position and the background) on a dataset of its own (another seed than any training
set), then saved with `save_pretrained` and loaded like a user's checkpoint. Training is
seeded and deterministic on one CPU thread; the result is cached under
`$RAYTRAIN_HOME` (default ~/.cache/raytrain), keyed by a hash of the recipe.

    path = ensure_teacher(size="tiny", image_size=32)   # ~1-2 min the first time on 2 cores
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from raytrain.data.sources import atomic_dir
from raytrain.data.synthetic import BACKGROUNDS, COLORS, SHAPES, SIZES, TEXTURES, ensure_dataset
from raytrain.data.transforms import decode_image, normalize
from raytrain.teachers.dinov3 import IMAGENET_MEAN, IMAGENET_STD, random_model

RECIPE_VERSION = 1
# The teacher's own data: never a training set's seed (the default data.seed is 0).
DATA = {"n_train": 8192, "n_eval": 16, "seed": 1009}
STEPS, BATCH, LR, WARMUP = 4000, 128, 2e-3, 200
GRID = 3  # object centres bucketed into a 3x3 grid of positions


def home() -> Path:
    return Path(os.environ.get("RAYTRAIN_HOME", "~/.cache/raytrain")).expanduser()


def labels() -> list[str]:
    """The multi-hot label set: what a teacher that understands these scenes must see."""
    combos = [f"{c} {s}" for c in COLORS for s in SHAPES]
    out = combos + list(COLORS) + list(SHAPES) + list(TEXTURES) + list(SIZES)
    out += [f"{z} {s}" for z in SIZES for s in SHAPES] + [f"{t} {s}" for t in TEXTURES for s in SHAPES]
    out += [f"{c} at {i},{j}" for c in COLORS for i in range(GRID) for j in range(GRID)]
    out += [f"{b} background" for b in BACKGROUNDS] + [f"{n} objects" for n in (1, 2, 3)]
    return out


def scene_labels(attributes: dict, index: dict[str, int]) -> np.ndarray:
    y = np.zeros(len(index), np.float32)
    objects = attributes["objects"]
    names = [f"{attributes['background']} background", f"{len(objects)} objects"]
    for o in objects:
        i, j = (min(GRID - 1, int(v * GRID)) for v in (o["y"], o["x"]))
        names += [
            f"{o['color']} {o['shape']}",
            o["color"],
            o["shape"],
            o["texture"],
            o["size"],
            f"{o['size']} {o['shape']}",
            f"{o['texture']} {o['shape']}",
            f"{o['color']} at {i},{j}",
        ]
    y[[index[n] for n in names if n in index]] = 1
    return y


def recipe(size: str, image_size: int, steps: int | None = None) -> dict:
    return {
        "size": size,
        "image_size": image_size,
        "steps": steps or STEPS,
        "batch": BATCH,
        "lr": LR,
        "data": DATA,
        "labels": len(labels()),
        "version": RECIPE_VERSION,
    }


def ensure_teacher(
    size: str = "tiny", image_size: int = 32, steps: int | None = None, root: Path | None = None
) -> Path:
    """The trained teacher's directory (trained and saved the first time; a file lock keeps
    concurrent processes from training it twice)."""
    spec = recipe(size, image_size, steps)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root is not None else home()
    out = root / "teachers" / f"dinov3-{size}-embedded-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            _train(spec, root, out)
    return out


def _train(spec: dict, root: Path, out: Path) -> None:
    data = ensure_dataset(
        root, spec["data"]["n_train"], spec["data"]["n_eval"], spec["data"]["seed"], spec["image_size"]
    )
    table = pq.read_table(sorted((data / "train").glob("*.parquet")), columns=["image", "attributes"]).to_pydict()
    index = {n: i for i, n in enumerate(labels())}
    images = np.stack([decode_image(b, spec["image_size"]) for b in table["image"]])
    x_all = torch.from_numpy(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
    y_all = torch.from_numpy(np.stack([scene_labels(a, index) for a in table["attributes"]]))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights on every machine with the same torch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec["data"]["seed"])
            model = random_model(spec["size"], spec["image_size"])
            dim = model.config.hidden_size
            # two heads, so the CLS token and the pooled patch tokens both learn the scene
            heads = torch.nn.ModuleList([torch.nn.Linear(dim, len(index)) for _ in range(2)])
            params = [*model.parameters(), *heads.parameters()]
            opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.05)
            steps = spec["steps"]
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
            )
            first = 1 + model.config.num_register_tokens
            model.train()
            bar = tqdm(range(steps), desc="raytrain: pretraining the embedded DINOv3 teacher", mininterval=5)
            for _ in bar:
                idx = torch.randint(len(x_all), (spec["batch"],))
                h = model(x_all[idx]).last_hidden_state
                logits = heads[0](h[:, 0]), heads[1](h[:, first:].mean(1))
                loss = sum(F.binary_cross_entropy_with_logits(z, y_all[idx]) for z in logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            model.eval()
    finally:
        torch.set_num_threads(threads)
    with atomic_dir(out) as tmp:  # whole or absent: a reader never sees a half-saved teacher
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})
        )
        (tmp / "raytrain_recipe.json").write_text(json.dumps({**spec, "final_loss": loss.item()}, indent=1))
