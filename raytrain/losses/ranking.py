"""Plackett-Luce ranking losses of order R (docs/methods.md#rankclip-and-the-order-r-family).

order 0 = CLIP (matched item first, depth 1), order 1 = RankCLIP (plain PL over the list),
order R ≥ 2 adds attention-parameterized transition terms to each position's utilities:

    φ_k(j) = s_ij + Σ_{r=2..R} λ_r · T_r(e_j ; e_{π_{k−1}}, …, e_{π_{k−r+1}})

All functions are vectorized over rows, positions and candidates; the only Python loop is
over the order r (≤ 8), and memory is O(B·K·N·R).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init


def plackett_luce_loss(
    scores: Tensor,
    target_rank: Tensor,
    order: int = 1,
    depth: int | None = None,
    transition: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Negative PL log-likelihood of the target ranking, per ranked position, mean over rows.

        log P(π₁..π_K) = Σ_{k=1..K} [ φ_k(π_k) − logsumexp_{m ∉ {π₁..π_{k−1}}} φ_k(m) ]
        loss = mean_rows( −log P / K )

    scores `[B, N]` are the utilities s; target_rank `[B, N]` holds each row's candidate
    indices best first (a permutation of 0..N−1); `depth` = K ranked positions (None = N).
    `transition(prefix, order)` maps the target prefix `[B, K]` to additive terms
    `[B, K, N]` (φ_k(j) − s_ij); it is used for order ≥ 2, else φ_k = s (plain PL).
    """
    if scores.ndim != 2 or target_rank.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and target_rank {tuple(target_rank.shape)} must both be [B, N]")
    n = scores.shape[1]
    k = n if depth is None else min(depth, n)
    if transition is None or order < 2:
        # φ constant over positions: the remaining set at position k is π_k..π_N, so the
        # normalizer is a reverse log-cumsum-exp of the scores taken in target order.
        x = scores.gather(1, target_rank)
        tail = torch.logcumsumexp(x.flip(1), dim=1).flip(1)
        loglik = (x[:, :k] - tail[:, :k]).sum(1)
    else:
        prefix = target_rank[:, :k]
        phi = scores.unsqueeze(1) + transition(prefix, order)  # [B, K, N]
        position = torch.argsort(target_rank, dim=1)  # position of each candidate in the target
        steps = torch.arange(k, device=scores.device).view(1, k, 1)
        placed = position.unsqueeze(1) < steps  # [B, K, N]: already ranked before position k
        lse = torch.logsumexp(phi.masked_fill(placed, float("-inf")), dim=-1)
        chosen = phi.gather(2, prefix.unsqueeze(-1)).squeeze(-1)
        loglik = (chosen - lse).sum(1)
    return -(loglik / k).mean()


def rank_targets(reference: Tensor) -> Tensor:
    """Target rankings (stop-gradient): each row's indices sorted by descending reference
    score, ties broken by index."""
    return torch.sort(reference.detach(), dim=1, descending=True, stable=True).indices


class Transition(nn.Module):
    """Attention transition terms T_r for r = 2..max_order over candidate embeddings e.

    T_2(j; k)  = ⟨W_q e_j, W_k e_{π_{k−1}}⟩ / √d                                (pairwise)
    T_r(j; k)  = ⟨W'_q e_j, Σ_m α_jm W'_v e_{π_{k−m}}⟩ / √d, m = 1..r−1,        (tuple-wise)
                 α_j = softmax_m(⟨W'_q e_j, W'_k e_{π_{k−m}}⟩ / √d)
    Σ_r λ_r T_r with λ zero-initialized, so an order-R model starts as plain PL (RankCLIP).
    Tuple terms share one attention whose softmax grows item by item (online softmax), so
    all orders cost O(B·K·N·R) memory and no tuple is ever enumerated.
    """

    def __init__(
        self, emb_dim: int, dim: int, max_order: int, detach: bool = True, pairwise: bool = True, tuplewise: bool = True
    ):
        super().__init__()
        self.max_order, self.detach, self.scale = max_order, detach, 1 / math.sqrt(dim)
        # only terms that exist get parameters (DDP rejects parameters that get no gradient);
        # `pairwise` / `tuplewise` off are the ablations without those terms
        with part_init("pair"):  # own init streams: one term switched off keeps the other's init
            self.pair = nn.Linear(emb_dim, 2 * dim, bias=False) if pairwise else None
        with part_init("tuple"):
            self.tuple = nn.Linear(emb_dim, 3 * dim, bias=False) if max_order >= 3 and tuplewise else None
        self.lam = nn.Parameter(torch.zeros(max(max_order - 1, 0)))

    def forward(self, emb: Tensor, prefix: Tensor, order: int) -> Tensor:
        """emb `[N, d]` candidate embeddings; prefix `[B, K]` target indices → `[B, K, N]`."""
        if order > self.max_order:
            raise ValueError(f"order {order} exceeds this transition's max_order {self.max_order}")
        e = emb.detach() if self.detach else emb
        b, k = prefix.shape
        out = emb.new_zeros(b, k, e.shape[0])
        if order < 2:
            return out

        def previous(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
            """Rows of x for the item m positions back, [B, K, d], and whether it exists."""
            idx = torch.roll(prefix, shifts=m, dims=1)
            valid = torch.arange(k, device=prefix.device) >= m
            return x[idx], valid.view(1, k, 1)

        if self.pair is not None:
            q2, k2 = self.pair(e).chunk(2, dim=-1)
            key, valid = previous(k2, 1)
            out = out + self.lam[0] * torch.einsum("nd,bkd->bkn", q2, key) * self.scale * valid
        if order < 3 or self.tuple is None:
            return out
        q, kt, v = self.tuple(e).chunk(3, dim=-1)
        run_max = run_num = run_den = None
        for m in range(1, order):  # add the item m positions back; T_{m+1} is ready after it
            key, valid = previous(kt, m)
            val, _ = previous(v, m)
            a = torch.einsum("nd,bkd->bkn", q, key) * self.scale
            c = torch.einsum("nd,bkd->bkn", q, val) * self.scale
            a = a.masked_fill(~valid, -1e4)  # finite: keeps exp/max free of NaN gradients
            if run_max is None:
                run_max, run_num, run_den = a, c * valid, valid.to(a.dtype).expand_as(a)
            else:
                new_max = torch.maximum(run_max, a)
                decay, w = torch.exp(run_max - new_max), torch.exp(a - new_max) * valid
                run_num, run_den, run_max = run_num * decay + w * c, run_den * decay + w, new_max
            if m >= 2:  # tuple order r = m + 1 attends over the r − 1 = m previous items
                out = out + self.lam[m - 1] * run_num / run_den.clamp_min(1e-30)
        return out


def ranking_consistency_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    order: int = 1,
    depth: int | None = None,
    in_modal: bool = True,
    reference: Tensor | None = None,
    image_transition: Transition | None = None,
    text_transition: Transition | None = None,
) -> Tensor:
    """RankCLIP's ranking-consistency loss, of order R: L_cross + L_in with

        L_cross = ½ [PL(S_it ; rank S_ti) + PL(S_ti ; rank S_it)]
        L_in    = ½ [PL(S_ii ; rank S_tt) + PL(S_tt ; rank S_ii)]

    S_it = s·û v̂ᵀ, S_ii = s·û ûᵀ, S_tt = s·v̂ v̂ᵀ (s = logit_scale). Each modality's view
    ranks the other's (RankCLIP's targets), or, when `reference` `[B, B]` is given (a frozen
    teacher's similarities between the batch's items), every list follows the reference.
    Transitions act on the ranked modality's candidates (texts for S_it and S_tt).
    """
    u, v = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    s_it = logit_scale * u @ v.T
    pairs = [(s_it, s_it.T, text_transition, text_emb), (s_it.T, s_it, image_transition, image_emb)]
    if in_modal:
        s_ii, s_tt = logit_scale * u @ u.T, logit_scale * v @ v.T
        pairs += [(s_ii, s_tt, image_transition, image_emb), (s_tt, s_ii, text_transition, text_emb)]
    total = 0.0
    for scores, other, trans, emb in pairs:
        target = rank_targets(other if reference is None else reference)
        step = None if trans is None else (lambda p, r, t=trans, e=emb: t(e, p, r))
        total = total + plackett_luce_loss(scores, target, order, depth, step)
    return total / 2
