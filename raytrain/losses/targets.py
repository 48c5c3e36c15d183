"""Target processes and held-out measures of the order-R ranking family
(docs/methods.md#ranking-targets, docs/evaluation.md#ranking-nll-and-the-transitions-share).

The planted process is the positive control of the order sweep: rankings whose next item
depends on the previously placed one with a known strength γ, so a sweep can show that it
detects an order effect where one exists (γ > 0) and none where there is none (γ = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from raytrain.losses.ranking import ranking_consistency_loss


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers (numpy's SeedSequence mixes them)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def planted_rankings(
    features: Tensor, gamma: float, beta: float, gen: torch.Generator, depth: int | None = None
) -> Tensor:
    """Rankings `[N, N]` (row i: its N items best first) sampled from a first-order Markov
    Plackett-Luce process over items with features f (L2-normalized here), c_ij = f_iᵀf_j:

        φ_1(j) = β·c_ij,   φ_k(j) = β·c_ij + γ·c_{j,π_{k−1}}   (k ≥ 2)
        π_k = argmax_{j ∉ {π_1..π_{k−1}}} [φ_k(j) + G_kj],   G_kj ~ Gumbel(0, 1) i.i.d.

    so π_k is drawn with probability softmax(φ_k) over the items not yet placed (Gumbel-max).
    β·c is the relevance the teacher gives; γ pulls the next item towards the one just placed.
    Only the first `depth` positions (None: all) are drawn; the other items follow in index
    order (a Plackett-Luce loss of depth ≤ `depth` never reads their order). The noise comes
    from `gen` (CPU), so a fixed generator gives fixed rankings on any device."""
    f = F.normalize(features.detach().float(), dim=-1)
    c = f @ f.T
    n = c.shape[0]
    k = n if depth is None else min(depth, n)
    noise = -torch.log(-torch.log(torch.rand(k, n, n, generator=gen).clamp_min(1e-12))).to(c.device)
    rows = torch.arange(n, device=c.device)
    placed = torch.zeros(n, n, dtype=torch.bool, device=c.device)
    picks = []
    for step in range(k):
        phi = beta * c if step == 0 else beta * c + gamma * c[picks[-1]]  # c symmetric: c[π_{k−1}, j]
        pick = (phi + noise[step]).masked_fill(placed, float("-inf")).argmax(1)
        placed[rows, pick] = True
        picks.append(pick)
    rest = torch.arange(n, device=c.device).expand(n, n)[~placed].view(n, n - k)
    return torch.cat([torch.stack(picks, 1), rest], 1)


def planted_transition(features: Tensor, gamma: float) -> Callable[[Tensor, int], Tensor]:
    """The planted process's own transition term for `plackett_luce_loss` (order 2): prefix
    `[B, K]` → `[B, K, N]` with γ·c_{j,π_{k−1}} at positions k ≥ 2 and 0 at k = 1, so that
    plackett_luce_loss(β·c, rankings, 2, K, planted_transition(f, γ)) is the process's NLL."""
    f = F.normalize(features.detach().float(), dim=-1)
    c = f @ f.T

    def step(prefix: Tensor, order: int) -> Tensor:
        prev = c[torch.roll(prefix, 1, dims=1)]  # [B, K, N]: c of the item one position back
        return gamma * prev * (torch.arange(prefix.shape[1], device=prefix.device) >= 1).view(1, -1, 1)

    return step


def ranks_as_scores(rankings: Tensor) -> Tensor:
    """Reference scores whose `rank_targets` are `rankings` exactly: item j of row i scores
    −(its position in row i), so the first-placed item scores highest and there are no ties."""
    return -torch.argsort(rankings, dim=1).float()


def ranking_nll(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    order: int,
    depth: int | None,
    in_modal: bool,
    reference: Tensor | None,
    image_transition=None,
    text_transition=None,
) -> Tensor:
    """Mean negative log-likelihood per ranked position over the lists of
    `ranking_consistency_loss` (2 cross-modal, and 2 in-modal when `in_modal`), whose value is
    half their sum: nll = ranking_consistency_loss · 2 / (number of lists)."""
    loss = ranking_consistency_loss(
        image_emb, text_emb, logit_scale, order, depth, in_modal, reference, image_transition, text_transition
    )
    return loss * 2 / (4 if in_modal else 2)


@torch.no_grad()
def transition_shares(scores: Tensor, target_rank: Tensor, depth: int, transition, emb: Tensor, order: int) -> Tensor:
    """Per order r = 2..`order`, the share of the utilities the r-th transition term carries
    on one list: std(λ_r·T_r) / std(s), the standard deviations over every row, ranked position
    (the first `depth` of `target_rank`) and candidate, and over the scores `[B, N]`.
    λ_r·T_r = transition(emb, prefix, r) − transition(emb, prefix, r − 1) (a `Transition`
    returns Σ_{q ≤ r} λ_q·T_q). Signs do not enter: flipping a projection flips T_r and λ_r."""
    prefix = target_rank[:, :depth]
    sums = [transition(emb, prefix, r) for r in range(1, order + 1)]
    return torch.stack([(sums[r] - sums[r - 1]).std() for r in range(1, order)]) / scores.std()
