"""Export a trained student for use without Ray or DeepSpeed: safetensors + a JSON config.

raytrain export <checkpoint dir> --out student/
model = ExportedStudent.load("student/")          # needs torch, numpy, PIL, pydantic
model.embed_images([png_bytes, ...]); model.embed_texts(["a red circle"])
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from raytrain.config import DataConfig, ModelConfig

STUDENT_WEIGHTS, STUDENT_CONFIG = "model.safetensors", "config.json"  # (a checkpoint: model.pt)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the checkpoint's student (weights, model config, preprocessing, tokenizer)."""
    from raytrain.checkpoint import load
    from raytrain.config import ConfigError, make_config
    from raytrain.data.pipeline import DataSource
    from raytrain.methods import method_class

    state, meta = load(checkpoint)
    cfg, src = meta["config"], DataSource(**meta["source"])
    # the training loop's layout: the engine's consolidated fp32 state (DDP or DeepSpeed)
    weights = state["engine"]["model"]
    if not method_class(cfg["method"]).exports_student(make_config(cfg)):  # e.g. freeze_align, dclip
        raise ConfigError(
            f"checkpoint {checkpoint}: method {cfg['method']} does not evaluate with its student alone "
            "(frozen encoders or teachers take part), so an exported student would not be the trained "
            "model; score the checkpoint in place with `raytrain eval`"
        )
    student = {k[len("student.") :]: v.float().contiguous() for k, v in weights.items() if k.startswith("student.")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = DataConfig(**cfg["data"])
    tokenizer = src.tokenizer(data)
    if src.vocabulary is None:  # a Hugging Face tokenizer directory travels with the model
        tokenizer.tok.save_pretrained(out / "tokenizer")
    save_file(student, out / STUDENT_WEIGHTS)
    (out / STUDENT_CONFIG).write_text(
        json.dumps(
            {
                "model": cfg["model"],
                "data": {k: cfg["data"][k] for k in ("image_size", "context_length", "mean", "std")},
                "tokenizer": {"vocabulary": list(src.vocabulary)}
                if src.vocabulary is not None
                else {"path": "tokenizer"},
                "vocab_size": tokenizer.vocab_size,
                "pad_id": tokenizer.pad_id,
            },
            indent=1,
        )
    )
    return out


class ExportedStudent:
    """An exported student: embeds images (encoded bytes or PIL images) and texts."""

    def __init__(self, directory: str | Path):
        from raytrain.data.transforms import HFTokenizer, WordTokenizer
        from raytrain.models.encoders import Student

        directory = Path(directory)
        self.meta = json.loads((directory / STUDENT_CONFIG).read_text())
        data = self.meta["data"]
        self.model = Student(
            ModelConfig(**self.meta["model"]),
            self.meta["vocab_size"],
            data["image_size"],
            data["context_length"],
            self.meta["pad_id"],
        )
        self.model.load_state_dict(load_file(directory / STUDENT_WEIGHTS))
        self.model.eval()
        tok = self.meta["tokenizer"]
        self.tokenizer = (
            WordTokenizer(tok["vocabulary"]) if "vocabulary" in tok else HFTokenizer(str(directory / tok["path"]))
        )

    @classmethod
    def load(cls, directory: str | Path) -> ExportedStudent:
        return cls(directory)

    @torch.no_grad()
    def embed_images(self, images) -> np.ndarray:
        from PIL import Image

        from raytrain.data.transforms import decode_image, normalize

        data = self.meta["data"]
        arrays = []
        for img in images:
            if isinstance(img, Image.Image):
                img = np.asarray(img.convert("RGB").resize((data["image_size"],) * 2, Image.BICUBIC))
            else:
                decoded = decode_image(img, data["image_size"])
                if decoded is None:
                    raise ValueError("an image does not decode")
                img = decoded
            arrays.append(img)
        pixels = torch.from_numpy(normalize(np.stack(arrays), data["mean"], data["std"]))
        return self.model.encode_image(pixels).numpy()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = torch.from_numpy(self.tokenizer(list(texts), self.meta["data"]["context_length"]))
        return self.model.encode_text(tokens).numpy()
