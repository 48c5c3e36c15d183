"""Distillation and self-distillation losses (docs/methods.md#dinorankclip-distillation,
#masked-image-objective): cosine distillation to frozen teacher features, TIPSv2's patch-level
distillation, iBOT / iBOT++ masked-image objectives with their centring, temperature and EMA
schedules.

Teacher inputs are always detached inside; the functions are pure except `ema_update`
(in place on the target, by design).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cosine_distill(student: Tensor, teacher: Tensor) -> Tensor:
    """L = mean over rows of (1 − cos(s, t)); student and teacher `[..., d]`, same shape,
    teacher detached. 0 for identical directions, 1 for orthogonal, 2 for opposite."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    return (1 - F.cosine_similarity(student, teacher.detach(), dim=-1)).mean()


def patch_distill(student_patches: Tensor, teacher_patches: Tensor) -> Tensor:
    """TIPSv2 patch-level distillation: L = mean_{b,p} (1 − cos(s_bp, t_bp)).

    student and teacher `[B, P, d]` (after the caller's projector, same width), teacher
    detached; every patch token counts equally.
    """
    if student_patches.ndim != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError(
            f"student {tuple(student_patches.shape)} and teacher {tuple(teacher_patches.shape)} must both be [B, P, d]"
        )
    return cosine_distill(student_patches, teacher_patches)


# ----------------------------------------------------------------------------- iBOT / iBOT++


def ibot_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    center: Tensor,
    mask: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    plus_plus: bool = False,
    per_image: bool = True,
) -> Tensor:
    """iBOT masked-image loss over K prototypes, per patch token:

        p^t_bp = softmax((t_bp − c) / τ_t)   (stop-gradient)
        ℓ_bp   = − Σ_k p^t_bpk · log_softmax(s_bp / τ_s)_k          `[B, P]`

    iBOT (`plus_plus=False`): mean of ℓ over the masked tokens (`mask` `[B, P]`, true =
    masked). With `per_image=True` (iBOT's and DINOv2's official reduction) each image's
    masked tokens are averaged, `Σ_p m_bp ℓ_bp / max(1, Σ_p m_bp)`, then the images are
    averaged (an image with no masked token contributes 0); `per_image=False` averages over
    all masked tokens of the batch at once. iBOT++ (`plus_plus=True`, TIPSv2): every token,
    masked or visible, contributes: mean of ℓ over all B·P tokens (`mask` unused, both
    reductions agree). logits `[B, P, K]`; `center` broadcastable to them (`[K]` or `[1, 1, K]`).
    TIPSv2's summary says only that unmasked tokens "also contribute directly"; weighing every
    token alike is our reading. For one image with M masked of P tokens the two differ exactly
    by the visible tokens' term: P·L_iBOT++ = M·L_iBOT + Σ_{p visible} ℓ_p.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} must both be [B, P, K]"
        )
    teacher = F.softmax((teacher_logits.detach() - center.detach()) / teacher_temp, dim=-1)
    ce = -(teacher * F.log_softmax(student_logits / student_temp, dim=-1)).sum(-1)  # [B, P]
    if plus_plus:
        return ce.mean()
    if mask.shape != ce.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, P] = {tuple(ce.shape)}")
    m = mask.to(ce.dtype)
    if per_image:
        return ((ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
    return (ce * m).sum() / m.sum().clamp_min(1.0)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """c ← μ·c + (1 − μ)·mean_{b,p} t_bp; returns the new center (center's shape).

    The batch mean is over every leading dim of `teacher_logits` `[..., K]`. Under data
    parallelism all-reduce the batch mean first (iBOT does), so ranks keep the same center.
    """
    batch_center = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).mean(0)
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


def teacher_temp_schedule(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """τ_t(step) = start + (end − start)·step / warmup_steps for step < warmup_steps, then end
    (iBOT's linear teacher-temperature warmup; reaches `end` at step = warmup_steps)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * max(step, 0) / warmup_steps)


@torch.no_grad()
def ema_update(
    target: nn.Module | Mapping[str, Tensor], source: nn.Module | Mapping[str, Tensor], momentum: float
) -> None:
    """θ_target ← μ·θ_target + (1 − μ)·θ_source for every tensor, in place, no grad.

    μ = 0 copies the source, μ = 1 keeps the target. Modules stand for their parameters
    (their buffers are left alone); mappings name → tensor are used as given (an EMA kept in
    buffers). Tensors are matched by name and the source cast to the target's dtype.
    (TIPSv2 applies the EMA to the head only: pass the heads.)
    """
    tgt, src = (dict(x.named_parameters()) if isinstance(x, nn.Module) else dict(x) for x in (target, source))
    if tgt.keys() != src.keys():
        raise ValueError(f"target and source parameters differ: {sorted(tgt.keys() ^ src.keys())}")
    names = list(tgt)
    t = [tgt[n].data for n in names]
    s = [src[n].data.to(tgt[n].dtype) for n in names]
    if not t:
        return
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def ema_momentum(step: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine schedule μ(step) = final − (final − base)·(1 + cos(π·step/total))/2:
    `base` at step 0, `final` at step = total (step clamped to [0, total])."""
    if total <= 0:
        return float(final)
    frac = min(max(step, 0), total) / total
    return float(final - (final - base) * (1 + math.cos(math.pi * frac)) / 2)
