"""Full evaluation of an embedding model on the embedded default's evaluation splits."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from raytrain.eval.probes import binding_accuracy, modality_gap
from raytrain.eval.retrieval import retrieval_metrics
from raytrain.eval.zeroshot import TEMPLATES, class_embeddings, zeroshot_accuracy

_CHUNK = 256


def _encode(fn: Callable[[list], torch.Tensor], items: Sequence) -> torch.Tensor:
    """L2-normalized float embeddings of `items`, encoded 256 at a time."""
    return F.normalize(torch.cat([fn(list(items[i:i + _CHUNK])) for i in range(0, len(items), _CHUNK)]).float(), dim=-1)


def _read(eval_dir: Path, name: str) -> dict[str, list] | None:
    path = eval_dir / f"{name}.parquet"
    return pq.read_table(path).to_pydict() if path.exists() else None


def _group(ids: list, captions: list) -> tuple[list[int], list[str], torch.Tensor]:
    """Images (first row of each id), all captions, and which image owns each caption.

    Rows sharing an id are one image with several captions; a caption cell may also hold
    a list of captions. Returns (image row indices, captions, owner index per caption).
    """
    group: dict = {}
    rows, texts, owner = [], [], []
    for r, (i, cap) in enumerate(zip(ids, captions)):
        if i not in group:
            group[i] = len(rows)
            rows.append(r)
        for c in cap if isinstance(cap, list) else [cap]:
            texts.append(c)
            owner.append(group[i])
    return rows, texts, torch.tensor(owner)


def _retrieval(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, prefix: str) -> dict[str, float]:
    """Both directions; positives only when some image has more than one caption."""
    sim = img @ txt.T
    pos = None
    if not torch.equal(owner, torch.arange(len(img))):
        pos = owner[None, :] == torch.arange(len(img))[:, None]
    i2t = retrieval_metrics(sim, positives=pos)
    t2i = retrieval_metrics(sim.T, positives=None if pos is None else pos.T)
    return {**{f"{prefix}i2t_{k}": v for k, v in i2t.items()}, **{f"{prefix}t2i_{k}": v for k, v in t2i.items()}}


@torch.no_grad()
def evaluate(encode_images: Callable[[list[bytes]], torch.Tensor], encode_texts: Callable[[list[str]], torch.Tensor],
             eval_dir) -> dict[str, float]:
    """Evaluate an embedding model on `eval_dir`'s splits; returns flat metrics.

    encode_images: list of PNG bytes -> [n, d]; encode_texts: list of str -> [n, d]
    (outputs are L2-normalized here). Splits whose file is missing are skipped.
    Keys: i2t_/t2i_ r@1, r@5, r@10, map, gap, separability (retrieval.parquet);
    zs_top1, zs_top5 (zeroshot.parquet, classes with the file's templates);
    binding (binding.parquet); ood_i2t_r@1, ood_t2i_r@1, ood_zs_top1 (over ood_classes),
    ood_binding (ood.parquet); mean_r@1 = (i2t_r@1 + t2i_r@1) / 2, the headline metric.
    """
    eval_dir = Path(eval_dir)
    meta_path = eval_dir / "classes.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    templates = meta.get("templates") or TEMPLATES
    out: dict[str, float] = {}

    if (t := _read(eval_dir, "retrieval")) is not None:
        rows, texts, owner = _group(t["id"], t["caption"])
        img, txt = _encode(encode_images, [t["image"][r] for r in rows]), _encode(encode_texts, texts)
        out.update(_retrieval(img, txt, owner, ""))
        out.update(modality_gap(img[owner.to(img.device)], txt))  # each caption paired with its image
        out["mean_r@1"] = (out["i2t_r@1"] + out["t2i_r@1"]) / 2

    if (t := _read(eval_dir, "zeroshot")) is not None and meta.get("classes"):
        img = _encode(encode_images, t["image"])
        cls = class_embeddings(encode_texts, meta["classes"], templates)
        acc = zeroshot_accuracy(img, cls, t["label"], ks=(1, 5))
        out.update({"zs_top1": acc["top1"], "zs_top5": acc["top5"]})

    if (t := _read(eval_dir, "binding")) is not None:
        img = _encode(encode_images, t["image"])
        out["binding"] = binding_accuracy(img, _encode(encode_texts, t["caption"]), _encode(encode_texts, t["negative"]))

    if (t := _read(eval_dir, "ood")) is not None:
        img, pos = _encode(encode_images, t["image"]), _encode(encode_texts, t["caption"])
        r = _retrieval(img, pos, torch.arange(len(img)), "ood_")
        out.update({"ood_i2t_r@1": r["ood_i2t_r@1"], "ood_t2i_r@1": r["ood_t2i_r@1"]})
        if meta.get("ood_classes"):
            cls = class_embeddings(encode_texts, meta["ood_classes"], templates)
            out["ood_zs_top1"] = zeroshot_accuracy(img, cls, t["label"], ks=(1,))["top1"]
        out["ood_binding"] = binding_accuracy(img, pos, _encode(encode_texts, t["negative"]))
    return out
