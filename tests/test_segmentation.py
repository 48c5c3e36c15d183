"""Zero-shot segmentation (raytrain.eval.segmentation): mean IoU on hand-computed arrays and
its errors, patch–prompt scoring with upsampling by hand, Pascal VOC's layout through
`raytrain eval`, every method's patch embeddings, and seg_miou in training's evaluation (and
in a one-trial sweep on Ray)."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raytrain.config import ConfigError, EvalTaskConfig, make_config
from raytrain.data.synthetic import VOCABULARY, make_dataset, words
from raytrain.data.transforms import WordTokenizer
from raytrain.eval.datasets import DatasetError
from raytrain.eval.run import Encoders, run_task
from raytrain.eval.segmentation import (
    VOC_CLASSES,
    Masks,
    Segmentation,
    embedded_segmentation,
    miou,
    voc_segmentation,
    zeroshot_segmentation,
)
from raytrain.methods import build_method, list_methods
from raytrain.train.loop import evaluate

# --- the metric ----------------------------------------------------------------------------

TARGET = [[[0, 0, 1], [1, 2, 255]], [[2, 2, 0], [255, 1, 1]]]
PRED = [[[0, 1, 1], [1, 2, 3]], [[2, 0, 0], [7, 1, 2]]]  # 3 and 7 sit on ignored pixels


def test_miou_by_hand():
    """Counted (target, pred) pairs: (0,0)×2 (0,1) (1,1)×3 (1,2) (2,2)×2 (2,0).
    Class 0: TP 2, FP 1, FN 1 → 2/4; class 1: TP 3, FP 1, FN 1 → 3/5; class 2: TP 2, FP 1,
    FN 1 → 2/4; class 3 only predicted on an ignored pixel: in neither → NaN, not averaged."""
    for cast in (np.array, torch.tensor):
        m = miou(cast(PRED), cast(TARGET), num_classes=4)
        assert m["miou"] == pytest.approx((0.5 + 0.6 + 0.5) / 3)
        assert m["per_class_iou"][:3] == pytest.approx([0.5, 0.6, 0.5]) and math.isnan(m["per_class_iou"][3])
    # a class only predicted (3) has IoU 0 and counts; one only in the target too
    m = miou(np.array([[[0, 3]]]), np.array([[[0, 0]]]), 4)
    assert m["per_class_iou"][0] == 0.5 and m["per_class_iou"][3] == 0 and m["miou"] == 0.25
    m = miou(np.array([[[0, 0]]]), np.array([[[0, 2]]]), 3, ignore_index=None)
    assert m["per_class_iou"][2] == 0 and m["miou"] == 0.25
    # over the whole set, not per image: 1 of 2 pixels right in image 0, 3 of 3 in image 1
    m = miou(np.array([[[1, 1, 1]], [[1, 1, 1]]]), np.array([[[1, 0, 255]], [[1, 1, 1]]]), 2)
    assert m["per_class_iou"] == pytest.approx([0.0, 4 / 5])


@pytest.mark.parametrize(
    "pred, target, kwargs, match",
    [
        (np.zeros((2, 3, 3), int), np.zeros((2, 3, 4), int), {}, r"pred has shape \[2, 3, 3\] but target has shape"),
        (np.zeros((1, 2, 2), int), np.array([[[0, 1], [4, 9]]]), {}, r"target has labels outside \[0, 3\) other than"),
        (np.array([[[0, 5]]]), np.zeros((1, 1, 2), int), {}, r"pred has labels outside \[0, 3\): \[5\] \(1 pixels\)"),
        (np.zeros((1, 2, 2)), np.zeros((1, 2, 2), int), {}, "pred must hold integer class indices, got dtype float64"),
        (np.zeros((1, 1, 1), int), np.zeros((1, 1, 1), int), {"ignore_index": 2}, "ignore_index 2 is one of the 3"),
        (np.zeros((1, 1, 2), int), np.full((1, 1, 2), 255), {}, "no pixels to score"),
        (np.zeros((1, 1, 1), int), np.zeros((1, 1, 1), int), {"num_classes": 0}, "num_classes must be an integer"),
    ],
)
def test_miou_errors(pred, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        miou(pred, target, **{"num_classes": 3, **kwargs})


# --- scoring patches against prompts ---------------------------------------------------------

AXES = {"background": 0, "red": 1, "green": 2}


def axis_texts(texts):
    """A prompt embeds as the unit vector of the class it names (0 for other classes)."""
    return torch.stack(
        [sum((F.one_hot(torch.tensor(AXES[w]), 3) for w in words(t) if w in AXES), torch.zeros(3)) for t in texts]
    )


def png(array, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def grid_patches(grids):
    """Image i is the index of a 2×2 grid of class labels: each patch embeds as 3× its one-hot."""

    def encode(items):
        return 3 * F.one_hot(torch.tensor([grids[i] for i in items]), 3).float()

    return encode


def test_zeroshot_segmentation_by_hand():
    """Each 2×2 patch grid's logits, upsampled bilinearly (align_corners=False) ×2 to a 4×4
    mask and to a 2×4 one, leave each pixel with its nearest patch's class (the nearest's
    weight is ≥ 9/16). Image 0 predicts [[1,0],[0,2]] in 2×2 blocks: against its mask, (1,1)×4,
    (0,0)×3 + 1 ignored, (0,0)×4, (2,2)×3 (1,2)×1; image 1 predicts rows 2, 0: (2,2)×2 (1,2)×2
    (0,0)×4. Class 0: 11/11; class 1: TP 4, FN 3 → 4/7; class 2: TP 5, FP 3 → 5/8."""
    masks = [
        [[1, 1, 0, 0], [1, 1, 0, 255], [0, 0, 2, 2], [0, 0, 2, 1]],
        [[2, 2, 1, 1], [0, 0, 0, 0]],
    ]
    data = Segmentation([0, 1], Masks([png(m) for m in masks], ["m0", "m1"]), list(AXES), ("a {} thing",))
    encode = grid_patches([[[1, 0], [0, 2]], [[2, 2], [0, 0]]])
    for batch_size in (1, 2):
        m = zeroshot_segmentation(encode, axis_texts, data, data.templates, batch_size=batch_size)
        assert m["per_class_iou"] == pytest.approx([1.0, 4 / 7, 5 / 8])
        assert m["miou"] == pytest.approx((1 + 4 / 7 + 5 / 8) / 3)

    prompts = []
    none = zeroshot_segmentation(lambda items: None, lambda t: prompts.extend(t), data, data.templates)
    assert none is None and prompts == []  # no patches: nothing scored, no prompt encoded
    data.masks = Masks([png(masks[0]), png([[0, 0, 1, 9], [0, 0, 0, 0]])], ["m0", "row 1 of seg.parquet"])
    with pytest.raises(DatasetError, match=r"row 1 of seg\.parquet: target has labels outside \[0, 3\).*\[9\]"):
        zeroshot_segmentation(encode, axis_texts, data, data.templates)
    data.masks = Masks([png(np.zeros((4, 4, 3)), "RGB")], ["colour.png"])
    with pytest.raises(DatasetError, match="colour.png: a RGB image, not a class-index mask"):
        zeroshot_segmentation(encode, axis_texts, data, data.templates)


# --- Pascal VOC's layout through `raytrain eval` ---------------------------------------------

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TOP = ["dataset", "model", "pretrained", "task", "metrics", "language"]


def quadrants(tl, tr, bl, br, size=16):
    img = np.zeros((size, size, 3), np.uint8)
    h = size // 2
    img[:h, :h], img[:h, h:], img[h:, :h], img[h:, h:] = (RGB[c] for c in (tl, tr, bl, br))
    return Image.fromarray(img)


def palette_mask(labels):
    m = Image.fromarray(np.asarray(labels, np.uint8), "P")
    m.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    return m


def write_voc(root: Path):
    """Image a: red | green over blue | blue; image b: all green; c is not in val.txt."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    a = np.zeros((16, 16), np.uint8)
    a[:8, :8], a[:8, 8:], a[8:, :] = 1, 2, 0
    a[:8, 8] = 255  # a boundary: not scored
    a[12:, 12:] = 1  # labelled red where the image is blue: a miss of class 1
    b = np.full((16, 16), 2, np.uint8)
    b[:8, :8] = 0
    for name, image, mask in (
        ("a", quadrants("red", "green", "blue", "blue"), a),
        ("b", quadrants("green", "green", "green", "green"), b),
        ("c", quadrants("red", "red", "red", "red"), np.full((16, 16), 9, np.uint8)),
    ):
        image.save(root / "JPEGImages" / f"{name}.jpg", quality=95, subsampling=0)
        palette_mask(mask).save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    (root / "names.txt").write_text("background\nred\ngreen\n")
    return root


def quadrant_patches(items):
    """A 2×2 patch grid per image: each quadrant's mean colour, blue standing for background."""
    out = []
    for img in items:
        a = np.asarray(img.convert("RGB"), np.float32) / 255
        q = a.reshape(2, 8, 2, 8, 3).mean((1, 3))  # [2, 2, rgb]
        out.append(torch.tensor(q[..., [2, 0, 1]]))  # (background = blue, red, green)
    return torch.stack(out)


def test_voc_folder_by_hand(tmp_path):
    """Patches by quadrant: a = [[red, green], [bg, bg]], b = all green, upsampled ×8. Bilinear
    logits with align_corners=False give row 7 a weight 9/16 from the top patches and 7/16 from
    the bottom ones, column 8-x the mirror of x: pixel (7, x) of a is red when 9/16·w_x > 7/16
    (w_x = 1, .9375, .8125 for x ≤ 5) and background at x = 6, 7 (w_x = .6875, .5625); green
    at (7, 9) would need 9/16·.6875 > 7/16: background too ((7, 8) is ignored). Counted pairs:
    a: (1,1)×62 (1,0)×2, (2,2)×55 (2,0)×1, (0,0)×112, (1,0)×16; b: (0,2)×64, (2,2)×192.
    Class 0: TP 112, FP 19, FN 64 → 112/195; class 1: TP 62, FN 18 → 62/80; class 2: TP 247,
    FP 64, FN 1 → 247/312."""
    root = write_voc(tmp_path / "VOC2012")
    task = EvalTaskConfig(
        name="voc", kind="segmentation", format="voc", path=str(root), classnames=str(root / "names.txt")
    )
    enc = Encoders("fake", "fixture", None, axis_texts, patches=quadrant_patches)
    result = run_task(enc, task)
    assert list(result) == TOP and result["task"] == "zeroshot_segmentation" and result["dataset"] == "voc"
    per_class = {"background": 112 / 195, "red": 62 / 80, "green": 247 / 312}
    assert list(result["metrics"]) == ["miou", "per_class_iou"]
    assert result["metrics"]["per_class_iou"] == pytest.approx(per_class)
    assert result["metrics"]["miou"] == pytest.approx(sum(per_class.values()) / 3)
    assert json.loads(json.dumps(result)) == result  # plain JSON: NaN would be written as null

    data = voc_segmentation(root)  # no class file: VOC's 21 names, the ImageNet prompts
    assert data.classes == list(VOC_CLASSES) and len(data.classes) == 21 and len(data.templates) == 80
    assert [p.name for p in data.images.paths] == ["a.jpg", "b.jpg"]
    assert data.masks[0][0, 8] == 255 and data.masks[1].dtype == np.int64


def test_voc_errors(tmp_path):
    root = write_voc(tmp_path / "voc")
    enc = Encoders("fake", "fixture", None, axis_texts, patches=quadrant_patches)
    task = EvalTaskConfig(name="voc", kind="segmentation", format="voc", path=str(root))
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nc\n")  # c's mask says 9, of 21 classes: fine
    run_task(enc, task)
    no_patches = Encoders("fake", "fixture", None, axis_texts, patches=lambda items: None)
    with pytest.raises(ConfigError, match=r"eval task 'voc': fake \(fixture\) gives no patch embeddings"):
        run_task(no_patches, task)
    named = task.model_copy(update={"classnames": str(root / "names.txt")})
    with pytest.raises(DatasetError, match=r"eval task 'voc': .*c\.png \(.*val\.txt line 2 \(c\)\): target has labels"):
        run_task(enc, named)
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nmissing\n")
    with pytest.raises(DatasetError, match=r"missing\.jpg: image file not found \(.*val\.txt line 2 \(missing\)"):
        voc_segmentation(root)
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")
    palette_mask(np.zeros((16, 12))).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: mask is 12x16 but its image is 16x16"):
        voc_segmentation(root)
    Image.new("RGB", (16, 16)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png \(.*line 1 \(a\)\): a RGB image, not a class-index mask"):
        run_task(enc, task)
    (root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"no ImageSets/Segmentation/val\.txt"):
        voc_segmentation(root)
    bad = [
        ({"name": "v", "kind": "segmentation", "format": "voc"}, "format voc needs a path"),
        ({"name": "v", "kind": "zeroshot", "format": "voc", "path": "/d"}, "holds segmentation, not zeroshot"),
        ({"name": "v", "kind": "segmentation", "classnames": "n.txt"}, "read only for format imagefolder and voc"),
    ]
    for t, match in bad:
        with pytest.raises(ConfigError, match=match):
            make_config({"eval": {"tasks": [t]}})
    with pytest.raises(DatasetError, match=r"none: no segmentation split \(needs segmentation\.parquet"):
        run_task(enc, EvalTaskConfig(name="e", kind="segmentation", path=str(tmp_path / "none")))


# --- methods' patch embeddings ---------------------------------------------------------------

TINY = [
    "model.image.width=16",
    "model.image.heads=2",
    "model.image.patch=4",
    "model.text.width=16",
    "model.text.heads=2",
    "model.embed_dim=8",
    "data.image_size=16",
    "data.context_length=24",
    "data.n_train=16",
    "data.n_eval=16",
    "teachers.dinov3.image_size=16",
    "teachers.dinov3.grid=2",
    "teachers.text.max_tokens=8",
    "data.extra_captions=[caption_short]",
    "cache.use=true",
    "cache.teachers=[dinov3,text,text_tokens,yolo]",
]
NEEDS = {"dclip": ["dclip.distill=false"], "dclip_meta": ["train.eval=false"]}


def build(overrides):
    torch.manual_seed(0)
    return build_method(make_config({}, TINY + overrides), WordTokenizer(VOCABULARY).vocab_size).eval()


@pytest.mark.parametrize("name", list_methods())
def test_every_method_gives_patches_in_its_image_space(name):
    """[B, h, w, E] unit vectors of encode_images' width; the student's 4×4 patch grid (16 px,
    patch 4), freeze-align's 2×2 teacher grid; none for the meta-teacher phase (no images)."""
    method = build([f"method={name}", *NEEDS.get(name, [])])
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        patches = method.encode_patches(pixels)
        if name == "dclip_meta":
            assert patches is None
            return
        dim = method.encode_images(pixels).shape[-1]
    side = 2 if name == "freeze_align" else 4
    assert patches.shape == (3, side, side, dim) and torch.allclose(patches.norm(dim=-1), torch.ones(3, side, side))
    assert list(method.patch_evaluations()) == list(method.evaluations())


def test_patch_embeddings_are_the_pooled_outputs_map():
    """The student's patch token (i, j) goes through the head that projects its CLS; freeze-align's
    through P_local, the projector the image embedding averages (with cls_token off its image
    embedding is the normalized mean of exactly these patches)."""
    method = build(["method=clip"])
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, tokens = method.student.image(pixels)
        want = F.normalize(method.student.image.head(tokens), dim=-1)
        got = method.encode_patches(pixels)
    assert torch.allclose(got[:, 1, 2], want[:, 1 * 4 + 2], atol=1e-6)
    fa = build(["method=freeze_align", "freeze_align.cls_token=false", "freeze_align.dropout=0.0"])
    with torch.no_grad():
        image = fa.encode_images(pixels)
        out = fa.teacher(pixels)
        raw = fa.projectors.image_local(out.patches)
        assert torch.allclose(fa.encode_patches(pixels).flatten(1, 2), F.normalize(raw, dim=-1), atol=1e-6)
        assert torch.allclose(F.normalize(raw.mean(1), dim=-1), image, atol=1e-6)
    assert build(["method=freeze_align", "freeze_align.local_tokens=false"]).encode_patches(pixels) is None


@pytest.mark.parametrize("eval_inject", [False, True])
def test_dinorankclip_patches_are_the_students(eval_inject):
    """The injected mode adds one global teacher feature: it has no patches; the student mode's
    are the student's, under the prefix that mode's metrics carry."""
    method = build(["method=dinorankclip", f"dinorankclip.eval_inject={str(eval_inject).lower()}"])
    views = method.patch_evaluations()
    student, injected = ("student_", "") if eval_inject else ("", "inject_")
    assert list(views) == list(method.evaluations()) == ["", "student_" if eval_inject else "inject_"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert views[injected](pixels) is None
        assert torch.equal(views[student](pixels), F.normalize(method.student.patch_embeddings(pixels), dim=-1))


# --- training's evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "ds"
    make_dataset(out, 16, 16, seed=0, image_size=16)
    return out / "eval"


def test_embedded_split(eval_dir):
    data = embedded_segmentation(eval_dir)
    assert len(data.images) == len(data.masks) == 16 and data.classes[0] == "background" and len(data.classes) == 35
    assert all(m.shape == (16, 16) and m.max() < 35 for m in data.masks[0:16])
    assert embedded_segmentation(eval_dir.parent) is None


def test_training_evaluation_adds_seg_miou_and_keeps_the_rest(eval_dir, tmp_path):
    """seg_miou joins the suite when the split exists and the mode has patches; every other
    metric is the same number as without the split (the old dataset)."""
    tokenizer = WordTokenizer(VOCABULARY)
    old = tmp_path / "old"
    old.mkdir()
    for p in eval_dir.iterdir():
        if not p.name.startswith("segmentation"):
            (old / p.name).write_bytes(p.read_bytes())
    method = build(["method=dinorankclip", "dinorankclip.text_injection=false"])
    cfg = method.cfg
    with_split = evaluate(method, tokenizer, cfg, str(eval_dir), "cpu")
    without = evaluate(method, tokenizer, cfg, str(old), "cpu")
    assert set(with_split) - set(without) == {"seg_miou"}  # the student mode; the injected one has no patches
    assert {k: with_split[k] for k in without} == without
    assert 0 <= with_split["seg_miou"] <= 1
    method = build(["method=dinorankclip", "dinorankclip.text_injection=false", "dinorankclip.eval_inject=true"])
    assert "student_seg_miou" in evaluate(method, tokenizer, method.cfg, str(eval_dir), "cpu")


def test_one_trial_sweep_reports_seg_miou(tmp_path, ray_local):
    """A CLIP trial on Ray: its final metrics carry seg_miou, and the report has the column."""
    from raytrain.tune.sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text(
        "name: seg_check\n"
        "config: {method: clip, data: {n_train: 32, n_eval: 16, image_size: 16},\n"
        "  model: {image: {width: 16, heads: 2, patch: 4}, text: {width: 16, heads: 2}, embed_dim: 8},\n"
        "  train: {epochs: 1, batch_size: 16, report_every: 1, cpus_per_worker: 0.45},\n"
        "  run: {max_concurrent_trials: 1}}\n"
        "grid: {seed: [0]}\ngroup: seed\nmetrics: [mean_r@1, seg_miou]\nprimary: mean_r@1\n"
    )
    report = run_sweep(space, [f"data.root={tmp_path / 'data'}", f"run.storage_path={tmp_path / 'runs'}"])
    trials = pd.read_csv(Path(report).parent / "trials.csv")
    assert (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    assert 0 <= trials["seg_miou"].iloc[0] <= 1
    assert "seg_miou" in Path(report).read_text()
