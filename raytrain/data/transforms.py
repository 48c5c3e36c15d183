"""Decode, resize and normalize images; tokenize captions. Run inside Ray Data map_batches."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

WORD = re.compile(r"[a-z0-9]+")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (the embedded default's corpus).

    Ids: 0 pad, 1 begin, 2 end, 3 unknown, then the vocabulary in the given order.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, vocabulary: list[str]):
        self.words = list(dict.fromkeys(vocabulary))
        self.index = {w: i + 4 for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words) + 4

    @classmethod
    def from_corpus(cls, captions) -> WordTokenizer:
        return cls(sorted({w for c in captions for w in WORD.findall(str(c).lower())}))

    def __call__(self, texts, context_length: int) -> np.ndarray:
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.bos_id] + [self.index.get(w, self.unk_id) for w in WORD.findall(str(text).lower())]
            ids = ids[: context_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (no hub access)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.vocab_size = len(self.tok)

    def __call__(self, texts, context_length: int) -> np.ndarray:
        enc = self.tok([str(t) for t in texts], padding="max_length", truncation=True, max_length=context_length)
        return np.asarray(enc["input_ids"], dtype=np.int64)


def decode_image(data, size: int) -> np.ndarray | None:
    """RGB uint8 [size, size, 3], or None when the bytes are not a decodable image."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except Exception:  # noqa: BLE001
        # any failure on untrusted bytes is a bad row, skipped and counted; not only PIL's
        # own errors: ultralytics patches Image.open and raises ImportError (pi_heif) there
        return None


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [n, H, W, 3] → float32 [n, 3, H, W], (x/255 − mean) / std."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


class Preprocess:
    """map_batches callable: {id, image, caption[, path]} → {id, pixels, tokens, bad_image,
    empty_caption[, teacher outputs]}.

    Bad rows are kept with zero pixels and flagged, so workers count exactly what they
    skipped (Ray Data tasks cannot return counters); the train step drops flagged rows.
    With a teacher cache, each good row gets its cached outputs, joined by id within the
    cache shard of the row's file.
    """

    def __init__(self, tokenizer, cfg, cache=None):
        self.tokenizer, self.cfg, self.cache = tokenizer, cfg, cache
        self.size = cfg.image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        captions = batch[cfg.caption_column]
        decoded = [decode_image(b, self.size) for b in batch["image"]]
        bad = np.array([d is None for d in decoded])
        empty = np.array([c is None or not str(c).strip() for c in captions])
        blank = np.zeros((self.size, self.size, 3), np.uint8)
        images = (
            np.stack([blank if d is None else d for d in decoded])
            if decoded
            else np.zeros((0, self.size, self.size, 3), np.uint8)
        )
        ids = np.asarray(batch["id"]).astype(str)  # integer ids: their decimal strings, as formats.normalize
        out = {
            "id": ids,
            "pixels": normalize(images, cfg.mean, cfg.std),
            "tokens": self.tokenizer(["" if c is None else c for c in captions], cfg.context_length),
            "bad_image": bad,
            "empty_caption": empty & ~bad,  # each skipped row counted under one reason
        }
        for column in cfg.extra_captions:
            out[f"tokens_{column}"] = self.tokenizer(
                ["" if c is None else c for c in batch[column]], cfg.context_length
            )
        if self.cache is not None:
            out.update(self.teacher_outputs(ids, np.asarray(batch["path"]), ~(bad | empty)))
        return out

    def teacher_outputs(self, ids, paths, good) -> dict[str, np.ndarray]:
        """Cached outputs per row; zeros for skipped rows, which the cache does not hold."""
        out = {name: np.zeros((len(ids), *shape), np.float32) for name, shape in self.cache.shapes.items()}
        for path in np.unique(paths[good]):
            rows = np.flatnonzero(good & (paths == path))
            for name, value in self.cache.lookup(str(path), ids[rows]).items():
                out[name][rows] = value
        return out
