"""Tests for the embedded synthetic dataset (raytrain.data.synthetic)."""

import io
import json
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.data import synthetic
from raytrain.data.synthetic import ensure_dataset, make_dataset, words

N_TRAIN, N_EVAL = 1100, 40  # 1100 > 1024: two train shards

OBJECT = pa.struct(
    [
        ("shape", pa.string()),
        ("color", pa.string()),
        ("size", pa.string()),
        ("texture", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
    ]
)
SCENE = [
    ("id", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("caption_short", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("attributes", pa.struct([("background", pa.string()), ("objects", pa.list_(OBJECT))])),
]
EXPECTED = {
    "train/part-00000.parquet": SCENE,
    "train/part-00001.parquet": SCENE,
    "eval/retrieval.parquet": SCENE,
    "eval/zeroshot.parquet": [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int32()),
        ("caption", pa.string()),
    ],
    "eval/binding.parquet": [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("negative", pa.string()),
    ],
    "eval/ood.parquet": SCENE + [("negative", pa.string()), ("label", pa.int32())],
    "eval/segmentation.parquet": [("id", pa.string()), ("image", pa.binary()), ("mask", pa.binary())],
}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    manifest = make_dataset(out, N_TRAIN, N_EVAL, seed=3, image_size=32)
    return out, manifest


def rows(out, rel):
    return pq.read_table(out / rel).to_pylist()


def train_rows(out):
    return [r for p in sorted((out / "train").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_layout_schemas_and_counts(ds):
    out, manifest = ds
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "binding.parquet",
        "classes.json",
        "ood.parquet",
        "retrieval.parquet",
        "segmentation.json",
        "segmentation.parquet",
        "zeroshot.parquet",
    ]
    for rel, fields in EXPECTED.items():
        schema = pq.read_schema(out / rel)
        assert [(f.name, f.type) for f in schema] == fields, rel
        assert schema.metadata is None or b"pandas" not in schema.metadata
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["params"] == {"n_train": N_TRAIN, "n_eval": N_EVAL, "seed": 3, "image_size": 32}
    assert manifest["counts"] == {
        "train": N_TRAIN,
        "train_shards": 2,
        "retrieval": N_EVAL,
        "zeroshot": N_EVAL,
        "binding": N_EVAL,
        "ood": N_EVAL,
        "segmentation": N_EVAL,
    }
    assert [pq.read_metadata(out / f"train/part-0000{i}.parquet").num_rows for i in (0, 1)] == [1024, 76]
    train = train_rows(out)
    assert [r["id"] for r in train] == [f"train-{i:07d}" for i in range(N_TRAIN)]
    for split in ("retrieval", "zeroshot", "binding", "ood", "segmentation"):
        assert [r["id"] for r in rows(out, f"eval/{split}.parquet")] == [f"{split}-{i:07d}" for i in range(N_EVAL)]
    assert not list(out.parent.glob("*.tmp-*"))  # temp build dir cleaned up


def test_images_decode(ds):
    out, _ = ds
    for rel in EXPECTED:
        for r in rows(out, rel)[:20]:
            im = Image.open(io.BytesIO(r["image"]))
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    # jitter and noise: no two images identical
    images = [r["image"] for r in train_rows(out)]
    assert len(set(images)) == len(images)


def test_captions_match_attributes(ds):
    out, _ = ds
    train = train_rows(out)
    assert {len(r["attributes"]["objects"]) for r in train} == {1, 2, 3}
    for r in train:
        objs, bg = r["attributes"]["objects"], r["attributes"]["background"]
        assert r["captions"] == [r["caption_short"], r["captions"][1], r["caption"]]
        tags = [f"{o['color']} {o['shape']}" for o in objs]
        assert r["caption_short"] == (tags[0] if len(tags) == 1 else ", ".join(tags[:-1]) + " and " + tags[-1])
        for o in objs:
            assert f"a {o['size']} {o['texture']} {o['color']} {o['shape']}" in r["caption"]
            assert f"{o['color']} {o['shape']}" in r["caption_short"]
            assert 0 <= o["x"] <= 1 and 0 <= o["y"] <= 1
        assert r["caption"].endswith(f" on a {bg} background")
        assert bg not in r["captions"][1] and "left" not in r["captions"][1]
        if len(objs) == 2:  # relation word agrees with the geometry (y points down)
            a, b = objs
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            rel = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
            assert f" {rel} a " in r["caption"]


def test_zeroshot_labels(ds):
    out, _ = ds
    classes = json.loads((out / "eval/classes.json").read_text())
    for r in rows(out, "eval/zeroshot.parquet"):
        assert 0 <= r["label"] < len(classes["classes"])
        assert f" {classes['classes'][r['label']]} on a " in r["caption"]


def test_classes_json(ds):
    out, _ = ds
    classes = json.loads((out / "eval/classes.json").read_text())
    assert 6 <= len(classes["templates"]) <= 10 and "a photo of a {}." in classes["templates"]
    assert all("{}" in t for t in classes["templates"])
    assert not set(classes["classes"]) & set(classes["ood_classes"])
    n_combos = len(classes["classes"]) + len(classes["ood_classes"])
    assert 0.15 <= len(classes["ood_classes"]) / n_combos <= 0.25


def test_binding_negatives(ds):
    out, _ = ds
    ood_classes = set(json.loads((out / "eval/classes.json").read_text())["ood_classes"])
    for r in rows(out, "eval/binding.parquet") + rows(out, "eval/ood.parquet"):
        assert r["negative"] != r["caption"]
        assert Counter(words(r["negative"])) == Counter(words(r["caption"]))
    for r in rows(out, "eval/binding.parquet"):  # in-distribution text on both sides
        ws = words(r["negative"]) + words(r["caption"])
        assert not {f"{a} {b}" for a, b in zip(ws, ws[1:])} & ood_classes


def test_ood_is_held_out(ds):
    out, _ = ds
    classes = json.loads((out / "eval/classes.json").read_text())
    held = set(classes["ood_classes"])
    seen_bgs = set()
    for split in ("train", "eval/retrieval.parquet"):
        for r in train_rows(out) if split == "train" else rows(out, split):
            seen_bgs.add(r["attributes"]["background"])
            assert not {f"{o['color']} {o['shape']}" for o in r["attributes"]["objects"]} & held
    for r in rows(out, "eval/zeroshot.parquet"):
        assert classes["classes"][r["label"]] not in held
    ood = rows(out, "eval/ood.parquet")
    ood_bgs = {r["attributes"]["background"] for r in ood}
    assert ood_bgs - seen_bgs  # some OOD scenes use a background never seen in training
    for r in ood:
        first = r["attributes"]["objects"][0]
        assert classes["ood_classes"][r["label"]] == f"{first['color']} {first['shape']}"
        # exactly one held-out combination per OOD image, so the label is unambiguous
        assert sum(f"{o['color']} {o['shape']}" in held for o in r["attributes"]["objects"]) == 1


def test_vocabulary_covers_all_text(ds):
    out, manifest = ds
    vocab = manifest["vocabulary"]
    assert vocab == sorted(set(vocab))
    classes = json.loads((out / "eval/classes.json").read_text())
    texts = [*classes["classes"], *classes["ood_classes"], *classes["templates"]]
    for rel in EXPECTED:
        for r in rows(out, rel):
            texts += [r.get("caption", ""), r.get("caption_short", ""), r.get("negative", "")]
            texts += r.get("captions") or []
    assert {w for t in texts for w in words(t)} <= set(vocab)


def test_segmentation_masks(ds):
    """Masks are single-channel class indices into segmentation.json's classes (background 0,
    then the zero-shot classes), the image's size; scenes of 1-3 objects, no held-out class."""
    out, _ = ds
    meta = json.loads((out / "eval/segmentation.json").read_text())
    classes = json.loads((out / "eval/classes.json").read_text())
    assert meta["classes"] == ["background", *classes["classes"]] and meta["ignore_index"] == 255
    assert meta["templates"] == classes["templates"]
    counts = Counter()
    for r in rows(out, "eval/segmentation.parquet"):
        mask = Image.open(io.BytesIO(r["mask"]))
        assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (32, 32))
        labels = set(np.unique(np.asarray(mask)).tolist())
        assert 0 in labels and 2 <= len(labels) <= 4 and max(labels) < len(meta["classes"])
        counts[len(labels) - 1] += 1
    assert set(counts) == {1, 2, 3}


def test_label_map_by_hand():
    """A solid red square of radius r = 0.25 at the centre of a 16 px image: its inside-test
    max(|u|, |v|) <= 0.82 spans 8 ± 3.28 px = [4.72, 11.28]; pixels 4 and 11 are covered by
    1 of 4 supersamples per axis (the minority), so the class fills rows and columns 5..10.
    A blue circle drawn later covers the square where they overlap."""
    square = dict(color="red", shape="square", size="large", texture="solid", x=0.5, y=0.5, r=0.25)
    red = synthetic.SEGMENTATION_CLASSES.index("red square")
    got = np.asarray(Image.open(io.BytesIO(synthetic._label_map({"objects": [square]}, 16))))
    want = np.zeros((16, 16), np.uint8)
    want[5:11, 5:11] = red
    assert np.array_equal(got, want)
    circle = dict(color="blue", shape="circle", size="small", texture="striped", x=0.75, y=0.5, r=0.1)
    got = np.asarray(Image.open(io.BytesIO(synthetic._label_map({"objects": [square, circle]}, 16))))
    blue = synthetic.SEGMENTATION_CLASSES.index("blue circle")
    # the circle (12 ± 1.6 px) covers pixels 11 and 12 of row 8 whole, 7 of pixel 10's 16
    # supersamples (the square the other 9): 10 stays red
    assert got[8, 11] == got[8, 12] == blue and got[8, 10] == red


def test_version_1_files_keep_their_bytes(tmp_path):
    """Adding the segmentation split (its own random stream) left every file of schema
    version 1 byte-identical: these hashes were written by the code before it."""
    files = make_dataset(tmp_path / "ds", 20, 8, seed=0)["files"]
    assert {k: v["sha256"][:16] for k, v in files.items() if "segmentation" not in k} == {
        "eval/binding.parquet": "59172d2a77a6a2d6",
        "eval/classes.json": "c46ccf4cb3196144",
        "eval/ood.parquet": "e2be84e17cabc73b",
        "eval/retrieval.parquet": "141ccdd115c5535e",
        "eval/zeroshot.parquet": "72d0cdec967b99fe",
        "train/part-00000.parquet": "0a56b542a28293c9",
    }


def test_deterministic_by_seed(tmp_path):
    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_dataset(tmp_path / name, 30, 10, seed=seed)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    for rel in a:
        if rel.endswith(".parquet"):
            assert a[rel] != c[rel], rel


def test_reuse_and_param_mismatch(tmp_path):
    out = tmp_path / "ds"
    first = make_dataset(out, 20, 8, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert make_dataset(out, 20, 8, seed=0) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(ValueError, match="n_eval") as err:
        make_dataset(out, 20, 9, seed=0)
    assert "n_train" not in str(err.value)
    with pytest.raises(ValueError, match="seed"):
        make_dataset(out, 20, 8, seed=5)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_dataset(tmp_path / "junk", 20, 8)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_train=0, n_eval=5), "n_train"),
        (dict(n_train=5, n_eval=-1), "n_eval"),
        (dict(n_train=5, n_eval=5, image_size=8), "image_size"),
        (dict(n_train=5, n_eval=5, seed=-1), "seed"),
        (dict(n_train=2.5, n_eval=5), "n_train"),
    ],
)
def test_argument_validation(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_other_image_size(tmp_path):
    make_dataset(tmp_path / "ds", 4, 4, image_size=48)
    r = rows(tmp_path / "ds", "eval/binding.parquet")[0]
    assert Image.open(io.BytesIO(r["image"])).size == (48, 48)


def test_ensure_dataset(tmp_path, monkeypatch):
    d1 = ensure_dataset(tmp_path, 20, 8, seed=0)
    d2 = ensure_dataset(tmp_path, 20, 8, seed=0)
    assert d1 == d2 and d1.parent == tmp_path and d1.name.startswith("synth-")
    assert (d1 / "manifest.json").is_file()
    assert ensure_dataset(tmp_path, 20, 8, seed=1) != d1
    # a directory written by an older schema (no segmentation split) is not reused: the
    # version is part of the directory's hash
    monkeypatch.setattr(synthetic, "SCHEMA_VERSION", 1)
    assert ensure_dataset(tmp_path, 20, 8, seed=0) != d1


def test_lost_race_uses_winner(tmp_path, monkeypatch):
    """If another process renames its copy into place first, our os.replace fails and
    we return theirs (same params) and clean up our temp dir."""
    out = tmp_path / "ds"
    real_build = synthetic._build

    def build_while_other_wins(tmp, params):
        monkeypatch.setattr(synthetic, "_build", real_build)
        make_dataset(out, **params)  # the "other process" completes first
        return real_build(tmp, params)

    monkeypatch.setattr(synthetic, "_build", build_while_other_wins)
    manifest = make_dataset(out, 20, 8)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["n_train"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_concurrent_calls(tmp_path):
    out, results, errors = tmp_path / "ds", [], []

    def worker():
        try:
            results.append(make_dataset(out, 20, 8, seed=4))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(r == results[0] for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_shard_rows_cuts_the_same_rows_into_more_files(tmp_path):
    import pyarrow.parquet as pq

    whole = make_dataset(tmp_path / "one", 20, 8, seed=0)
    cut = make_dataset(tmp_path / "cut", 20, 8, seed=0, shard_rows=8)
    assert (whole["counts"]["train_shards"], cut["counts"]["train_shards"]) == (1, 3)
    assert cut["params"]["shard_rows"] == 8 and "shard_rows" not in whole["params"]
    read = lambda d: pq.read_table(sorted((tmp_path / d / "train").glob("*.parquet"))).to_pylist()  # noqa: E731
    assert [len(pq.read_table(p)) for p in sorted((tmp_path / "cut/train").glob("*"))] == [8, 8, 4]
    assert read("cut") == read("one")
    with pytest.raises(ValueError, match="shard_rows"):
        make_dataset(tmp_path / "cut", 20, 8, seed=0)  # reused only with the same cut
    with pytest.raises(ValueError, match="shard_rows must be"):
        make_dataset(tmp_path / "bad", 20, 8, shard_rows=0)
