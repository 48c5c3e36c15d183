"""Evaluation datasets in their standard on-disk formats, read into what the suite scores.

    karpathy(root, annotations)        COCO / Flickr30k Karpathy test split      -> Retrieval
    image_folder(root, classnames)     ImageNet-style root/<class folder>/*.JPEG -> Classification
    cifar(root, "cifar10"|"cifar100")  the python-pickle test batch              -> Classification
    embedded_retrieval / embedded_zeroshot(eval_dir)   the embedded default's splits

Image files are read when the suite asks for a batch (ImageNet's 50,000 validation images
are never all in memory) and decoded to RGB PIL images; a file that is missing or does not
decode raises DatasetError naming the file and its entry, as does any malformed annotation.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from raytrain.data.schema import SchemaError
from raytrain.eval import templates as standard
from raytrain.eval.zeroshot import TEMPLATES

KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr30k.json")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# format: (extracted directory, test file, meta file, label key, class-name key)
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", "test", "meta", b"fine_labels", b"fine_label_names"),
}
_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL, so a batch reads in parallel


class DatasetError(SchemaError):
    """Evaluation data that cannot be read; the message names the file and the entry."""


@dataclass
class Retrieval:
    images: Sequence  # one per image: encoded bytes or an RGB PIL image
    captions: list[str]
    owner: list[int]  # index into `images` of each caption's image (several captions per image)


@dataclass
class Classification:
    images: Sequence  # encoded bytes or RGB PIL images
    labels: list[int]  # index into `classes`
    classes: list[str]
    templates: tuple[str, ...]  # the dataset's standard prompt ensemble


class ImageFiles(Sequence):
    """Image files decoded when indexed; `entries[i]` says where file i was listed."""

    def __init__(self, paths: list[Path], entries: list[str]):
        self.paths, self.entries = paths, entries

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            with ThreadPoolExecutor(_THREADS) as pool:
                return list(pool.map(self._read, range(*i.indices(len(self)))))
        return self._read(i)

    def _read(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"{path}: image file not found ({self.entries[i]})") from None
        except Exception as e:  # noqa: BLE001  (any failure on untrusted bytes: see transforms.decode_image)
            raise DatasetError(f"{path}: not a readable image ({self.entries[i]}): {e}") from None


class ArrayImages(Sequence):
    """uint8 [n, H, W, 3] images, as RGB PIL images when indexed."""

    def __init__(self, arrays: np.ndarray):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [Image.fromarray(a) for a in self.arrays[i]]
        return Image.fromarray(self.arrays[i])


def karpathy(root, annotations=None, split: str = "test") -> Retrieval:
    """The `split` of a Karpathy caption file,
    {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": caption}, ...]}]}.

    Image i is root/filepath/filename (COCO: val2014/COCO_val2014_….jpg) or root/filename
    (Flickr30k). `annotations` None = dataset_coco.json or dataset_flickr30k.json in root.
    Every sentence's "raw" text is a caption of its image (five per image; a few COCO images
    have six or seven), and an image counts as retrieved when any of its captions is.
    """
    root = Path(root)
    if annotations is None:
        found = [root / name for name in KARPATHY_FILES if (root / name).is_file()]
        if not found:
            raise DatasetError(
                f"{root}: no {' or '.join(KARPATHY_FILES)} in it; name the Karpathy caption file (annotations)"
            )
        annotations = found[0]
    ann = Path(annotations)
    data = _read_json(ann, "Karpathy caption file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f'{ann}: not a Karpathy caption file (expected {{"images": [...]}} at the top level)')
    paths, entries, captions, owner = [], [], [], []
    for i, entry in enumerate(data["images"]):
        where = f"{ann} images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            raise DatasetError(f"{where}: not an image entry with a 'split'")
        if entry["split"] != split:
            continue
        name, folder = entry.get("filename"), entry.get("filepath", "")
        if not isinstance(name, str) or not name or not isinstance(folder, str):
            raise DatasetError(f"{where}: 'filename' (and 'filepath', if given) must be non-empty strings")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise DatasetError(f"{where} ({name}): no 'sentences'")
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                raise DatasetError(f"{where} ({name}): sentences[{j}] has no 'raw' caption")
            captions.append(raw.strip())
            owner.append(len(paths))
        paths.append(root / folder / name)
        entries.append(where)
    if not paths:
        raise DatasetError(f"{ann}: no images with split {split!r}")
    _check_exist(paths, entries)
    return Retrieval(ImageFiles(paths, entries), captions, owner)


def image_folder(root, classnames=None) -> Classification:
    """root/<class folder>/<image>: class c is the c-th folder in sorted order (torchvision's
    ImageFolder numbering), images are the files ending in IMAGE_SUFFIXES, any case.

    Class names are the folder names, or from `classnames`: a JSON {folder: name} or [name of
    each folder in sorted order], or a text file with one name per line in sorted folder
    order, or "folder name" lines (ImageNet's LOC_synset_mapping.txt).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder does not exist")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    names = _class_names(Path(classnames), folders, root) if classnames else folders
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for f in sorted((root / folder).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                paths.append(f)
                labels.append(label)
    if not paths:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its {len(folders)} class folders")
    entries = [f"class folder {p.parent.name!r}" for p in paths]
    return Classification(ImageFiles(paths, entries), labels, names, standard.IMAGENET)


def cifar(root, which: str) -> Classification:
    """The CIFAR-10 / CIFAR-100 test set in the python pickle format.

    `root` is the extracted directory (cifar-10-batches-py: test_batch + batches.meta;
    cifar-100-python: test + meta) or the one holding it. Dictionaries have bytes keys;
    b"data" is uint8 [N, 3072], each row the 32×32 red plane, then green, then blue, row-major.
    Class names are written as OpenAI's prompts write them (CIFAR-100's "aquarium_fish" →
    "aquarium fish"). Only numpy arrays are unpickled: a pickle naming anything else could
    run code, so it is refused.
    """
    folder, test_file, meta_file, label_key, names_key = CIFAR_FILES[which]
    root = Path(root)
    if (root / folder).is_dir():
        root = root / folder
    test, meta = root / test_file, root / meta_file
    batch, info = _unpickle(test, folder), _unpickle(meta, folder)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _entry(info, names_key, meta)]
    data = np.asarray(_entry(batch, b"data", test))
    labels = np.asarray(_entry(batch, label_key, test))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{test}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetError(
            f"{test}: {label_key!r} must hold one integer per image ({len(data)}), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if len(bad):
        raise DatasetError(
            f"{test}: {label_key!r}[{bad[0]}] = {labels[bad[0]]} is not a class of {meta} ({len(names)} names)"
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Classification(ArrayImages(images), labels.tolist(), [n.replace("_", " ") for n in names], standard.CIFAR)


def read_split(eval_dir, name: str) -> dict[str, list] | None:
    """An embedded evaluation split (eval_dir/<name>.parquet) as columns, None if absent."""
    path = Path(eval_dir) / f"{name}.parquet"
    return pq.read_table(path).to_pydict() if path.exists() else None


def read_classes(eval_dir) -> dict:
    """eval_dir/classes.json ({"classes", "templates", "ood_classes"}), {} if absent."""
    path = Path(eval_dir) / "classes.json"
    return _read_json(path, "class file") if path.exists() else {}


def group_captions(ids: list, captions: list) -> tuple[list[int], list[str], list[int]]:
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
    return rows, texts, owner


def embedded_retrieval(eval_dir) -> Retrieval | None:
    """The embedded retrieval split (PNG bytes, captions grouped by id), None if absent.
    Rows with different ids are different images even when their captions are the same
    text; the suite (`raytrain.eval.suite.retrieval`) scores such a text once, with all
    its images as matches."""
    if (t := read_split(eval_dir, "retrieval")) is None:
        return None
    rows, texts, owner = group_captions(t["id"], t["caption"])
    return Retrieval([t["image"][r] for r in rows], texts, owner)


def embedded_zeroshot(eval_dir) -> Classification | None:
    """The embedded zero-shot split with classes.json's classes and templates, None if absent."""
    t, meta = read_split(eval_dir, "zeroshot"), read_classes(eval_dir)
    if t is None or not meta.get("classes"):
        return None
    return Classification(t["image"], list(t["label"]), meta["classes"], tuple(meta.get("templates") or TEMPLATES))


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise DatasetError(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def _check_exist(paths: list[Path], entries: list[str]) -> None:
    """Fail before any model runs when images are missing (not an hour into the split)."""
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        i = missing[0]
        raise DatasetError(
            f"{paths[i]}: image file not found ({entries[i]}; {len(missing)} of {len(paths)} images missing)"
        )


def _class_names(path: Path, folders: list[str], root: Path) -> list[str]:
    if path.suffix.lower() == ".json":
        data = _read_json(path, "class names file")
        if not isinstance(data, dict | list):
            raise DatasetError(f"{path}: expected a JSON object {{folder: name}} or a list of names")
        mapping = data if isinstance(data, dict) else None
        names = data if isinstance(data, list) else None
    else:
        if not path.is_file():
            raise DatasetError(f"{path}: class names file does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        pairs = [line.split(None, 1) for line in lines]
        known = set(folders)
        is_mapping = bool(pairs) and all(len(p) == 2 and p[0] in known for p in pairs)
        mapping = dict(pairs) if is_mapping else None
        names = None if is_mapping else lines
    if mapping is not None:
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DatasetError(
                f"{path}: no name for class folder {missing[0]!r} of {root} "
                f"({len(missing)} of {len(folders)} folders have none)"
            )
        names = [mapping[f] for f in folders]
    if len(names) != len(folders):
        raise DatasetError(f"{path}: {len(names)} class names for the {len(folders)} class folders of {root}")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise DatasetError(f"{path}: the name of class folder {folders[i]!r} is empty or not a string")
    return [n.strip() for n in names]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what the CIFAR files hold (dicts, lists, bytes, numpy arrays) and nothing else;
    also as Python 3 re-saves them (bytes via _codecs.encode at protocol 2, arrays via
    _frombuffer at protocol 5)."""

    ALLOWED = {(f"numpy{m}.multiarray", n) for m in (".core", "._core") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {(f"numpy{m}.numeric", "_frombuffer") for m in (".core", "._core")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(path: Path, folder: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="bytes").load()  # the files are Python 2 pickles
    except FileNotFoundError:
        raise DatasetError(f"{path}: CIFAR file not found (expected the extracted {folder}/ directory)") from None
    except Exception as e:  # noqa: BLE001  (a truncated or foreign pickle raises many kinds)
        raise DatasetError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a CIFAR python pickle (holds a {type(data).__name__}, not a dict)")
    return data


def _entry(d: dict, key: bytes, path: Path):
    """d[key]; files re-saved by Python 3 tools may have str keys."""
    for k in (key, key.decode()):
        if k in d:
            return d[k]
    raise DatasetError(f"{path}: no {key!r} entry (it has {sorted(map(str, d))})")
