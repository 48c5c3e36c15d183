"""Contrastive losses (docs/methods.md#clip). Pure functions on already-gathered embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """S = logit_scale · û v̂ᵀ with û, v̂ the L2-normalized embeddings; S[i, j] = s_ij."""
    return logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE: L = ½ [CE(S, diag) + CE(Sᵀ, diag)], S = logit_scale · û v̂ᵀ.

    `logit_scale` is the multiplier exp(t) = 1/τ (OpenCLIP's convention), not its log.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
