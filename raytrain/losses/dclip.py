"""DCLIP's student objective (docs/methods.md#dclip). Its meta-teacher is trained
with the plain symmetric InfoNCE (raytrain.losses.contrastive.clip_loss)."""

from __future__ import annotations

from torch import Tensor

from raytrain.losses.contrastive import clip_loss
from raytrain.losses.distill import cosine_distill


def dclip_student_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    teacher_emb: Tensor | None = None,
    distill_weight: float = 1.0,
    features: Tensor | None = None,
    anchor_features: Tensor | None = None,
    anchor_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_clip(u, w) + λ_d · 1/B Σ_i (1 − cos(u_i, e_i)) + λ_a · 1/B Σ_i (1 − cos(f_i, f⁰_i))

    u = image_emb [B, D] the student's image embeddings, w = text_emb [B, D] the frozen text
    encoder's, `logit_scale` = 1/τ; e = teacher_emb [B, D] the frozen meta-teacher's (None: no
    distillation, the No Teacher ablation); f = features and f⁰ = anchor_features [B, E] the
    student image encoder's output and the frozen phase-start encoder's (None: no anchor; the
    paper's ViT-L "cosine distillation preservation loss"). Teacher and anchor are detached.
    The paper's text-side cosine term (student vs teacher text embedding) is left out: both
    text sides are the same frozen encoder, so it is identically 0.
    Returns (L, parts): "clip" and, when present, "distill", "anchor", each detached.
    """
    loss = clip_loss(image_emb, text_emb, logit_scale)
    parts = {"clip": loss.detach()}
    if teacher_emb is not None:
        distill = cosine_distill(image_emb, teacher_emb)
        parts["distill"] = distill.detach()
        loss = loss + distill_weight * distill
    if anchor_features is not None:
        anchor = cosine_distill(features, anchor_features)
        parts["anchor"] = anchor.detach()
        loss = loss + anchor_weight * anchor
    return loss, parts
