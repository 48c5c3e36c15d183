"""Embedded default dataset: procedurally generated scenes of coloured shapes.

Each scene is 1-3 objects on a plain background. An object has a colour (7), a shape
(6), a size (small / large), a texture (solid / striped / dotted) and a position; the
image is drawn at 4x resolution and box-downsampled (antialiasing), with jitter in
position, radius, colours and mild Gaussian pixel noise, so no two images are identical.

Every scene has captions at three granularities, coarse -> fine:
  short   "red circle and blue square"                       (ALIP's synthetic caption)
  medium  "a large striped red circle and a small solid blue square"
  full    "a large striped red circle left of a small solid blue square on a grey background"
In the full caption the relation words chain consecutive objects ("A left of B above C"
means A is left of B and B is above C); the relation is the dominant axis of the centre
offset, and placement rejects near-diagonal offsets so the word is unambiguous.

Held out of train / retrieval / zeroshot / binding entirely: HELDOUT_COMBOS (8 of the 42
colour-shape combinations, ~19%, every colour and shape still seen in training) and the
background HELDOUT_BACKGROUNDS. They appear only in the OOD split.

Splits (all eval splits have n_eval rows):
  train/part-*.parquet  in-distribution scenes, shards of at most 1024 rows
  eval/retrieval        in-distribution scenes, same columns as train
  eval/zeroshot         one object; `label` indexes classes.json "classes" ("colour shape")
  eval/binding          two objects; `negative` = the full caption with one attribute type
                        (colour, shape, size or texture) swapped between the objects, or the
                        objects swapped around the relation ("B left of A"); same bag of
                        words as `caption`, never equal to it. Swaps that would name a
                        held-out combination are not used, so the text stays in-distribution.
  eval/ood              two objects: the first is a held-out combination (its label
                        indexes "ood_classes"; the second is an in-distribution combination
                        sharing neither colour nor shape, so exactly one OOD class is in the
                        image); half the scenes use the held-out background. Has train's
                        columns plus `negative` (as binding, any swap) and `label`.
  eval/segmentation     in-distribution scenes (as retrieval) with `mask`: a PNG of class
                        indices per pixel into segmentation.json "classes" (0 = background,
                        k = CLASSES[k - 1], the zero-shot split's "colour shape" classes)

Everything is drawn from numpy.random.default_rng([seed, split]) and written with fixed
PNG/parquet settings, so the same params give byte-identical files. Each split has its own
stream, so adding a split (segmentation came with SCHEMA_VERSION 2) leaves the others' bytes
as they were.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain.data.sources import atomic_dir

# 2: eval/segmentation.parquet + segmentation.json added (every other file as in 1). The
# version is part of ensure_dataset's directory hash, so a cache written before is not reused.
SCHEMA_VERSION = 2
SHARD_ROWS = 1024
SUPERSAMPLE = 4  # draw at 4x then box-average: cheap antialiasing
NOISE_STD = 3.0  # pixel noise (0-255 scale)

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 60, 190),
    "orange": (245, 140, 20),
    "pink": (245, 135, 195),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.13, "large": 0.21}  # radius as a fraction of the image side
TEXTURES = ("solid", "striped", "dotted")
# Background names are never colour names, so "on a red background" cannot blur the colour words.
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "beige": (215, 200, 160),
    "brown": (105, 75, 50),
    "teal": (30, 120, 120),
}
HELDOUT_BACKGROUNDS = ("teal",)
HELDOUT_COMBOS = (  # one per colour (+1), every shape at least once
    ("red", "star"),
    ("green", "diamond"),
    ("blue", "triangle"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("orange", "square"),
    ("pink", "diamond"),
    ("green", "cross"),
)
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_COMBOS]
# Segmentation masks: background is a class of its own, the objects are the zero-shot classes
# (a patch must get colour and shape right together, as the captions name them).
SEGMENTATION_CLASSES = ["background", *CLASSES]
IGNORE_INDEX = 255  # the mask value of unlabelled pixels (the embedded masks have none)
OOD_CLASSES = [f"{c} {s}" for c, s in HELDOUT_COMBOS]
TRAIN_BACKGROUNDS = [b for b in BACKGROUNDS if b not in HELDOUT_BACKGROUNDS]
TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a photo of the {}.",
    "a {} on a background.",
    "a picture of one {}.",
]
RELATIONS = ("left of", "right of", "above", "below")

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Tokenisation used for the vocabulary: lower-case alphabetic runs."""
    return _WORD.findall(text.lower())


# The full vocabulary of the grammar (independent of seed and size, so token ids are stable).
VOCABULARY = sorted(
    {
        w
        for t in [*COLORS, *SHAPES, *SIZES, *TEXTURES, *BACKGROUNDS, *RELATIONS, *TEMPLATES, "a and on background"]
        for w in words(t)
    }
)

_OBJECT = pa.struct(
    [
        ("shape", pa.string()),
        ("color", pa.string()),
        ("size", pa.string()),
        ("texture", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
    ]
)
_SCENE = [
    ("id", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("caption_short", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("attributes", pa.struct([("background", pa.string()), ("objects", pa.list_(_OBJECT))])),
]
SCHEMAS = {
    "train": pa.schema(_SCENE),
    "retrieval": pa.schema(_SCENE),
    "zeroshot": pa.schema(
        [("id", pa.string()), ("image", pa.binary()), ("label", pa.int32()), ("caption", pa.string())]
    ),
    "binding": pa.schema(
        [("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("negative", pa.string())]
    ),
    "ood": pa.schema(_SCENE + [("negative", pa.string()), ("label", pa.int32())]),
    "segmentation": pa.schema([("id", pa.string()), ("image", pa.binary()), ("mask", pa.binary())]),
}
_SPLIT_SEED = {"train": 0, "retrieval": 1, "zeroshot": 2, "binding": 3, "ood": 4, "segmentation": 5}


# ---------------------------------------------------------------- scenes and captions
def _place(rng, objects):
    """Give objects positions (x, y in [0, 1], y down) and radii: inside the image, barely
    overlapping, and consecutive pairs clearly offset along one axis (for the relation word)."""
    for _ in range(10_000):
        r = [SIZES[o["size"]] * rng.uniform(0.9, 1.1) for o in objects]
        xy = [rng.uniform(ri, 1 - ri, size=2) for ri in r]
        ok = all(np.hypot(*(xy[i] - xy[j])) >= 0.95 * (r[i] + r[j]) for i in range(len(r)) for j in range(i))
        for i in range(1, len(r)):
            dx, dy = np.abs(xy[i] - xy[i - 1])
            ok = ok and max(dx, dy) >= 1.5 * min(dx, dy)
        if ok:
            for o, ri, (x, y) in zip(objects, r, xy):
                o.update(x=float(x), y=float(y), r=float(ri))
            return objects
    raise RuntimeError("could not place objects")  # not reached in practice (a few tries suffice)


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def _scene(rng, combos, backgrounds):
    """A placed scene with one object per (colour, shape) in `combos`, random size/texture."""
    objects = [dict(color=c, shape=s, size=_pick(rng, list(SIZES)), texture=_pick(rng, TEXTURES)) for c, s in combos]
    return {"background": _pick(rng, backgrounds), "objects": _place(rng, objects)}


def _relation(a, b):
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _describe(o):
    return f"a {o['size']} {o['texture']} {o['color']} {o['shape']}"


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _full(objects, background, relations=None):
    relations = relations or [_relation(a, b) for a, b in zip(objects, objects[1:])]
    text = _describe(objects[0])
    for rel, o in zip(relations, objects[1:]):
        text += f" {rel} {_describe(o)}"
    return f"{text} on a {background} background"


def _captions(scene):
    objs = scene["objects"]
    return [
        _join([f"{o['color']} {o['shape']}" for o in objs]),
        _join([_describe(o) for o in objs]),
        _full(objs, scene["background"]),
    ]


def _negative(rng, scene, allowed=None):
    """Hard negative for a two-object scene: same words, different binding."""
    a, b = scene["objects"]
    kinds = [k for k in ("color", "shape", "size", "texture") if a[k] != b[k]]
    # Swapping colours or shapes yields the same two new combos; skip both if one is held out.
    if allowed is not None and not {(a["color"], b["shape"]), (b["color"], a["shape"])} <= allowed:
        kinds = [k for k in kinds if k not in ("color", "shape")]
    kinds.append("relation")  # always valid: objects differ, so "B rel A" != "A rel B"
    kind = kinds[rng.integers(len(kinds))]
    if kind == "relation":
        neg = _full([b, a], scene["background"], [_relation(a, b)])
    else:
        neg = _full([{**a, kind: b[kind]}, {**b, kind: a[kind]}], scene["background"], [_relation(a, b)])
    assert neg != _full([a, b], scene["background"])
    return neg


# ---------------------------------------------------------------- rendering
def _shape_mask(shape, u, v):
    """Inside-test in object-local coordinates (units of the radius, v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0  # tips touch the bounding box
    if shape == "triangle":  # apex up
        return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if shape == "star":  # 5 spikes: radius modulated by |cos(2.5 theta)|, theta from "up"
        theta = np.arctan2(u, -v)
        return np.hypot(u, v) <= 0.42 + 0.58 * np.abs(np.cos(2.5 * theta)) ** 3
    raise ValueError(shape)


def _jitter(rng, rgb, amount):
    return np.clip(np.rint(np.asarray(rgb) + rng.uniform(-amount, amount, 3)), 0, 255).astype(np.uint8)


def _footprint(o, size):
    """Where object `o` lies on the supersampled canvas: (box, dx, dy, inside) with `box` the
    slices of its bounding box (only that is touched: keeps drawing cheap), dx [1, w] and
    dy [h, 1] the box pixels' offsets from the centre in output-pixel units, and `inside`
    [h, w] the shape's inside-test."""
    w = size * SUPERSAMPLE
    cx, cy, r = o["x"] * size, o["y"] * size, o["r"] * size
    x0, x1 = max(0, int((cx - r) * SUPERSAMPLE)), min(w, int(np.ceil((cx + r) * SUPERSAMPLE)))
    y0, y1 = max(0, int((cy - r) * SUPERSAMPLE)), min(w, int(np.ceil((cy + r) * SUPERSAMPLE)))
    dx = (np.arange(x0, x1) + 0.5)[None, :] / SUPERSAMPLE - cx
    dy = (np.arange(y0, y1) + 0.5)[:, None] / SUPERSAMPLE - cy
    return (slice(y0, y1), slice(x0, x1)), dx, dy, _shape_mask(o["shape"], dx / r, dy / r)


def _label_map(scene, size):
    """The class index of every output pixel (SEGMENTATION_CLASSES), as PNG bytes (mode L).

    Objects are painted in drawing order on the supersampled canvas (a later object covers an
    earlier one, textures included), and each output pixel takes the class that covers most of
    its SUPERSAMPLE² block (ties: the lower index): the majority vote of the antialiased image's
    own coverage."""
    w = size * SUPERSAMPLE
    canvas = np.zeros((w, w), np.uint8)
    for o in scene["objects"]:
        box, _, _, inside = _footprint(o, size)
        canvas[box][inside] = SEGMENTATION_CLASSES.index(f"{o['color']} {o['shape']}")
    blocks = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).transpose(0, 2, 1, 3).reshape(size, size, -1)
    present = np.unique(canvas)  # sorted: argmax's first maximum is the lower index
    votes = np.stack([(blocks == c).sum(-1) for c in present], -1)
    buf = io.BytesIO()
    Image.fromarray(present[votes.argmax(-1)], "L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _render(rng, scene, size):
    w = size * SUPERSAMPLE
    canvas = np.empty((w, w, 3), np.uint8)
    canvas[:] = _jitter(rng, BACKGROUNDS[scene["background"]], 10)
    period = max(4.0, size / 8)  # texture period in output pixels: stays visible after downsampling
    for o in scene["objects"]:
        colour = _jitter(rng, COLORS[o["color"]], 15)
        box, dx, dy, mask = _footprint(o, size)
        if o["texture"] == "striped":  # diagonal stripes of a darker shade
            dark = np.floor((dx + dy) / (period / 2)) % 2 == 1
        elif o["texture"] == "dotted":
            dark = ((dx % period - period / 2) ** 2 + (dy % period - period / 2) ** 2) <= (0.3 * period) ** 2
        else:
            dark = np.zeros_like(mask)
        region = canvas[box]
        region[mask & ~dark] = colour
        region[mask & dark] = colour // 5 * 2  # darker shade of the same hue
    # Box-filter downsample (PIL's reduce is C-speed), then mild noise.
    img = np.asarray(Image.fromarray(canvas, "RGB").reduce(SUPERSAMPLE), np.float32)
    img = img + rng.normal(0.0, NOISE_STD, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB").save(
        buf, format="PNG", compress_level=6
    )  # fixed settings: byte-identical output
    return buf.getvalue()


# ---------------------------------------------------------------- splits
def _attributes(scene):
    return {
        "background": scene["background"],
        "objects": [{k: o[k] for k in ("shape", "color", "size", "texture", "x", "y")} for o in scene["objects"]],
    }


def _scene_row(rng, split, i, scene, size):
    short, medium, full = _captions(scene)
    return {
        "id": f"{split}-{i:07d}",
        "image": _render(rng, scene, size),
        "caption": full,
        "caption_short": short,
        "captions": [short, medium, full],
        "attributes": _attributes(scene),
    }


def _distinct_pair(rng, first_pool, second_pool):
    """Two combos that share neither colour nor shape (so colour and shape swaps are real)."""
    while True:
        a = first_pool[rng.integers(len(first_pool))]
        b = second_pool[rng.integers(len(second_pool))]
        if a[0] != b[0] and a[1] != b[1]:
            return [a, b]


def _rows(split, n, seed, size):
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    combos = [tuple(c.split()) for c in CLASSES]
    for i in range(n):
        if split in ("train", "retrieval", "segmentation"):
            k = int(rng.integers(1, 4))
            picked = [combos[j] for j in rng.choice(len(combos), size=k, replace=False)]
            scene = _scene(rng, picked, TRAIN_BACKGROUNDS)
            if split == "segmentation":
                yield {"id": f"{split}-{i:07d}", "image": _render(rng, scene, size), "mask": _label_map(scene, size)}
            else:
                yield _scene_row(rng, split, i, scene, size)
        elif split == "zeroshot":
            label = int(rng.integers(len(CLASSES)))
            scene = _scene(rng, [combos[label]], TRAIN_BACKGROUNDS)
            yield {
                "id": f"{split}-{i:07d}",
                "image": _render(rng, scene, size),
                "label": label,
                "caption": _full(scene["objects"], scene["background"]),
            }
        elif split == "binding":
            scene = _scene(rng, _distinct_pair(rng, combos, combos), TRAIN_BACKGROUNDS)
            yield {
                "id": f"{split}-{i:07d}",
                "image": _render(rng, scene, size),
                "caption": _full(scene["objects"], scene["background"]),
                "negative": _negative(rng, scene, allowed=set(combos)),
            }
        else:  # ood: a held-out combo first; held-out background half the time
            pair = _distinct_pair(rng, list(HELDOUT_COMBOS), combos)
            bgs = list(HELDOUT_BACKGROUNDS) if rng.random() < 0.5 else TRAIN_BACKGROUNDS
            scene = _scene(rng, pair, bgs)
            row = _scene_row(rng, split, i, scene, size)
            row["negative"] = _negative(rng, scene)
            row["label"] = OOD_CLASSES.index(" ".join(pair[0]))
            yield row


def _write(rows, split, path):
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[split])
    # No pandas metadata, no timestamps: the file is a pure function of the rows.
    pq.write_table(table, path, compression="snappy", row_group_size=SHARD_ROWS)
    texts = [
        t
        for col in ("caption", "caption_short", "negative")
        if col in table.column_names
        for t in table.column(col).to_pylist()
    ]
    unknown = {w for t in texts for w in words(t)} - set(VOCABULARY)
    assert not unknown, f"caption words missing from VOCABULARY: {sorted(unknown)}"


def _build(out, params):
    """Write every file of the dataset under `out`; manifest.json last."""
    n_train, n_eval, seed, size = (params[k] for k in ("n_train", "n_eval", "seed", "image_size"))
    (out / "train").mkdir(parents=True)
    (out / "eval").mkdir()
    rows, per_shard = _rows("train", n_train, seed, size), params.get("shard_rows", SHARD_ROWS)
    n_shards = -(-n_train // per_shard)
    for s in range(n_shards):
        shard = [next(rows) for _ in range(min(per_shard, n_train - s * per_shard))]
        _write(shard, "train", out / "train" / f"part-{s:05d}.parquet")
    for split in ("retrieval", "zeroshot", "binding", "ood", "segmentation"):
        _write(list(_rows(split, n_eval, seed, size)), split, out / "eval" / f"{split}.parquet")
    (out / "eval" / "classes.json").write_text(
        json.dumps({"classes": CLASSES, "templates": TEMPLATES, "ood_classes": OOD_CLASSES}, indent=2) + "\n"
    )
    (out / "eval" / "segmentation.json").write_text(
        json.dumps({"classes": SEGMENTATION_CLASSES, "templates": TEMPLATES, "ignore_index": IGNORE_INDEX}, indent=2)
        + "\n"
    )
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            files[p.relative_to(out).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "params": params,
        "counts": {
            "train": n_train,
            "train_shards": n_shards,
            "retrieval": n_eval,
            "zeroshot": n_eval,
            "binding": n_eval,
            "ood": n_eval,
            "segmentation": n_eval,
        },
        "vocabulary": VOCABULARY,
        "files": files,  # sizes and hashes: lets caches fingerprint the exact data
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ---------------------------------------------------------------- public API
def _params(n_train, n_eval, seed, image_size):
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_eval", n_eval, 1),
        ("seed", seed, 0),
        ("image_size", image_size, 16),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return {"n_train": int(n_train), "n_eval": int(n_eval), "seed": int(seed), "image_size": int(image_size)}


def _existing(out, params):
    """The manifest of a complete dataset at `out`, or None; ValueError if its params differ."""
    path = out / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    have = {**manifest.get("params", {}), "schema_version": manifest.get("schema_version")}
    want = {**params, "schema_version": SCHEMA_VERSION}
    keys = [*want, *(k for k in have if k not in want)]  # shard_rows is written only when not the default
    diff = [f"{k}={have.get(k)!r} (requested {want.get(k)!r})" for k in keys if have.get(k) != want.get(k)]
    if diff:
        raise ValueError(f"{out} holds a synthetic dataset with different params: {', '.join(diff)}")
    return manifest


def make_dataset(
    out_dir, n_train: int, n_eval: int, seed: int = 0, image_size: int = 32, shard_rows: int = SHARD_ROWS
) -> dict:
    """Write the dataset under out_dir; returns the manifest dict. Reuses an existing complete one with the
    same params. `shard_rows`: training rows per file (the same rows, cut into more or fewer files)."""
    params = _params(n_train, n_eval, seed, image_size)
    if shard_rows != SHARD_ROWS:
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        params["shard_rows"] = shard_rows
    out = Path(out_dir)
    manifest = _existing(out, params)
    if manifest is not None:
        return manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a synthetic dataset (no manifest.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above): atomic_dir renames the built dataset into its place
    try:
        with atomic_dir(out) as tmp:  # readers never see a partial dataset
            return _build(tmp, params)
    except OSError:  # another process won the race: use theirs if it is complete
        theirs = _existing(out, params)
        if theirs is None:
            raise
        return theirs


def ensure_dataset(root, n_train, n_eval, seed=0, image_size=32) -> Path:
    """Generated on first use under root/f"synth-{short hash of params}", reused afterwards; returns the directory."""
    params = _params(n_train, n_eval, seed, image_size)
    key = json.dumps({**params, "schema_version": SCHEMA_VERSION}, sort_keys=True)
    out = Path(root) / f"synth-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    make_dataset(out, **params)
    return out
