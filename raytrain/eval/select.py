"""freeze-align's encoder selection: linear CKA between candidate frozen image and text
encoders on the same image-caption pairs, as a ranked table (higher CKA: the pair is
easier to align with projectors)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from raytrain.config import DataConfig, DINOv3Config, TextTeacherConfig
from raytrain.data.formats import read_file
from raytrain.data.pipeline import prepare
from raytrain.data.sources import resolve
from raytrain.data.transforms import decode_image, normalize
from raytrain.eval.cka import linear_cka
from raytrain.teachers import build_dinov3, build_text


def paired_sample(data: DataConfig, n: int) -> tuple[np.ndarray, list[str]]:
    """The first `n` decodable image-caption pairs of the training files: uint8 images
    `[n, S, S, 3]` at data.image_size and their captions."""
    src = prepare(data)
    fs, _ = resolve(src.path, data.s3)
    images, captions = [], []
    for path in src.files:
        table = read_file(fs, path, data, ["image", data.caption_column])  # any data.format
        for blob, caption in zip(table.column("image").to_pylist(), table.column(data.caption_column).to_pylist()):
            image = decode_image(blob, data.image_size)
            if image is not None and caption and caption.strip():
                images.append(image)
                captions.append(caption)
            if len(images) == n:
                return np.stack(images), captions
    if len(images) < 2:
        raise ValueError(f"{data.path}: fewer than 2 decodable image-caption pairs")
    return np.stack(images), captions


@torch.no_grad()
def encoder_table(
    data: DataConfig, images: dict[str, DINOv3Config], texts: dict[str, TextTeacherConfig], n: int = 1000
) -> pd.DataFrame:
    """One row per (image encoder, text encoder): CKA of their global embeddings (DINOv3 CLS,
    sentence embedding) on `n` pairs, best first."""
    pixels, captions = paired_sample(data, n)
    normalized = torch.from_numpy(normalize(pixels, data.mean, data.std))
    image_feats = {name: build_dinov3(cfg, data.mean, data.std)(normalized).cls for name, cfg in images.items()}
    text_feats = {name: build_text(cfg).encode(captions).cpu() for name, cfg in texts.items()}
    rows = [
        {"image_encoder": i, "text_encoder": t, "cka": float(linear_cka(x, y)), "pairs": len(captions)}
        for i, x in image_feats.items()
        for t, y in text_feats.items()
    ]
    return pd.DataFrame(rows).sort_values("cka", ascending=False, ignore_index=True)
