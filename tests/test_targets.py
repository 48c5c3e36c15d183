"""Target processes and held-out ranking measures (raytrain/losses/targets.py) against
hand-computed values (docs/methods.md#ranking-targets)."""

import math
from collections import Counter

import pytest
import torch

from raytrain.losses.ranking import plackett_luce_loss, rank_targets, ranking_consistency_loss
from raytrain.losses.targets import (
    generator,
    planted_rankings,
    planted_transition,
    ranking_nll,
    ranks_as_scores,
    transition_shares,
)

# three unit features at 0°, 60° and 180°: c_01 = ½, c_02 = −1, c_12 = −½
ANGLES = torch.tensor([0.0, math.pi / 3, math.pi])
F3 = torch.stack([ANGLES.cos(), ANGLES.sin()], 1)
C3 = torch.tensor([[1.0, 0.5, -1.0], [0.5, 1.0, -0.5], [-1.0, -0.5, 1.0]])


def test_ranks_as_scores_round_trip():
    g = torch.Generator().manual_seed(0)
    rankings = torch.stack([torch.randperm(9, generator=g) for _ in range(5)])
    assert torch.equal(rank_targets(ranks_as_scores(rankings)), rankings)


def test_planted_without_noise_is_greedy():
    """β, γ ≫ the Gumbel noise. γ = 0: each row sorted by relevance. γ ≫ β: the first item by
    relevance (the row's own), then each next one the most similar to the one just placed:
    row 0 of items at 0°, 50°, −60°, 110° goes 0, 1 (50° from 0), 3 (60° from 1), 2."""
    assert torch.equal(planted_rankings(F3, 0.0, 1e4, generator(0)), rank_targets(C3))
    angles = torch.deg2rad(torch.tensor([0.0, 50.0, -60.0, 110.0]))
    f = torch.stack([angles.cos(), angles.sin()], 1)
    assert planted_rankings(f, 0.0, 1e4, generator(0))[0].tolist() == [0, 1, 2, 3]
    assert planted_rankings(f, 1e6, 1e3, generator(0))[0].tolist() == [0, 1, 3, 2]


def test_planted_depth_leaves_the_rest_in_index_order():
    r = planted_rankings(torch.randn(7, 4), 1.0, 2.0, generator(3), depth=2)
    for row in r.tolist():
        assert sorted(row) == list(range(7)) and row[2:] == sorted(row[2:])


def test_planted_is_deterministic_per_generator():
    f = torch.randn(12, 5)
    a, b = planted_rankings(f, 2.0, 3.0, generator(7, 1)), planted_rankings(f, 2.0, 3.0, generator(7, 1))
    assert torch.equal(a, b) and not torch.equal(a, planted_rankings(f, 2.0, 3.0, generator(7, 2)))


def test_planted_draws_from_its_own_likelihood():
    """Row 0's six orderings of 3 items, drawn 3,000 times, against exp(−3·NLL) of the
    process's own Plackett-Luce likelihood (planted_transition): β = 1, γ = 2."""
    beta, gamma, draws = 1.0, 2.0, 3000
    seen = Counter(tuple(planted_rankings(F3, gamma, beta, generator(0, i))[0].tolist()) for i in range(draws))
    step = planted_transition(F3, gamma)
    for perm in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        target = torch.tensor([perm])
        p = math.exp(-3 * plackett_luce_loss(beta * C3[:1], target, 2, None, step).item())
        assert seen[perm] / draws == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / draws) + 1e-3), perm


def test_planted_likelihood_hand_computed():
    """−log P of row 0's ranking (0, 1, 2) at β = 1, γ = 2, per position:
    k=1: β·c_00 − log Σ_j e^{β·c_0j};  k=2: β·c_01 + γ·c_10 − log(e^{β·c_01+γ·c_10} + e^{β·c_02+γ·c_20});  k=3: 0."""
    beta, gamma = 1.0, 2.0
    k1 = 1.0 - math.log(math.exp(1.0) + math.exp(0.5) + math.exp(-1.0))
    k2 = (0.5 + 1.0) - math.log(math.exp(0.5 + 1.0) + math.exp(-1.0 - 2.0))
    got = plackett_luce_loss(beta * C3[:1], torch.tensor([[0, 1, 2]]), 2, None, planted_transition(F3, gamma))
    assert got.item() == pytest.approx(-(k1 + k2) / 3, abs=1e-6)


def test_ranking_nll_is_the_mean_over_lists():
    torch.manual_seed(0)
    u, v, ref = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 6)
    su, sv = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    s_it, s_ii, s_tt = 5 * su @ sv.T, 5 * su @ su.T, 5 * sv @ sv.T
    target = rank_targets(ref)
    lists = [plackett_luce_loss(x, target, 1, 3) for x in (s_it, s_it.T, s_ii, s_tt)]
    assert ranking_nll(u, v, 5.0, 1, 3, True, ref).item() == pytest.approx(sum(lists).item() / 4, abs=1e-6)
    assert ranking_nll(u, v, 5.0, 1, 3, False, ref).item() == pytest.approx(sum(lists[:2]).item() / 2, abs=1e-6)
    assert ranking_nll(u, v, 5.0, 1, 3, True, ref) * 2 == pytest.approx(
        ranking_consistency_loss(u, v, 5.0, 1, 3, True, ref).item(), abs=1e-6
    )


def test_transition_shares_hand_computed():
    """A transition whose r-th term is r·X: share_r = std(r·X) / std(s) = r·std(X) / std(s)."""
    torch.manual_seed(0)
    scores, x = torch.randn(4, 5), torch.randn(4, 3, 5)
    target = torch.stack([torch.randperm(5) for _ in range(4)])

    def transition(emb, prefix, order):  # Σ_{q=2..order} q·X
        assert prefix.shape == (4, 3)
        return sum((q * x for q in range(2, order + 1)), torch.zeros_like(x))

    shares = transition_shares(scores, target, 3, transition, None, 4)
    assert shares.tolist() == pytest.approx([r * x.std().item() / scores.std().item() for r in (2, 3, 4)], rel=1e-5)
