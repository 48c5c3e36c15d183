"""Scoring an embedding model: retrieval and zero-shot tasks on any dataset of
raytrain.eval.datasets, and the full suite on the embedded default's evaluation splits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from raytrain.eval.datasets import (
    Classification,
    Retrieval,
    embedded_retrieval,
    embedded_zeroshot,
    read_classes,
    read_split,
)
from raytrain.eval.probes import binding_accuracy, modality_gap
from raytrain.eval.retrieval import retrieval_metrics
from raytrain.eval.segmentation import embedded_segmentation, zeroshot_segmentation
from raytrain.eval.zeroshot import TEMPLATES, class_embeddings, zeroshot_accuracy

_CHUNK = 256
_ROW_CHUNK = 4096  # image rows scored against all classes at once


def _encode(
    fn: Callable[[list], torch.Tensor], items: Sequence, batch_size: int = _CHUNK, desc: str | None = None
) -> torch.Tensor:
    """L2-normalized float embeddings of `items`, encoded `batch_size` at a time; with a
    `desc`, a progress bar counts the items."""
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=desc is None)
    out = []
    for i in range(0, len(items), batch_size):
        batch = list(items[i : i + batch_size])
        out.append(fn(batch).float())
        bar.update(len(batch))
    bar.close()
    return F.normalize(torch.cat(out), dim=-1)


def _match(
    captions: Sequence[str], owner: Sequence[int], n_images: int
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(distinct caption texts in first-seen order, each caption row's index among them,
    positives [n_images, texts]): image i and text t match when some row gives image i the
    caption t. Identical texts embed identically, so scoring each copy against its own image
    alone would fail all copies but one by the tie-break; as one caption whose matches are
    all its images, each is scored once (a split of 200 images with 40 captions has 40)."""
    index: dict[str, int] = {}
    row_text = torch.as_tensor([index.setdefault(c, len(index)) for c in captions], dtype=torch.long)
    pos = torch.zeros(n_images, len(index), dtype=torch.bool)
    pos[torch.as_tensor(owner, dtype=torch.long), row_text] = True
    return list(index), row_text, pos


def _retrieval(img: torch.Tensor, txt: torch.Tensor, pos: torch.Tensor, prefix: str, ks=(1, 5, 10)) -> dict[str, float]:
    """Both directions: image queries over the texts (found when any of its captions is in
    the top K), text queries over the images (found when any image it captions is);
    `pos[i, t]`: text t is a caption of image i (`_match`)."""
    sim = img @ txt.T
    if pos.shape[0] == pos.shape[1] and torch.equal(pos, torch.eye(len(pos), dtype=torch.bool)):
        pos = None  # one caption per image, in order: retrieval_metrics' diagonal
    i2t = retrieval_metrics(sim, ks, positives=pos)
    t2i = retrieval_metrics(sim.T, ks, positives=None if pos is None else pos.T)
    return {**{f"{prefix}i2t_{k}": v for k, v in i2t.items()}, **{f"{prefix}t2i_{k}": v for k, v in t2i.items()}}


@torch.no_grad()
def retrieval(
    encode_images, encode_texts, data: Retrieval, batch_size: int = _CHUNK, ks=(1, 5, 10), desc: str | None = None
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """(metrics, image embeddings, caption embeddings, one per caption row) of image↔text retrieval.

    Keys i2t_r@K, i2t_map (image queries over the distinct caption texts) and t2i_r@K,
    t2i_map (each distinct caption text a query over all images); an image query is found
    at K when any of its captions is in the top K, a caption query when any image it
    captions is (`_match`: a text several images share is one caption with several
    matches). retrieval_images, retrieval_captions: how many images and distinct caption
    texts were scored (ints).
    """
    texts, row_text, pos = _match(data.captions, data.owner, len(data.images))
    img = _encode(encode_images, data.images, batch_size, desc and f"{desc}: images")
    txt = _encode(encode_texts, texts, batch_size, desc and f"{desc}: captions")
    metrics = _retrieval(img, txt, pos, "", ks)
    metrics.update(retrieval_images=len(img), retrieval_captions=len(texts))
    return metrics, img, txt[row_text.to(txt.device)]


@torch.no_grad()
def zeroshot(
    encode_images,
    encode_texts,
    data: Classification,
    templates: Sequence[str],
    batch_size: int = _CHUNK,
    desc: str | None = None,
) -> dict[str, float]:
    """top1, top5 (zeroshot_accuracy over class_embeddings of `templates`) and
    mean_per_class_recall = mean over the classes present in the labels of the fraction of
    their images whose top-1 class is theirs (ties broken by class index, as for top1)."""
    img = _encode(encode_images, data.images, batch_size, desc and f"{desc}: images")
    bar = tqdm(
        total=len(data.classes) * len(templates), desc=desc and f"{desc}: prompts", unit="item", disable=desc is None
    )

    def prompts(texts: list[str]) -> torch.Tensor:
        bar.update(len(texts))
        return encode_texts(texts)

    cls = class_embeddings(prompts, data.classes, templates)
    bar.close()
    out = zeroshot_accuracy(img, cls, data.labels, ks=(1, 5))
    labels = torch.as_tensor(data.labels, dtype=torch.long, device=img.device)
    pred = torch.cat([(img[a : a + _ROW_CHUNK] @ cls.T).argmax(1) for a in range(0, len(img), _ROW_CHUNK)])  # first max
    present = labels.unique()
    out["mean_per_class_recall"] = torch.stack([(pred[labels == c] == c).float().mean() for c in present]).mean().item()
    return out


@torch.no_grad()
def evaluate(
    encode_images: Callable[[list[bytes]], torch.Tensor],
    encode_texts: Callable[[list[str]], torch.Tensor],
    eval_dir,
    encode_patches: Callable[[list[bytes]], torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Evaluate an embedding model on `eval_dir`'s splits; returns flat metrics.

    encode_images: list of PNG bytes -> [n, d]; encode_texts: list of str -> [n, d]
    (outputs are L2-normalized here); encode_patches: list of PNG bytes -> patch embeddings
    [n, h, w, d] or None (no patch tokens). Splits whose file is missing are skipped.
    Keys: i2t_/t2i_ r@1, r@5, r@10, map, gap, separability, retrieval_images,
    retrieval_captions (retrieval.parquet; `retrieval`);
    zs_top1, zs_top5 (zeroshot.parquet, classes with the file's templates);
    binding (binding.parquet); ood_i2t_r@1, ood_t2i_r@1, ood_zs_top1 (over ood_classes),
    ood_binding (ood.parquet); mean_r@1 = (i2t_r@1 + t2i_r@1) / 2, the headline metric;
    seg_miou (segmentation.parquet, with patches: raytrain.eval.segmentation).
    """
    eval_dir = Path(eval_dir)
    meta = read_classes(eval_dir)
    templates = meta.get("templates") or TEMPLATES
    out: dict[str, float] = {}

    if (data := embedded_retrieval(eval_dir)) is not None:
        metrics, img, txt = retrieval(encode_images, encode_texts, data)
        out.update(metrics)
        out.update(
            modality_gap(img[torch.as_tensor(data.owner, device=img.device)], txt)
        )  # each caption paired with its image
        out["mean_r@1"] = (out["i2t_r@1"] + out["t2i_r@1"]) / 2

    if (data := embedded_zeroshot(eval_dir)) is not None:
        acc = zeroshot(encode_images, encode_texts, data, data.templates)
        out.update({"zs_top1": acc["top1"], "zs_top5": acc["top5"]})

    if (t := read_split(eval_dir, "binding")) is not None:
        img = _encode(encode_images, t["image"])
        out["binding"] = binding_accuracy(
            img, _encode(encode_texts, t["caption"]), _encode(encode_texts, t["negative"])
        )

    if (t := read_split(eval_dir, "ood")) is not None:
        texts, row_text, match = _match(t["caption"], range(len(t["image"])), len(t["image"]))
        img, txt = _encode(encode_images, t["image"]), _encode(encode_texts, texts)
        pos = txt[row_text.to(txt.device)]  # each row's own caption
        r = _retrieval(img, txt, match, "ood_")
        out.update({"ood_i2t_r@1": r["ood_i2t_r@1"], "ood_t2i_r@1": r["ood_t2i_r@1"]})
        if meta.get("ood_classes"):
            cls = class_embeddings(encode_texts, meta["ood_classes"], templates)
            out["ood_zs_top1"] = zeroshot_accuracy(img, cls, t["label"], ks=(1,))["top1"]
        out["ood_binding"] = binding_accuracy(img, pos, _encode(encode_texts, t["negative"]))
    out.update(_segmentation(encode_patches, encode_texts, eval_dir))
    return out


def _segmentation(encode_patches, encode_texts, eval_dir: Path) -> dict[str, float]:
    """seg_miou of the embedded segmentation split, {} without the split or without patches."""
    if encode_patches is None or (data := embedded_segmentation(eval_dir)) is None:
        return {}
    scores = zeroshot_segmentation(encode_patches, encode_texts, data, data.templates)
    return {} if scores is None else {"seg_miou": scores["miou"]}
