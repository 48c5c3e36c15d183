"""Frozen DINOv3 ViT teacher (docs/methods.md#frozen-teachers), through Hugging Face `DINOv3ViTModel`.

The teacher takes images as the data pipeline normalized them, maps them back to [0, 1],
resizes to its own resolution and re-normalizes with the model's constants, then returns
the CLS token, the last-layer patch tokens and a multi-scale stack of patch maps:

    teacher = build_dinov3(DINOv3Config(size="tiny"))  # raytrain.teachers.build_dinov3
    out = teacher(pixels)  # out.cls [B, D], out.patches [B, P, D], out.multiscale [B, L, g*g, D]

Weights are random (seeded, so every worker builds the same teacher) unless `cfg.path`
names a local directory written by `save_pretrained`, or is "embedded": the teacher that
raytrain.teachers.embedded pretrains on the embedded scenes once per machine (the stand-in
for a real pretrained DINOv3 on the embedded default); nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.teachers.weights import weights_hash

if TYPE_CHECKING:
    from transformers import DINOv3ViTModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Released DINOv3 ViTs: patch 16, MLP ratio 4, 4 register tokens. "tiny" is a CPU-test size
# whose patch 8 gives a 4x4 grid at the default 32x32 image size.
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=4, patch_size=8),
    "vits16": dict(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, patch_size=16),
    "vitb16": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, patch_size=16),
    "vitl16": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, patch_size=16),
}
SEED = 0
EMBEDDED = "embedded"  # teachers.dinov3.path: the teacher pretrained on the embedded scenes


@dataclass
class TeacherOutput:
    cls: torch.Tensor  # [B, D] final-norm CLS token
    patches: torch.Tensor  # [B, P, D] final-norm last-layer patch tokens (no CLS, no registers)
    multiscale: torch.Tensor  # [B, L, grid*grid, D] final-norm patch maps of `layers`, pooled


def default_layers(num_layers: int, n: int = 4) -> tuple[int, ...]:
    """`n` evenly spaced block indices (1-based) ending at the last: 12 -> (3, 6, 9, 12)."""
    return tuple(sorted({max(1, round(num_layers * (i + 1) / n)) for i in range(n)}))


def random_model(size: str, image_size: int) -> DINOv3ViTModel:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel  # 3 s of import: only where a teacher is built

    config = DINOv3ViTConfig(
        **VIT_SIZES[size],
        intermediate_size=4 * VIT_SIZES[size]["hidden_size"],
        num_register_tokens=4,
        image_size=image_size,
    )
    # Seed inside a forked RNG: every build gives the same weights, and the caller's global
    # RNG stream (data order, student init) is left exactly where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return DINOv3ViTModel(config)


def load_model(path: str) -> tuple[DINOv3ViTModel, tuple, tuple]:
    """A DINOv3 ViT from a local directory, with its normalization constants."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"teacher.path {path!r} does not exist or is not a directory")
    config_file = root / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type != DINOv3ViTConfig.model_type:
        raise ValueError(
            f"teacher.path {path!r} does not hold a DINOv3 ViT "
            f"(config.json model_type={model_type!r}, expected {DINOv3ViTConfig.model_type!r})"
        )
    # float32 weights: on CUDA the forward runs under bf16 autocast anyway.
    model = DINOv3ViTModel.from_pretrained(str(root), local_files_only=True, dtype=torch.float32)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = root / "preprocessor_config.json"
    if pre.is_file():
        pre_cfg = json.loads(pre.read_text())
        mean, std = tuple(pre_cfg.get("image_mean", mean)), tuple(pre_cfg.get("image_std", std))
    return model, mean, std


def describe(cfg) -> tuple[int, int, int]:
    """(hidden size, number of multi-scale layers, grid) of the configured teacher, without
    building it (a student sized to the teacher's outputs need not load its weights)."""
    if cfg.path and cfg.path != EMBEDDED:  # the embedded teacher has its size's shapes
        config = json.loads((Path(cfg.path) / "config.json").read_text())
        dim, depth = config["hidden_size"], config["num_hidden_layers"]
    else:
        dim, depth = VIT_SIZES[cfg.size]["hidden_size"], VIT_SIZES[cfg.size]["num_hidden_layers"]
    return dim, len(cfg.layers or default_layers(depth)), cfg.grid


class DINOv3Teacher(nn.Module):
    """Frozen DINOv3 ViT. Always in eval mode, never requires grad, forward under no_grad."""

    def __init__(
        self,
        cfg,
        weights: str | None = None,
        data_mean: Sequence[float] = (0.5, 0.5, 0.5),
        data_std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        """`cfg`: teachers.dinov3; `weights`: a local save_pretrained directory (raytrain.teachers.
        build_dinov3 resolves `cfg.path`, the embedded teacher included), None for random weights."""
        super().__init__()
        if weights:
            self.model, mean, std = load_model(weights)
        else:
            self.model, mean, std = random_model(cfg.size, cfg.image_size), IMAGENET_MEAN, IMAGENET_STD
        config = self.model.config
        self.image_size = cfg.image_size
        self.patch_size = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        if self.image_size % self.patch_size:
            raise ValueError(
                f"teachers.dinov3.image_size {self.image_size} is not a multiple of the patch {self.patch_size}"
            )
        self.dim = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_registers = config.num_register_tokens
        self.side = self.image_size // self.patch_size  # patch grid is side x side
        self.layers = tuple(getattr(cfg, "layers", None) or default_layers(self.num_layers))
        if not all(1 <= k <= self.num_layers for k in self.layers):
            raise ValueError(f"teacher.layers {self.layers} must lie in 1..{self.num_layers}")
        self.grid = getattr(cfg, "grid", None) or 4

        def buf(v):
            return torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)

        # Non-persistent: constants, not weights, so they stay out of state_dict/fingerprint.
        self.register_buffer("data_mean", buf(data_mean), persistent=False)
        self.register_buffer("data_std", buf(data_std), persistent=False)
        self.register_buffer("model_mean", buf(mean), persistent=False)
        self.register_buffer("model_std", buf(std), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # Frozen teacher: eval always (training mode would also turn on DINOv3's RoPE
        # coordinate augmentation and make features random).
        return super().train(False)

    def preprocess(self, pixels: torch.Tensor, mean=None, std=None) -> torch.Tensor:
        """Data-normalized images -> [0, 1] -> teacher resolution -> model-normalized."""
        mean = self.data_mean if mean is None else torch.as_tensor(mean, device=pixels.device).view(1, 3, 1, 1)
        std = self.data_std if std is None else torch.as_tensor(std, device=pixels.device).view(1, 3, 1, 1)
        x = pixels.float() * std + mean
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.model_mean) / self.model_std

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, mean=None, std=None) -> TeacherOutput:
        """`pixels` [B, 3, H, W] normalized with the data pipeline's (mean, std), which are
        the ones given at construction unless passed here."""
        x = self.preprocess(pixels, mean, std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            out = self.model(x, output_hidden_states=True)
            # hidden_states[k] is the output of block k (index 0 = embeddings), before the
            # final LayerNorm; normalize the chosen ones as the last layer is.
            stack = torch.stack([self.model.norm(out.hidden_states[k]) for k in self.layers], 1)
        first = 1 + self.num_registers  # token order: [CLS, registers, patches]
        b, n_layers = stack.shape[:2]
        maps = stack[:, :, first:].float().reshape(b * n_layers, self.side, self.side, self.dim)
        maps = F.adaptive_avg_pool2d(maps.permute(0, 3, 1, 2), self.grid)  # [B*L, D, g, g]
        multiscale = maps.flatten(2).transpose(1, 2).reshape(b, n_layers, self.grid**2, self.dim)
        last = out.last_hidden_state.float()
        return TeacherOutput(cls=last[:, 0], patches=last[:, first:], multiscale=multiscale.contiguous())

    def fingerprint(self) -> str:
        """Identifies the weights (the teacher cache keys on it with the preprocessing)."""
        return weights_hash(self.model)
