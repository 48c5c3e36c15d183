"""Standard evaluation datasets and `raytrain eval`: readers of the real on-disk formats
(Karpathy caption JSON + images, class folders, CIFAR python pickles) on tiny fixtures
written in those formats, the CLIP template ensembles, clip_benchmark's result layout,
hand-computed metrics, a checkpoint (frozen teacher included) and an export scored through
the CLI, Ray-parallel tasks, and the errors bad input gets."""

import json
import math
import pickle
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raytrain import checkpoint
from raytrain.cli import main
from raytrain.config import ConfigError, EvalTaskConfig, make_config
from raytrain.data.pipeline import prepare
from raytrain.eval import templates
from raytrain.eval.datasets import DatasetError, cifar, image_folder, karpathy
from raytrain.eval.run import Encoders, _pixels, load_model, run_eval, run_task
from raytrain.eval.zeroshot import SINGLE
from raytrain.methods import build_method

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TOP = ["dataset", "model", "pretrained", "task", "metrics", "language"]  # clip_benchmark's dump
RETRIEVAL_KEYS = [f"{d}_retrieval_recall@{k}" for k in (1, 5, 10) for d in ("image", "text")]
ZEROSHOT_KEYS = ["acc1", "acc5", "mean_per_class_recall"]
TINY = [
    "model.image.width=16",
    "model.image.heads=2",
    "model.image.patch=8",
    "model.text.width=16",
    "model.text.heads=2",
    "model.embed_dim=8",
    "data.image_size=16",
    "data.context_length=8",
    "data.n_train=16",
    "data.n_eval=16",
]


def save_image(path: Path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def write_karpathy(root: Path, name="dataset_flickr30k.json", images=None):
    """Flickr30k-style (no filepath) unless entries say otherwise; 5 sentences per image."""
    images = images or [
        {
            "filename": "r.png",
            "split": "test",
            "sentences": [{"raw": f"c{a}", "tokens": []} for a in (80, 70, 60, 50, 10)],
        },
        {"filename": "skip.jpg", "split": "train", "sentences": [{"raw": "not read"}]},
        {"filename": "g.jpg", "split": "test", "sentences": [{"raw": f"c{a}"} for a in (75, 65, 55, 40, 30)]},
    ]
    save_image(root / "r.png", COLOURS["red"])
    save_image(root / "g.jpg", COLOURS["green"])
    (root / name).write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def colour_images(items):
    """[n, 3]: an image's mean colour (what these fixtures vary)."""
    return torch.tensor(
        np.stack([np.asarray(i.convert("RGB"), np.float32).reshape(-1, 3).mean(0) / 255 for i in items])
    )


def angle_texts(texts):
    """Caption "c<degrees>" -> the unit vector at that angle from red (x) towards green (y)."""
    a = np.radians([float(t[1:]) for t in texts])
    return torch.tensor(np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], 1), dtype=torch.float32)


def colour_texts(texts):
    """A prompt embeds as the colour word it contains."""
    return torch.tensor([next(c for w, c in COLOURS.items() if w in t) for t in texts], dtype=torch.float32)


def write_folders(root: Path):
    """blue/1 blue; green/1 green + 1 blue (mislabelled); red/2 red; plus things to ignore."""
    save_image(root / "blue" / "b1.png", COLOURS["blue"])
    save_image(root / "green" / "g1.png", COLOURS["green"])
    save_image(root / "green" / "g2.JPEG", COLOURS["blue"])
    save_image(root / "red" / "r1.png", COLOURS["red"])
    save_image(root / "red" / "r2.jpeg", COLOURS["red"])
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


def write_cifar(root: Path, which: str, n=6):
    """The real layout: Python-2-style pickles with bytes keys, data uint8 [n, 3072] =
    red plane, green plane, blue plane, each 32x32 row-major."""
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    data = np.concatenate([images[..., c].reshape(n, 1024) for c in range(3)], axis=1)
    labels = [i % 3 for i in range(n)]
    if which == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        batch = {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": labels,
            b"data": data,
            b"filenames": [b"img_%d.png" % i for i in range(n)],
        }
        files = {
            "test_batch": batch,
            "batches.meta": {
                b"num_cases_per_batch": n,
                b"num_vis": 3072,
                b"label_names": [b"airplane", b"automobile", b"bird"],
            },
        }
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        batch = {
            b"filenames": [b"img_%d.png" % i for i in range(n)],
            b"batch_label": b"testing batch 1 of 1",
            b"fine_labels": labels,
            b"coarse_labels": [0] * n,
            b"data": data,
        }
        files = {
            "test": batch,
            "meta": {
                b"fine_label_names": [b"apple", b"aquarium_fish", b"maple_tree"],
                b"coarse_label_names": [b"fruit_and_vegetables"],
            },
        }
    for name, obj in files.items():
        if which == "cifar10":  # as the files on the CIFAR site: Python 2 pickles
            with open(d / name, "wb") as f:
                Py2Pickler(f, protocol=2).dump(obj)
        else:  # as a Python 3 tool re-saves them
            (d / name).write_bytes(pickle.dumps(obj, protocol=5))
    return d, data, labels


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (SHORT_BINSTRING / BINSTRING opcodes), which is
    what the CIFAR files hold and what pickle.load(encoding="bytes") turns into bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


# --- templates -------------------------------------------------------------------------


def test_standard_template_ensembles():
    assert len(templates.IMAGENET) == len(set(templates.IMAGENET)) == 80
    assert len(templates.CIFAR) == len(set(templates.CIFAR)) == 18
    assert all(t.count("{}") == 1 for t in templates.IMAGENET + templates.CIFAR)
    assert templates.IMAGENET[0] == "a bad photo of a {}." and templates.IMAGENET[-1] == "a tattoo of the {}."
    assert templates.CIFAR[0] == "a photo of a {}." and templates.CIFAR[-1] == "a photo of the big {}."
    assert SINGLE[0].format("cat") == "This is a photo of a cat"


# --- readers ---------------------------------------------------------------------------


def test_karpathy_test_split(tmp_path):
    coco = [
        {
            "filepath": "val2014",
            "filename": "a.png",
            "split": "test",
            "sentences": [{"raw": f" cap {i} "} for i in range(5)],
        },
        {"filepath": "val2014", "filename": "b.png", "split": "restval", "sentences": [{"raw": "x"}]},
        {
            "filepath": "val2014",
            "filename": "c.png",
            "split": "test",
            "sentences": [{"raw": f"c{i}"} for i in range(6)],
        },
    ]
    save_image(tmp_path / "val2014" / "a.png", COLOURS["red"])
    save_image(tmp_path / "val2014" / "c.png", COLOURS["blue"])
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": coco}))
    data = karpathy(tmp_path)  # finds dataset_coco.json in the root
    assert data.captions[:5] == [f"cap {i}" for i in range(5)] and len(data.captions) == 11
    assert data.owner == [0] * 5 + [1] * 6
    assert len(data.images) == 2 and [p.name for p in data.images.paths] == ["a.png", "c.png"]
    first, second = data.images[0:2]
    assert (
        first.mode == "RGB" and first.getpixel((0, 0)) == COLOURS["red"] and second.getpixel((3, 3)) == COLOURS["blue"]
    )


def test_multi_caption_retrieval_by_hand(tmp_path):
    """Image 0 (red, x axis) and image 1 (green, y axis) with five captions each, caption
    "c<θ>" at angle θ. Caption queries (image retrieval @1) pick red iff θ < 45: image 0's
    10 and image 1's 75, 65, 55 are right → 4/10. Image queries (text retrieval): red's
    best caption is 10 (its own) → found at 1; green's best is 80 (red's), its own 75 is
    second → found at 2: R@1 = 1/2, R@5 = 1. Only any-caption counting finds image 0 at 1
    (its first caption, 80, ranks 10th of 10 for it)."""
    task = EvalTaskConfig(name="hand", kind="retrieval", format="karpathy", path=str(write_karpathy(tmp_path)))
    result = run_task(Encoders("fake", "fixture", colour_images, angle_texts), task)
    assert list(result) == TOP and list(result["metrics"]) == RETRIEVAL_KEYS
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "hand" and result["language"] == "en"
    assert result["metrics"] == pytest.approx(
        {
            "image_retrieval_recall@1": 0.4,
            "text_retrieval_recall@1": 0.5,
            "image_retrieval_recall@5": 1.0,
            "text_retrieval_recall@5": 1.0,
            "image_retrieval_recall@10": 1.0,
            "text_retrieval_recall@10": 1.0,
        }
    )


@pytest.mark.parametrize(
    "names, file",
    [
        (None, None),
        ({"blue": "Blue", "green": "Green", "red": "Red", "extra": "x"}, "names.json"),
        (["Blue", "Green", "Red"], "names.json"),
        ("Blue\nGreen\n\nRed\n", "names.txt"),
        ("red Red\nblue Blue\ngreen Green\n", "LOC_synset_mapping.txt"),
    ],
)
def test_image_folder_class_names(tmp_path, names, file):
    root = write_folders(tmp_path / "val")
    if file:
        (tmp_path / file).write_text(names if isinstance(names, str) else json.dumps(names))
    data = image_folder(root, tmp_path / file if file else None)
    assert data.classes == (["blue", "green", "red"] if names is None else ["Blue", "Green", "Red"])
    assert data.labels == [0, 1, 1, 2, 2] and len(data.images) == 5 and data.templates == templates.IMAGENET


def test_zeroshot_metrics_and_template_choice(tmp_path):
    """Predictions blue, green, blue, red, red for labels blue, green, green, red, red:
    acc1 = 4/5, per-class recall blue 1, green 1/2, red 1 → mean 5/6; acc5 is None with 3
    classes (clip_benchmark); the ensemble encodes 80 prompts per class, single one."""
    root = str(write_folders(tmp_path / "val"))
    prompts = []

    def spy(texts):
        prompts.extend(texts)
        return colour_texts(texts)

    for choice, per_class in (("ensemble", 80), ("single", 1)):
        prompts.clear()
        task = EvalTaskConfig(
            name="folders", kind="zeroshot", format="imagefolder", path=root, templates=choice, batch_size=2
        )
        result = run_task(Encoders("fake", "fixture", colour_images, spy), task)
        assert list(result) == TOP and list(result["metrics"]) == ZEROSHOT_KEYS
        assert result["task"] == "zeroshot_classification"
        assert result["metrics"] == pytest.approx({"acc1": 0.8, "acc5": None, "mean_per_class_recall": 5 / 6})
        assert len(prompts) == 3 * per_class
    assert prompts == ["This is a photo of a blue", "This is a photo of a green", "This is a photo of a red"]


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, which):
    d, data, labels = write_cifar(tmp_path, which)
    for root in (tmp_path, d):  # the extracted directory or its parent
        ds = cifar(root, which)
        assert ds.labels == labels and ds.templates == templates.CIFAR
        assert ds.classes == (
            ["airplane", "automobile", "bird"] if which == "cifar10" else ["apple", "aquarium fish", "maple tree"]
        )
        img = np.asarray(ds.images[4])
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        for y, x, c in ((0, 0, 0), (0, 31, 1), (5, 7, 2), (31, 2, 0)):
            assert img[y, x, c] == data[4, c * 1024 + y * 32 + x]
        assert [np.asarray(i).tolist() for i in ds.images[3:5]] == [np.asarray(ds.images[3]).tolist(), img.tolist()]


# --- bad input -------------------------------------------------------------------------


def test_bad_karpathy_input_names_file_and_entry(tmp_path):
    root = write_karpathy(tmp_path)
    ann = root / "dataset_flickr30k.json"
    with pytest.raises(DatasetError, match=r"missing\.json: Karpathy caption file does not exist"):
        karpathy(root, root / "missing.json")
    ann.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"dataset_flickr30k\.json: not valid JSON"):
        karpathy(root)
    ann.write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"not a Karpathy caption file"):
        karpathy(root)
    cases = [
        ({"filename": "r.png", "split": "test"}, r"images\[0\] \(r\.png\): no 'sentences'"),
        (
            {"filename": "r.png", "split": "test", "sentences": [{"raw": "a"}, {"tokens": []}]},
            r"images\[0\] \(r\.png\): sentences\[1\] has no 'raw'",
        ),
        ({"split": "test", "sentences": [{"raw": "a"}]}, r"images\[0\]: 'filename'"),
        ({"filename": "r.png"}, r"images\[0\]: not an image entry with a 'split'"),
        (
            {"filename": "gone.png", "split": "test", "sentences": [{"raw": "a"}]},
            r"gone\.png: image file not found \(.*images\[0\]; 1 of 1 images missing\)",
        ),
    ]
    for entry, match in cases:
        ann.write_text(json.dumps({"images": [entry]}))
        with pytest.raises(DatasetError, match=match):
            karpathy(root)
    ann.write_text(json.dumps({"images": [{"filename": "r.png", "split": "val", "sentences": [{"raw": "a"}]}]}))
    with pytest.raises(DatasetError, match="no images with split 'test'"):
        karpathy(root)
    # an image that exists but does not decode fails when read, naming file and entry
    again = write_karpathy(tmp_path / "again")
    data = karpathy(again)
    (again / "g.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(
        DatasetError, match=r"again/g\.jpg: not a readable image \(.*dataset_flickr30k\.json images\[2\]\)"
    ):
        data.images[0:2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no dataset_coco\.json or dataset_flickr30k\.json"):
        karpathy(tmp_path / "empty")


def test_bad_class_folders_and_cifar(tmp_path):
    root = write_folders(tmp_path / "val")
    with pytest.raises(DatasetError, match="image folder does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "names.json").write_text(json.dumps({"blue": "Blue", "red": "Red"}))
    with pytest.raises(DatasetError, match=r"names\.json: no name for class folder 'green'"):
        image_folder(root, tmp_path / "names.json")
    (tmp_path / "names.txt").write_text("Blue\nGreen\n")
    with pytest.raises(DatasetError, match=r"names\.txt: 2 class names for the 3 class folders"):
        image_folder(root, tmp_path / "names.txt")
    (root / "red" / "r1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"red/r1\.png: not a readable image \(class folder 'red'\)"):
        image_folder(root).images[3]

    d, _, _ = write_cifar(tmp_path / "c10", "cifar10")
    with pytest.raises(
        DatasetError, match=r"c10/test: CIFAR file not found \(expected the extracted cifar-100-python/ directory\)"
    ):
        cifar(tmp_path / "c10", "cifar100")
    batch = pickle.loads((d / "test_batch").read_bytes(), encoding="bytes")
    (d / "test_batch").write_bytes(pickle.dumps({k: v for k, v in batch.items() if k != b"labels"}))
    with pytest.raises(DatasetError, match=r"test_batch: no b'labels' entry"):
        cifar(d, "cifar10")
    (d / "test_batch").write_bytes(pickle.dumps({**batch, b"labels": [0, 1, 7, 0, 1, 2]}))
    with pytest.raises(
        DatasetError, match=r"test_batch: b'labels'\[2\] = 7 is not a class of .*batches\.meta \(3 names\)"
    ):
        cifar(d, "cifar10")
    (d / "test_batch").write_bytes(pickle.dumps({**batch, b"data": batch[b"data"][:, :100]}))
    with pytest.raises(DatasetError, match=r"must be uint8 \[N, 3072\]"):
        cifar(d, "cifar10")
    # a pickle that names a global (built by hand: pickling a live function records whatever
    # module patched it, e.g. Ray replaces builtins.print once it is imported)
    (d / "test_batch").write_bytes(b"cos\nsystem\n.")
    with pytest.raises(
        DatasetError, match=r"not a CIFAR python pickle \(UnpicklingError: refusing to unpickle os\.system\)"
    ):
        cifar(d, "cifar10")


def test_eval_config_validation():
    cfg = make_config()
    assert [(t.name, t.kind, t.format, t.path) for t in cfg.eval.tasks] == [
        ("embedded_retrieval", "retrieval", "embedded", None),
        ("embedded_zeroshot", "zeroshot", "embedded", None),
    ]
    ok = make_config(
        {
            "eval": {
                "tasks": [{"name": "c10", "kind": "zeroshot", "format": "cifar10", "path": "/d", "templates": "single"}]
            }
        }
    )
    assert ok.eval.tasks[0].templates == "single"
    bad = [
        (
            {"name": "coco", "kind": "retrieval", "format": "karpathy"},
            "eval.tasks.0: .*task 'coco': format karpathy needs a path",
        ),
        (
            {"name": "c10", "kind": "retrieval", "format": "cifar10", "path": "/d"},
            "task 'c10': format cifar10 holds zeroshot, not retrieval",
        ),
        (
            {"name": "in", "kind": "zeroshot", "format": "imagefolder", "path": "/d", "annotations": "a.json"},
            "annotations is read only for format karpathy",
        ),
        ({"name": "a b", "kind": "zeroshot"}, "eval.tasks.0.name"),
        ({"name": "x", "kind": "probe"}, "eval.tasks.0.kind"),
    ]
    for task, match in bad:
        with pytest.raises(ConfigError, match=match):
            make_config({"eval": {"tasks": [task]}})
    with pytest.raises(ConfigError, match="unique.*: x repeated"):
        make_config({"eval": {"tasks": [{"name": "x", "kind": "zeroshot"}, {"name": "x", "kind": "retrieval"}]}})


# --- `raytrain eval` on a checkpoint and an export --------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint saved as the training loop saves one (nothing trained), and its export."""
    tmp = tmp_path_factory.mktemp("model")
    cfg = make_config({}, TINY + [f"data.root={tmp / 'data'}"])
    src = prepare(cfg.data)
    tok = src.tokenizer(cfg.data)
    torch.manual_seed(0)
    method = build_method(cfg, tok.vocab_size, tok.pad_id)
    ckpt = checkpoint.save(tmp / "ckpt", {"engine": {"model": method.state_dict()}}, cfg, {"source": asdict(src)})
    assert main(["export", str(ckpt), "--out", str(tmp / "student")]) == 0
    return {"ckpt": ckpt, "student": tmp / "student", "data_root": tmp / "data", "eval_dir": src.eval_dir}


def suite_file(tmp_path: Path) -> Path:
    write_karpathy(tmp_path / "flickr")
    write_folders(tmp_path / "val")
    write_cifar(tmp_path / "c100", "cifar100")
    tasks = [
        {
            "name": "flickr",
            "kind": "retrieval",
            "format": "karpathy",
            "path": str(tmp_path / "flickr"),
            "batch_size": 1,
        },
        {
            "name": "folders",
            "kind": "zeroshot",
            "format": "imagefolder",
            "path": str(tmp_path / "val"),
            "templates": "single",
        },
        {"name": "c100", "kind": "zeroshot", "format": "cifar100", "path": str(tmp_path / "c100")},
        {"name": "embedded_retrieval", "kind": "retrieval"},
    ]
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"eval": {"tasks": tasks, "device": "cpu"}}))
    return path


def test_eval_cli_checkpoint_and_export(tmp_path, trained, capsys):
    suite = suite_file(tmp_path)
    data = [f"data.root={trained['data_root']}", "data.n_train=16", "data.n_eval=16", "data.image_size=16"]
    results = {}
    for kind in ("ckpt", "student"):
        out = tmp_path / f"out_{kind}"
        assert main(["eval", "--config", str(suite), "--out", str(out), str(trained[kind]), *data]) == 0
        assert f"evaluation written to {out / 'summary.md'}" in capsys.readouterr().out
        for name, keys in (
            ("flickr", RETRIEVAL_KEYS),
            ("folders", ZEROSHOT_KEYS),
            ("c100", ZEROSHOT_KEYS),
            ("embedded_retrieval", RETRIEVAL_KEYS),
        ):
            r = json.loads((out / f"{name}.json").read_text())
            assert list(r) == TOP and list(r["metrics"]) == keys and r["dataset"] == name
            assert r["model"] == ("rankclip" if kind == "ckpt" else "student") and r["pretrained"] == str(trained[kind])
            assert all(v is None or 0 <= v <= 1 for v in r["metrics"].values())
            results[kind, name] = r["metrics"]
        summary = (out / "summary.md").read_text().splitlines()
        header = summary[4]
        assert header.startswith("| task | type | prompts | image_retrieval_recall@1 | text_retrieval_recall@1 |")
        assert "| acc1 | acc5 | mean_per_class_recall | seconds |" in header
        rows = {line.split(" | ")[0][2:]: line for line in summary[6:]}
        assert list(rows) == ["flickr", "folders", "c100", "embedded_retrieval"]
        assert rows["folders"].startswith("| folders | zeroshot_classification | single | – |")
        assert f"| {results[kind, 'c100']['acc1']:.4f} |" in rows["c100"]
        assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files
    # rankclip evaluates its student alone: the export scores exactly what the checkpoint does,
    # and the export's embedded default (this config's data section) is the checkpoint's own split
    for name in ("flickr", "folders", "c100", "embedded_retrieval"):
        assert results["ckpt", name] == pytest.approx(results["student", name], abs=1e-6)


def test_eval_cli_errors(tmp_path, trained, capsys):
    out = str(tmp_path / "out")
    task = "eval.tasks=[{name: coco, kind: retrieval, format: karpathy, path: %s}]"
    assert main(["eval", "--out", out, str(trained["ckpt"]), task % (tmp_path / "nowhere")]) == 2
    assert f"error: eval task 'coco': path {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    root = write_karpathy(tmp_path / "flickr")
    (root / "r.png").write_bytes(b"garbage")
    assert main(["eval", "--out", out, str(trained["ckpt"]), task % root]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: eval task 'coco': {root / 'r.png'}: not a readable image ({root / 'dataset_flickr30k.json'} images[0])"
        in err
    )
    assert "Traceback" not in err
    assert main(["eval", "--out", out, str(tmp_path)]) == 2
    assert "is neither a trial checkpoint (model.pt + config.json) nor an exported student" in capsys.readouterr().err
    assert (
        main(["eval", "--out", out, str(trained["ckpt"]), "eval.tasks=[{name: c10, kind: zeroshot, format: cifar10}]"])
        == 2
    )
    assert "task 'c10': format cifar10 needs a path" in capsys.readouterr().err


def test_frozen_teacher_checkpoint_is_rebuilt(tmp_path, trained):
    """A method whose evaluation encoder runs a frozen teacher (DINORANKCLIP injecting DINOv3
    at evaluation): the checkpoint holds no teacher weights, the config rebuilds the teacher,
    and the loaded model embeds exactly as the method that was saved."""
    cfg = make_config(
        {},
        TINY
        + [
            f"data.root={trained['data_root']}",
            "method=dinorankclip",
            "dinorankclip.eval_inject=true",
            "dinorankclip.text_injection=false",
            "teachers.dinov3.image_size=16",
            "teachers.dinov3.grid=2",
        ],
    )
    src = prepare(cfg.data)
    tok = src.tokenizer(cfg.data)
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, tok.vocab_size, tok.pad_id).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the injection matter (it starts as the identity)
        for p in method.image_injection.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    state = method.state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    ckpt = checkpoint.save(tmp_path / "ckpt", {"engine": {"model": state}}, cfg, {"source": asdict(src)})
    enc = load_model(ckpt, "cpu")
    images = [Image.new("RGB", (16, 16), c) for c in COLOURS.values()]
    with torch.no_grad():
        want = method.encode_images(_pixels(images, 16, cfg.data.mean, cfg.data.std))
        student_only = method.student.encode_image(_pixels(images, 16, cfg.data.mean, cfg.data.std))
        got = enc.images(images)
    assert torch.allclose(got, want, atol=1e-6) and (got - student_only).abs().max() > 0.1
    result = run_task(enc, EvalTaskConfig(name="embedded_zeroshot", kind="zeroshot"))
    assert result["model"] == "dinorankclip" and list(result["metrics"]) == ZEROSHOT_KEYS


def test_parallel_tasks_match_in_process(tmp_path, trained, ray_local):
    write_folders(tmp_path / "val")
    write_cifar(tmp_path / "c10", "cifar10")
    cfg = make_config(
        {
            "eval": {
                "device": "cpu",
                "num_cpus": 0.5,
                "tasks": [
                    {"name": "folders", "kind": "zeroshot", "format": "imagefolder", "path": str(tmp_path / "val")},
                    {"name": "c10", "kind": "zeroshot", "format": "cifar10", "path": str(tmp_path / "c10")},
                ],
            }
        }
    )
    for parallel in (False, True):
        run_eval(trained["student"], cfg, tmp_path / f"out_{parallel}", parallel=parallel)
    for name in ("folders", "c10"):
        seq, par = (json.loads((tmp_path / f"out_{p}" / f"{name}.json").read_text()) for p in (False, True))
        assert seq == par and math.isfinite(seq["metrics"]["acc1"])
    # a task's bad input comes back as its own error, not a remote traceback
    (tmp_path / "c10" / "cifar-10-batches-py" / "batches.meta").write_bytes(b"\x80\x02}q")
    with pytest.raises(DatasetError, match=r"eval task 'c10': .*batches\.meta: not a CIFAR python pickle"):
        run_eval(trained["student"], cfg, tmp_path / "out_bad", parallel=True)
