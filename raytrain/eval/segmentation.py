"""Zero-shot semantic segmentation: mean IoU, the datasets it is scored on, and the scorer.

    miou(pred, target, num_classes)          IoU per class over the whole set, and their mean
    voc_segmentation(root, classnames)       Pascal VOC's layout                  -> Segmentation
    embedded_segmentation(eval_dir)          the embedded default's split         -> Segmentation
    zeroshot_segmentation(patches, texts, data, templates)   patch–prompt argmax, upsampled, scored

A model segments zero-shot as MaskCLIP does: every patch token is mapped into the joint
image–text space (`Method.encode_patches`), each class is a prompt-ensemble text embedding
(raytrain.eval.zeroshot.class_embeddings), a patch's class scores are its cosine to each class,
those logits are upsampled bilinearly to the mask's size and each pixel takes its argmax.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from raytrain.eval import templates as standard
from raytrain.eval.datasets import TEMPLATES, DatasetError, ImageFiles, _check_exist, _read_json
from raytrain.eval.zeroshot import class_embeddings

IGNORE_INDEX = 255
# Pascal VOC 2012's 21 classes in label order, spelled as prompts read them ("diningtable",
# "pottedplant" and "tvmonitor" in VOC's own files).
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
)
MASK_MODES = ("P", "L", "I", "I;16")  # palette or single-channel class indices; never colours
_CHUNK = 256


# ---------------------------------------------------------------- the metric
def _integers(x, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
    return a


def confusion(pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Pixel counts [num_classes, num_classes], row = target class, column = predicted class,
    over the pixels whose target is not `ignore_index`. `pred` and `target` are integer arrays
    (numpy or torch) of one shape; a label outside [0, num_classes) (target: other than
    ignore_index; pred: at a scored pixel) is a ValueError naming it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is one of the {num_classes} classes")
    p, t = _integers(pred, "pred"), _integers(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {list(p.shape)} but target has shape {list(t.shape)}")
    keep = t != ignore_index if ignore_index is not None else np.ones(t.shape, bool)
    p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
    for name, a in (("target", t), ("pred", p)):
        bad = (a < 0) | (a >= num_classes)
        if bad.any():
            ignored = (
                f" other than ignore_index {ignore_index}" if name == "target" and ignore_index is not None else ""
            )
            raise ValueError(
                f"{name} has labels outside [0, {num_classes}){ignored}: {sorted(set(a[bad].tolist()))[:5]} "
                f"({int(bad.sum())} pixels)"
            )
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_scores(conf: np.ndarray) -> dict:
    """{"miou", "per_class_iou"} of a confusion matrix (rows target, columns pred).

    IoU_c = TP_c / (TP_c + FP_c + FN_c) over every counted pixel; a class absent from both
    prediction and target (TP + FP + FN = 0) is NaN and left out of the mean; a class only
    predicted, or only in the target, is 0 and counts."""
    conf = np.asarray(conf, np.int64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    if not union.any():
        raise ValueError("no pixels to score (every target pixel is ignore_index, or there are none)")
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)), "per_class_iou": [float(v) for v in iou]}


def miou(pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> dict:
    """Mean IoU of integer label arrays `pred` and `target` [N, H, W] (numpy or torch):
    {"miou": mean over the classes present in either, "per_class_iou": [num_classes] with NaN
    for a class in neither}; pixels whose target is `ignore_index` are not counted. IoU is per
    class over the whole set (TP, FP, FN summed over all images), not averaged per image."""
    return iou_scores(confusion(pred, target, num_classes, ignore_index))


# ---------------------------------------------------------------- datasets
@dataclass
class Segmentation:
    images: Sequence  # encoded bytes or RGB PIL images
    masks: Sequence  # int64 [H, W] class indices per pixel (ignore_index = unlabelled), read when indexed
    classes: list[str]
    templates: tuple[str, ...]  # the dataset's standard prompt ensemble
    ignore_index: int = IGNORE_INDEX


class Masks(Sequence):
    """Mask PNGs (paths or encoded bytes) decoded to class-index arrays when indexed;
    `entries[i]` says where mask i was listed."""

    def __init__(self, sources: Sequence, entries: Sequence[str]):
        self.sources, self.entries = sources, entries

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        source = self.sources[i]
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                if img.mode not in MASK_MODES:
                    raise DatasetError(
                        f"{self.entries[i]}: a {img.mode} image, not a class-index mask "
                        "(a palette or single-channel PNG whose values are class indices)"
                    )
                return np.asarray(img).astype(np.int64)  # a palette image's values are its indices
        except DatasetError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure on untrusted bytes)
            raise DatasetError(f"{self.entries[i]}: not a readable mask: {e}") from None


def embedded_segmentation(eval_dir) -> Segmentation | None:
    """The embedded default's segmentation split (segmentation.parquet: id, image, mask PNG;
    segmentation.json: classes, templates, ignore_index), None if either is absent."""
    eval_dir = Path(eval_dir)
    path, meta_path = eval_dir / "segmentation.parquet", eval_dir / "segmentation.json"
    if not path.exists() or not meta_path.exists():
        return None
    meta = _read_json(meta_path, "segmentation class file")
    if not isinstance(meta, dict) or not meta.get("classes"):
        raise DatasetError(f"{meta_path}: no 'classes' list")
    t = pq.read_table(path, columns=["id", "image", "mask"]).to_pydict()
    entries = [f"{path} row {i} ({name})" for i, name in enumerate(t["id"])]
    return Segmentation(
        t["image"],
        Masks(t["mask"], entries),
        list(meta["classes"]),
        tuple(meta.get("templates") or TEMPLATES),
        int(meta.get("ignore_index", IGNORE_INDEX)),
    )


def voc_segmentation(root, classnames=None, split: str = "val") -> Segmentation:
    """Pascal VOC's layout under `root` (VOCdevkit/VOC2012 or any folder laid out like it):
    ImageSets/Segmentation/<split>.txt lists image ids, one a line; JPEGImages/<id>.jpg is the
    image and SegmentationClass/<id>.png its mask (palette or single-channel PNG of class
    indices, 255 = ignore: VOC's object boundaries). Class names from `classnames` (a text
    file, one name a line in label order, or a JSON list) or VOC's 21 (VOC_CLASSES). Every
    listed file must exist, and each mask must have its image's size; checked before any
    model runs. Prompts: the ImageNet ensemble."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"{root}: no ImageSets/Segmentation/{split}.txt (expected Pascal VOC's layout)")
    ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{listing}: lists no images")
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    masks = [root / "SegmentationClass" / f"{i}.png" for i in ids]
    entries = [f"{listing} line {n + 1} ({i})" for n, i in enumerate(ids)]
    _check_exist(images, entries)
    _check_exist(masks, entries)
    for image, mask, entry in zip(images, masks, entries):
        try:
            with Image.open(image) as a, Image.open(mask) as b:  # headers only
                sizes = a.size, b.size
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"{image} or {mask}: not a readable image ({entry}): {e}") from None
        if sizes[0] != sizes[1]:
            raise DatasetError(
                f"{mask}: mask is {sizes[1][0]}x{sizes[1][1]} but its image is {sizes[0][0]}x{sizes[0][1]} ({entry})"
            )
    names = _names(Path(classnames)) if classnames else list(VOC_CLASSES)
    return Segmentation(
        ImageFiles(images, entries),
        Masks(masks, [f"{m} ({e})" for m, e in zip(masks, entries)]),
        names,
        standard.IMAGENET,
    )


def _names(path: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        names = _read_json(path, "class names file")
    elif path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise DatasetError(f"{path}: class names file does not exist")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise DatasetError(f"{path}: expected a non-empty list of class names, one per label in order")
    return [n.strip() for n in names]


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def zeroshot_segmentation(
    encode_patches: Callable[[list], torch.Tensor | None],
    encode_texts: Callable[[list[str]], torch.Tensor],
    data: Segmentation,
    templates: Sequence[str],
    batch_size: int = _CHUNK,
    desc: str | None = None,
) -> dict | None:
    """{"miou", "per_class_iou"} (iou_scores over the whole set) of zero-shot segmentation, or
    None when `encode_patches` gives None (a model without patch tokens).

    encode_patches: images -> patch embeddings [B, h, w, E] in encode_texts' space. With
    p the L2-normalized patch embedding and w_c the class embeddings of `templates`, the logits
    s_c = cos(p, w_c) [C, h, w] of each image are resized bilinearly (align_corners=False) to its
    mask's [H, W] and each pixel predicts argmax_c (the first of equal maxima). A mask label
    outside [0, C) other than data.ignore_index raises DatasetError naming the mask."""
    n, classes = len(data.images), len(data.classes)
    conf, cls = np.zeros((classes, classes), np.int64), None
    bar = tqdm(total=n, desc=desc and f"{desc}: images", unit="item", disable=desc is None)
    for a in range(0, n, batch_size):
        patches = encode_patches(list(data.images[a : a + batch_size]))
        if patches is None:
            bar.close()
            return None
        if cls is None:  # after the first batch: a model without patches encodes no prompts
            cls = class_embeddings(encode_texts, data.classes, templates).to(patches.device)
        logits = torch.einsum("bhwe,ce->bchw", F.normalize(patches.float(), dim=-1), cls)
        for j, (z, mask) in enumerate(zip(logits, data.masks[a : a + batch_size])):
            up = F.interpolate(z[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
            try:
                conf += confusion(up.argmax(0).cpu().numpy(), mask, classes, data.ignore_index)
            except ValueError as e:
                where = getattr(data.masks, "entries", None)
                raise DatasetError(f"{where[a + j] if where else f'mask {a + j}'}: {e}") from None
        bar.update(len(logits))
    bar.close()
    return iou_scores(conf)
