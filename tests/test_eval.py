"""Evaluation metrics: retrieval, zero-shot, probes, and the full suite on a toy eval dir."""

import io
import json
import math
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raytrain.eval.probes import binding_accuracy, modality_gap
from raytrain.eval.retrieval import retrieval_metrics
from raytrain.eval.suite import evaluate
from raytrain.eval.zeroshot import SINGLE, TEMPLATES, class_embeddings, zeroshot_accuracy


def naive(sim, pos, ks):
    """Reference: per query, sort candidates by (-score, index) in plain Python."""
    out = {f"r@{k}": 0.0 for k in ks}
    out["map"] = 0.0
    for s, p in zip(sim.tolist(), pos.tolist()):
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))
        ranks = [r + 1 for r, j in enumerate(order) if p[j]]
        for k in ks:
            out[f"r@{k}"] += ranks[0] <= k
        out["map"] += sum((n + 1) / r for n, r in enumerate(ranks)) / len(ranks)
    return {k: v / len(sim) for k, v in out.items()}


# --- retrieval -------------------------------------------------------------------------


def test_retrieval_hand_computed():
    # diagonal positives ranked 1, 3, 2
    sim = np.array([[0.9, 0.5, 0.1], [0.8, 0.3, 0.6], [0.2, 0.7, 0.4]])
    m = retrieval_metrics(sim, ks=(1, 2, 3))
    assert m == pytest.approx({"r@1": 1 / 3, "r@2": 2 / 3, "r@3": 1.0, "map": (1 + 1 / 3 + 1 / 2) / 3})
    assert all(type(v) is float for v in m.values())


def test_retrieval_default_keys_and_k_beyond_candidates():
    m = retrieval_metrics(np.eye(3))
    assert m == {"r@1": 1.0, "r@5": 1.0, "r@10": 1.0, "map": 1.0}


def test_retrieval_multi_positive():
    # image 0 owns captions 0-2, image 1 owns caption 3; image 0 finds caption 1 first
    sim = np.array([[0.1, 0.9, 0.2, 0.5], [0.3, 0.1, 0.2, 0.0]])
    pos = np.array([[1, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    m = retrieval_metrics(sim, ks=(1, 4), positives=pos)
    ap0 = (1 / 1 + 2 / 3 + 3 / 4) / 3  # positives at ranks 1, 3, 4
    assert m == pytest.approx({"r@1": 0.5, "r@4": 1.0, "map": (ap0 + 1 / 4) / 2})
    # the other direction: 4 caption queries over 2 image candidates
    t2i = retrieval_metrics(sim.T, ks=(1,), positives=pos.T)
    assert t2i == pytest.approx({"r@1": 2 / 4, "map": (0.5 + 1 + 1 + 0.5) / 4})


def test_retrieval_ties_break_by_index():
    m = retrieval_metrics(np.zeros((3, 3)), ks=(1, 2))
    assert m == pytest.approx({"r@1": 1 / 3, "r@2": 2 / 3, "map": (1 + 1 / 2 + 1 / 3) / 3})
    # the positive (index 1) tied with an earlier negative comes second
    m = retrieval_metrics(np.array([[0.5, 0.5]]), ks=(1,), positives=np.array([[False, True]]))
    assert m == {"r@1": 0.0, "map": 0.5}


def test_retrieval_matches_naive_with_ties():
    g = np.random.default_rng(0)
    sim = g.integers(0, 4, (20, 25)).astype(np.float32)  # few distinct values: many ties
    pos = g.random((20, 25)) < 0.15
    pos[np.arange(20), g.integers(0, 25, 20)] = True
    ks = (1, 3, 10)
    assert retrieval_metrics(sim, ks, positives=pos) == pytest.approx(naive(sim, pos, ks))
    eye = np.eye(20, 25, dtype=bool)
    assert retrieval_metrics(sim, ks) == pytest.approx(naive(sim, eye, ks))


def test_retrieval_torch_numpy_agree():
    sim = np.random.default_rng(1).standard_normal((30, 40)).astype(np.float32)
    ref = retrieval_metrics(sim)
    assert retrieval_metrics(torch.from_numpy(sim)) == ref
    assert retrieval_metrics(torch.from_numpy(sim).double().requires_grad_()) == ref
    pos = np.eye(30, 40, dtype=bool)
    assert retrieval_metrics(torch.from_numpy(sim), positives=torch.from_numpy(pos)) == ref


def test_retrieval_chunking_is_invisible():
    g = np.random.default_rng(2)
    sim = g.standard_normal((37, 50))
    pos = g.random((37, 50)) < 0.2
    pos[:, 0] = True
    for p in (None, pos):
        ref = retrieval_metrics(sim, positives=p)
        for chunk in (1, 7, 36, 100):
            assert retrieval_metrics(sim, positives=p, chunk=chunk) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize(
    "sim, pos, match",
    [
        (np.zeros(3), None, "sim must be 2-D"),
        (np.zeros((4, 3)), None, "queries <= candidates"),
        (np.zeros((2, 3)), np.ones((3, 2), bool), "positives shape"),
        (np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]], bool), "no positive"),
        (np.array([[np.nan, 0.0]]), None, "NaN"),
    ],
)
def test_retrieval_errors(sim, pos, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, positives=pos)


# --- zero-shot -------------------------------------------------------------------------


def test_zeroshot_one_hot_classes():
    cls = torch.eye(3)
    img = torch.tensor([[1.0, 0, 0], [0.2, 0.9, 0.1], [0.1, 0.5, 0.7], [0, 0, 1.0]])
    y = np.array([0, 2, 1, 2], dtype=np.int32)  # true-class ranks 1, 3, 2, 1
    acc = zeroshot_accuracy(img, cls, y, ks=(1, 2, 5))
    assert acc == pytest.approx({"top1": 0.5, "top2": 0.75, "top5": 1.0})  # 5 clipped to 3 classes


def test_zeroshot_ties_break_by_class_index():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    cls = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert zeroshot_accuracy(img, cls, [0, 1], ks=(1,)) == {"top1": 0.5}


def _hash_text(d=16):
    def enc(texts):
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            rows.append(torch.randn(d, generator=g) * (1 + len(t)))  # unnormalized on purpose
        return torch.stack(rows)

    return enc


def test_class_embeddings_average_templates():
    enc, templates = _hash_text(), ("a {}.", "the {} here", "{}!")
    classes = ["cat", "dog"]
    got = class_embeddings(enc, classes, templates)
    for c, name in enumerate(classes):
        e = F.normalize(enc([t.format(name) for t in templates]), dim=-1)
        want = F.normalize(e.mean(0), dim=0)
        assert torch.allclose(got[c], want, atol=1e-6)
    assert got.shape == (2, 16)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_class_embeddings_chunks_prompts():
    sizes, enc = [], _hash_text(4)

    def spy(texts):
        sizes.append(len(texts))
        return enc(texts)

    out = class_embeddings(spy, [f"c{i}" for i in range(400)], TEMPLATES[:3])
    assert sizes == [1024, 176] and out.shape == (400, 4)
    assert "{}" in SINGLE[0] and all("{}" in t for t in TEMPLATES)


# --- probes ----------------------------------------------------------------------------


def test_binding_accuracy():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pos = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # win, lose, tie (a tie fails)
    assert binding_accuracy(img, pos, neg) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shapes must match"):
        binding_accuracy(img, pos, neg[:2])


def test_modality_gap_identical():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    m = modality_gap(x, x.clone())
    assert m["gap"] == pytest.approx(0.0, abs=1e-7)
    assert m["separability"] == pytest.approx(0.5)


def test_modality_gap_shifted_clouds_deterministic():
    g = torch.Generator().manual_seed(0)
    d = 64
    u = torch.randn(300, d, generator=g) * 0.1 + F.one_hot(torch.tensor(0), d)
    v = torch.randn(300, d, generator=g) * 0.1 + F.one_hot(torch.tensor(1), d)
    m = modality_gap(u, v)
    assert m["separability"] >= 0.99
    uc, vc = F.normalize(u, dim=-1).mean(0), F.normalize(v, dim=-1).mean(0)
    assert m["gap"] == pytest.approx((uc - vc).norm().item(), rel=1e-5)
    assert modality_gap(u, v) == m


# --- suite -----------------------------------------------------------------------------

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
D = 8


def _png(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def encode_images(pngs):
    assert not torch.is_grad_enabled()
    assert len(pngs) <= 256
    out = torch.zeros(len(pngs), D)
    for i, b in enumerate(pngs):
        out[i, :3] = torch.tensor(np.asarray(Image.open(io.BytesIO(b))).reshape(-1, 3).mean(0) / 255)
    return out


def encode_texts(texts):
    """Colour words add their RGB; other words hash into dims 3..7 with small weight."""
    assert not torch.is_grad_enabled()
    out = torch.zeros(len(texts), D)
    for i, t in enumerate(texts):
        for w in t.lower().strip(".!").split():
            if w in COLOURS:
                out[i, :3] += torch.tensor(COLOURS[w], dtype=torch.float) / 255
            else:
                out[i, 3 + zlib.crc32(w.encode()) % (D - 3)] += 0.05
    return out


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)


def _eval_dir(tmp_path):
    names = list(COLOURS)
    imgs = [_png(COLOURS[c]) for c in names]
    ids = list(range(len(names)))
    caps = [f"a {c} square" for c in names]
    negs = [f"a {names[(i + 1) % len(names)]} square" for i in range(len(names))]
    _write(tmp_path / "retrieval.parquet", id=ids, image=imgs, caption=caps)
    _write(tmp_path / "zeroshot.parquet", id=ids, image=imgs, label=pa.array(ids, pa.int32()), caption=caps)
    _write(tmp_path / "binding.parquet", id=ids, image=imgs, caption=caps, negative=negs)
    _write(
        tmp_path / "ood.parquet",
        id=ids[:3],
        image=imgs[:3],
        caption=caps[:3],
        negative=negs[:3],
        label=pa.array([0, 1, 2], pa.int32()),
    )
    (tmp_path / "classes.json").write_text(
        json.dumps({"classes": names, "templates": ["a {} square.", "a photo of a {}."], "ood_classes": names[:3]})
    )
    return tmp_path


KEYS = {
    "i2t_r@1",
    "i2t_r@5",
    "i2t_r@10",
    "i2t_map",
    "t2i_r@1",
    "t2i_r@5",
    "t2i_r@10",
    "t2i_map",
    "zs_top1",
    "zs_top5",
    "binding",
    "ood_i2t_r@1",
    "ood_t2i_r@1",
    "ood_zs_top1",
    "ood_binding",
    "gap",
    "separability",
    "mean_r@1",
    "retrieval_images",
    "retrieval_captions",
}
COUNTS = {"retrieval_images", "retrieval_captions"}


def test_suite_all_keys(tmp_path):
    m = evaluate(encode_images, encode_texts, _eval_dir(tmp_path))
    assert set(m) == KEYS
    assert all(type(v) is float and math.isfinite(v) for k, v in m.items() if k not in COUNTS)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k not in {"gap", *COUNTS})
    assert m["retrieval_images"] == m["retrieval_captions"] == len(COLOURS)
    # colour is all these encoders see, and every image has its own colour
    for k in ("i2t_r@1", "t2i_r@1", "mean_r@1", "zs_top1", "binding", "ood_zs_top1", "ood_binding"):
        assert m[k] == 1.0, k


def test_suite_partial_dir_and_multi_caption(tmp_path):
    imgs = [_png(COLOURS["red"]), _png(COLOURS["blue"])]
    # image "a" has two captions (two rows sharing its id); only the retrieval split exists
    _write(
        tmp_path / "retrieval.parquet",
        id=["a", "a", "b"],
        image=[imgs[0], imgs[0], imgs[1]],
        caption=["a red square", "red", "a blue circle"],
    )
    seen = []

    def spy(pngs):
        seen.extend(pngs)
        return encode_images(pngs)

    m = evaluate(spy, encode_texts, tmp_path)
    assert len(seen) == 2  # each distinct image encoded once
    assert set(m) == {k for k in KEYS if k.startswith(("i2t", "t2i", "mean"))} | {"gap", "separability", *COUNTS}
    assert m["i2t_r@1"] == m["t2i_r@1"] == m["i2t_map"] == m["t2i_map"] == 1.0
    assert (m["retrieval_images"], m["retrieval_captions"]) == (2, 3)
    assert evaluate(encode_images, encode_texts, tmp_path / "missing") == {}


def test_suite_caption_shared_by_several_images(tmp_path):
    """Four images (two red, two blue, distinct ids) and two caption texts, each given to two
    images. Scored per copy, identical embeddings tie and the index tie-break fails one copy of
    each (R@1 0.5 both ways); as one caption whose matches are both its images, every query is
    found at 1. The ood split's repeated caption is merged the same way."""
    imgs = [_png(COLOURS[c]) for c in ("red", "red", "blue", "blue")]
    caps = ["a red square", "a red square", "a blue square", "a blue square"]
    _write(tmp_path / "retrieval.parquet", id=[0, 1, 2, 3], image=imgs, caption=caps)
    _write(tmp_path / "ood.parquet", id=[0, 1, 2, 3], image=imgs, caption=caps, negative=caps[::-1], label=[0] * 4)
    m = evaluate(encode_images, encode_texts, tmp_path)
    assert (m["retrieval_images"], m["retrieval_captions"]) == (4, 2)
    assert m["i2t_r@1"] == m["t2i_r@1"] == m["i2t_map"] == m["t2i_map"] == m["mean_r@1"] == 1.0
    assert m["ood_i2t_r@1"] == m["ood_t2i_r@1"] == 1.0
    # the same rows scored per copy: what the suite did before
    with torch.no_grad():
        img, txt = F.normalize(encode_images(imgs), dim=-1), F.normalize(encode_texts(caps), dim=-1)
    assert retrieval_metrics(img @ txt.T, ks=(1,))["r@1"] == retrieval_metrics(txt @ img.T, ks=(1,))["r@1"] == 0.5
