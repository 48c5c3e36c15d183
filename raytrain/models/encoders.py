"""The dual-branch student: a small ViT image tower and a small text transformer, each with
a projection head into a shared embedding space, and a learnable logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.scale import log_scale_parameter, logit_scale


def _blocks(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ImageTower(nn.Module):
    """ViT: patchify → [CLS] + patch tokens + learned positions → pre-LN blocks."""

    def __init__(self, width: int, depth: int, heads: int, patch: int, image_size: int, embed_dim: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.patchify = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, width) * 0.02)
        self.blocks = _blocks(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim, bias=False)

    def forward(
        self, pixels: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """pixels [B, 3, H, W] → (global embedding [B, E], local patch tokens [B, P, width]).

        Masked-image modelling: `mask` [B, P] (true = masked) replaces those patch embeddings
        by `mask_token` [width] before positions are added (iBOT / BEiT). The token is the
        caller's learnable parameter, so methods that never mask keep the tower's parameters
        (checkpoints, DDP's used-parameter set) as they were; without a mask nothing changes.
        """
        x = self.patchify(pixels).flatten(2).transpose(1, 2)
        if mask is not None:
            if mask_token is None or mask.shape != x.shape[:2] or mask_token.shape != x.shape[2:]:
                raise ValueError(
                    f"mask must be [B, P] = {tuple(x.shape[:2])} and mask_token [width] = {tuple(x.shape[2:])}, got "
                    f"{tuple(mask.shape)} and {None if mask_token is None else tuple(mask_token.shape)}"
                )
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0]), x[:, 1:]


def pool_tokens(tokens: Tensor, grid: int) -> Tensor:
    """Patch tokens of a square grid [B, side², d] average-pooled to [B, grid², d] (row-major),
    e.g. to match a teacher's patch grid."""
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    x = F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(b, d, side, side), grid)
    return x.flatten(2).transpose(1, 2)


class TextTower(nn.Module):
    """Token + position embeddings → pre-LN blocks → mean over non-pad tokens."""

    def __init__(
        self, width: int, depth: int, heads: int, vocab_size: int, context_length: int, embed_dim: int, pad_id: int
    ):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width)
        # Same scale as the token embeddings (nn.Embedding: std 1): with positions at 0.02 the
        # pre-LN blocks start order-blind and the text embedding stays a bag of words, so
        # attribute binding ("red cube left of blue ball" vs swapped) stays at chance.
        self.pos = nn.Parameter(torch.randn(1, context_length, width))
        self.blocks = _blocks(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim, bias=False)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, L] → (global embedding [B, E], token features [B, L, width])."""
        pad = tokens == self.pad_id
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.head(pooled), x


class Student(nn.Module):
    def __init__(self, cfg, vocab_size: int, image_size: int, context_length: int, pad_id: int = 0):
        super().__init__()
        self.image = ImageTower(
            cfg.image.width, cfg.image.depth, cfg.image.heads, cfg.image.patch, image_size, cfg.embed_dim
        )
        self.text = TextTower(
            cfg.text.width, cfg.text.depth, cfg.text.heads, vocab_size, context_length, cfg.embed_dim, pad_id
        )
        self.log_scale = log_scale_parameter(cfg.init_temperature)
        self.max_logit_scale = cfg.max_logit_scale

    def logit_scale(self) -> Tensor:
        """exp(t) = 1/τ, clamped to at most max_logit_scale (100)."""
        return logit_scale(self.log_scale, self.max_logit_scale)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.image(pixels)[0], dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.text(tokens)[0], dim=-1)

    def patch_embeddings(self, pixels: Tensor) -> Tensor:
        """Each patch token in the joint space [B, side, side, E] (row-major grid), not
        normalized: the tower's final-norm patch tokens through the head that projects its CLS
        (MaskCLIP-style dense features: the same map as the pooled output, token by token)."""
        _, tokens = self.image(pixels)
        side = math.isqrt(tokens.shape[1])
        return self.image.head(tokens).unflatten(1, (side, side))
