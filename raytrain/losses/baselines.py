"""Baseline losses (docs/methods.md#cyclip, #alip): CyCLIP and ALIP. Pure functions on already-gathered
embeddings, plus ALIP's small stateful EMA helper.

Notation follows docs/methods.md#notation-and-the-student: in CyCLIP, `u` are image and `v` text embeddings (both
L2-normalized); in the ALIP item, `v` is the IMAGE embedding and `t_r`, `t_c` are the raw
and synthetic caption embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.losses.contrastive import clip_logits, clip_loss


def per_sample_clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Per-pair symmetric InfoNCE, `[B]`: ℓ_i = ½ [CE(S_i·, i) + CE(S_·i, i)], S = logit_scale · û v̂ᵀ.

    ℓ_i pairs image i's row (image→text) with text i's row (text→image); mean(ℓ) = clip_loss.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    i2t = F.cross_entropy(logits, labels, reduction="none")
    t2i = F.cross_entropy(logits.T, labels, reduction="none")
    return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------- CyCLIP


def cyclip_regularizers(image_emb: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor]:
    """CyCLIP's cyclic-consistency regularizers on û = normalize(image), v̂ = normalize(text):

        in_modal    = (1/B) Σ_jk (u_j·u_k − v_j·v_k)²
        cross_modal = (1/B) Σ_jk (u_j·v_k − u_k·v_j)²

    Raw cosines, no logit scale. CyCLIP's official code (goel-shashank/CyCLIP,
    src/train.py) builds the matrices from `logit_scale.exp() · …`, takes `.square().mean()`,
    then divides by `logit_scale.exp()²` and multiplies by the batch size: the scale cancels
    exactly and `mean · B = (1/B) Σ_jk`, i.e. the same value as the formula in docs/methods.md#cyclip, which
    is what this function computes. (Their embeddings are normalized by the model.)
    """
    b = image_emb.shape[0]
    u, v = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    in_modal = (u @ u.T - v @ v.T).square().sum() / b
    s = u @ v.T
    cross_modal = (s - s.T).square().sum() / b
    return in_modal, cross_modal


def cyclip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    lambda_in: float = 0.25,
    lambda_cross: float = 0.25,
) -> Tensor:
    """CyCLIP: L = L_clip + λ₁ · in_modal + λ₂ · cross_modal (see `cyclip_regularizers`)."""
    in_modal, cross_modal = cyclip_regularizers(image_emb, text_emb)
    return clip_loss(image_emb, text_emb, logit_scale) + lambda_in * in_modal + lambda_cross * cross_modal


# ----------------------------------------------------------------------------- ALIP


class ALIPWeights(nn.Module):
    """ALIP's gates (Language / Description Consistency Gates) with their EMA means.

    Buffers `m_a` (raw↔synthetic caption cosine), `m_b` (raw caption↔image), `m_c`
    (synthetic caption↔image): EMA of the batch-mean cosines, m ← μ·m + (1 − μ)·mean(cos),
    μ = 0.99, never differentiated. Buffers, so they live in `state_dict` (checkpoints) and
    DDP's buffer broadcast. Weights (all computed without grad):

        W_s = min(1, exp(λ(cos(t_r, t_c) − m_a)))      sample weight (LCG)
        W_r = exp(λ(cos(t_r, v) − m_b))                 raw pair weight (DCG)
        W_c = exp(λ(cos(t_c, v) − m_c))                 synthetic pair weight (DCG)

    with λ = 2 (`scale`) and v the IMAGE embedding.

    Conventions, following ALIP's official code (deepglint/ALIP, train.py):
    - The EMA is updated FIRST, with the current batch's mean, and the weights use the
      updated means (`momentum_sim = 0.01·cur_mean + 0.99·momentum_sim; w = exp(cur − m)²`).
    - The means start at 1.0 (`init`), as there (`momentum_sim_raw, … = 1, 1, 1`).
    - The official code also forces W_r = W_c = 1 for samples whose ungated LCG value is ≥ 1
      (`torch.where(weight_sample_raw < 1, weight_raw, 1)`); docs/methods.md#alip does not, so it is
      off by default and available as `gate_pairs_by_sample=True` (alip.gate_pairs_by_sample).
    - Under data parallelism, feed the all-gathered embeddings (as the official code does),
      so every rank computes the same means and the buffers stay identical across ranks.
    The EMA updates only when `update` is true (default: `self.training`), so evaluation
    and gradient checks leave the state alone.
    """

    m_a: Tensor
    m_b: Tensor
    m_c: Tensor

    def __init__(
        self, momentum: float = 0.99, scale: float = 2.0, init: float = 1.0, gate_pairs_by_sample: bool = False
    ):
        super().__init__()
        self.momentum, self.scale, self.gate_pairs_by_sample = momentum, scale, gate_pairs_by_sample
        for name in ("m_a", "m_b", "m_c"):
            self.register_buffer(name, torch.tensor(float(init)))

    @torch.no_grad()
    def update(self, cos_a: Tensor, cos_b: Tensor, cos_c: Tensor) -> None:
        """m ← μ·m + (1 − μ)·mean(cos) for each of the three means (in place)."""
        for buf, cos in ((self.m_a, cos_a), (self.m_b, cos_b), (self.m_c, cos_c)):
            buf.mul_(self.momentum).add_((1 - self.momentum) * cos.detach().mean().to(buf.dtype))

    @torch.no_grad()
    def forward(
        self, cos_a: Tensor, cos_b: Tensor, cos_c: Tensor, update: bool | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample cosines `[B]` (a: t_r↔t_c, b: t_r↔v, c: t_c↔v) → (W_s, W_r, W_c), each `[B]`."""
        if self.training if update is None else update:
            self.update(cos_a, cos_b, cos_c)
        cos_a, cos_b, cos_c = cos_a.detach(), cos_b.detach(), cos_c.detach()
        ws_raw = torch.exp(self.scale * (cos_a - self.m_a))
        w_s = ws_raw.clamp(max=1.0)
        w_r = torch.exp(self.scale * (cos_b - self.m_b))
        w_c = torch.exp(self.scale * (cos_c - self.m_c))
        if self.gate_pairs_by_sample:
            saturated = ws_raw >= 1
            w_r, w_c = w_r.masked_fill(saturated, 1.0), w_c.masked_fill(saturated, 1.0)
        return w_s, w_r, w_c


def alip_loss(
    image_emb: Tensor,
    raw_text_emb: Tensor,
    syn_text_emb: Tensor,
    logit_scale: Tensor | float,
    weights: ALIPWeights,
    update: bool | None = None,
) -> Tensor:
    """ALIP's adaptive contrastive loss (docs/methods.md#alip), v = image, t_r = raw caption,
    t_c = synthetic caption:

        L = mean_i(W_s W_r ℓ(v, t_r)_i) + mean_i(W_s W_c ℓ(v, t_c)_i)

    ℓ the per-sample symmetric CE (`per_sample_clip_loss`), weights from `weights`
    (detached; EMA updated first when `update`, default `weights.training`, see
    `ALIPWeights`). Cosines are of the L2-normalized embeddings.
    """
    with torch.no_grad():
        v = F.normalize(image_emb.detach(), dim=-1)
        tr = F.normalize(raw_text_emb.detach(), dim=-1)
        tc = F.normalize(syn_text_emb.detach(), dim=-1)
        w_s, w_r, w_c = weights((tr * tc).sum(-1), (tr * v).sum(-1), (tc * v).sum(-1), update=update)
    raw = per_sample_clip_loss(image_emb, raw_text_emb, logit_scale)
    syn = per_sample_clip_loss(image_emb, syn_text_emb, logit_scale)
    return (w_s * w_r * raw).mean() + (w_s * w_c * syn).mean()
