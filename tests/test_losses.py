"""Losses against hand-computed values and brute-force references (docs/methods.md#rankclip-and-the-order-r-family)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import saved_bytes

from raytrain.losses.contrastive import clip_logits, clip_loss
from raytrain.losses.ranking import Transition, plackett_luce_loss, rank_targets, ranking_consistency_loss


def test_clip_loss_hand_computed():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalized inside: [1,0], [.707,.707]
    s = 10.0
    # image 0: logits [10, 7.071]; image 1: [0, 7.071]; text 0: [10, 0]; text 1: [7.071, 7.071]
    c = 10 / math.sqrt(2)
    i2t = -(10 - math.log(math.exp(10) + math.exp(c))) - (c - math.log(1 + math.exp(c)))
    t2i = -(10 - math.log(math.exp(10) + 1)) - (c - math.log(2 * math.exp(c)))
    expected = 0.5 * (i2t / 2 + t2i / 2)
    assert clip_loss(u, v, s).item() == pytest.approx(expected, abs=1e-6)


def matched_first(n, b=None):
    """Target rankings with the matched item first, then the rest by index."""
    rows = []
    for i in range(b or n):
        rows.append([i] + [j for j in range(n) if j != i])
    return torch.tensor(rows)


def test_pl_depth1_equals_one_direction_of_clip():
    torch.manual_seed(0)
    u, v = torch.randn(8, 16), torch.randn(8, 16)
    s = clip_logits(u, v, 14.3)
    target = matched_first(8)
    i2t = plackett_luce_loss(s, target, order=0, depth=1)
    t2i = plackett_luce_loss(s.T, target, order=0, depth=1)
    assert i2t.item() == pytest.approx(F.cross_entropy(s, torch.arange(8)).item(), abs=1e-6)
    assert (0.5 * (i2t + t2i)).item() == pytest.approx(clip_loss(u, v, 14.3).item(), abs=1e-6)


def test_plain_pl_hand_computed():
    # one row, 3 candidates, target (2, 0, 1): log P = [s2 − lse(s0,s1,s2)] + [s0 − lse(s0,s1)] + 0
    s = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[2, 0, 1]])
    lse3 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse2 = math.log(math.exp(1) + math.exp(2))
    loglik = (3 - lse3) + (1 - lse2) + 0.0
    assert plackett_luce_loss(s, target).item() == pytest.approx(-loglik / 3, abs=1e-6)
    assert plackett_luce_loss(s, target, depth=2).item() == pytest.approx(-((3 - lse3) + (1 - lse2)) / 2, abs=1e-6)


def reference_phi(scores, target, trans, emb, order, k):
    """φ_k(j) by the letter of docs/methods.md#transition-terms, one row/position/candidate at a time."""
    b, n = scores.shape
    d = trans.pair.out_features // 2
    q2, k2 = trans.pair(emb).chunk(2, -1)
    q, kt, v = trans.tuple(emb).chunk(3, -1)
    phi = torch.zeros(b, k, n, dtype=scores.dtype)
    for row in range(b):
        for pos in range(k):
            prev = [target[row, pos - m].item() for m in range(1, pos + 1)]  # π_{k−1}, π_{k−2}, ...
            for j in range(n):
                val = scores[row, j]
                if order >= 2 and prev:
                    val = val + trans.lam[0] * (q2[j] @ k2[prev[0]]) / math.sqrt(d)
                for r in range(3, order + 1):
                    items = prev[: r - 1]
                    if not items:
                        continue
                    att = torch.softmax(torch.stack([q[j] @ kt[i] / math.sqrt(d) for i in items]), 0)
                    pooled = sum(a * v[i] for a, i in zip(att, items))
                    val = val + trans.lam[r - 2] * (q[j] @ pooled) / math.sqrt(d)
                phi[row, pos, j] = val
    return phi


def reference_pl(phi, target, k):
    loglik = 0.0
    for row in range(phi.shape[0]):
        for pos in range(k):
            remaining = target[row, pos:].tolist()
            loglik = loglik + phi[row, pos, target[row, pos]] - torch.logsumexp(phi[row, pos, remaining], 0)
    return -loglik / k / phi.shape[0]


@pytest.mark.parametrize("order", [2, 3, 5])
def test_high_order_matches_brute_force(order):
    torch.manual_seed(order)
    b, n, dim = 3, 6, 5
    scores = torch.randn(b, n, dtype=torch.float64)
    emb = torch.randn(n, dim, dtype=torch.float64)
    target = torch.stack([torch.randperm(n) for _ in range(b)])
    trans = Transition(dim, 4, max_order=5).double()
    with torch.no_grad():
        trans.lam.copy_(torch.randn(4, dtype=torch.float64))
    for depth in (None, 4):
        k = depth or n
        got = plackett_luce_loss(scores, target, order, depth, lambda p, r: trans(emb, p, r))
        want = reference_pl(reference_phi(scores, target, trans, emb, order, k), target, k)
        assert got.item() == pytest.approx(want.item(), abs=1e-10)


def test_zero_lambda_is_plain_pl():
    """The family is nested: at init (λ = 0) order R equals RankCLIP (order 1)."""
    torch.manual_seed(1)
    scores, emb = torch.randn(4, 7), torch.randn(7, 8)
    target = torch.stack([torch.randperm(7) for _ in range(4)])
    trans = Transition(8, 4, max_order=4)
    plain = plackett_luce_loss(scores, target)
    high = plackett_luce_loss(scores, target, 4, None, lambda p, r: trans(emb, p, r))
    assert high.item() == pytest.approx(plain.item(), abs=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(2)
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.stack([torch.randperm(5) for _ in range(3)])
    trans = Transition(4, 3, max_order=4, detach=False).double()
    with torch.no_grad():
        trans.lam.copy_(torch.tensor([0.5, -0.7, 0.3], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda s: plackett_luce_loss(s, target), (scores,))
    assert torch.autograd.gradcheck(
        lambda s, e: plackett_luce_loss(s, target, 4, 4, lambda p, r: trans(e, p, r)), (scores, emb)
    )


def test_permutation_equivariance():
    torch.manual_seed(3)
    b, n = 4, 6
    scores, emb = torch.randn(b, n), torch.randn(n, 8)
    target = torch.stack([torch.randperm(n) for _ in range(b)])
    trans = Transition(8, 4, max_order=3)
    with torch.no_grad():
        trans.lam.fill_(0.8)
    base = plackett_luce_loss(scores, target, 3, None, lambda p, r: trans(emb, p, r))
    perm = torch.randperm(n)  # relabel candidates: new index of old candidate c is inv[c]
    inv = torch.argsort(perm)
    rows = torch.randperm(b)
    moved = plackett_luce_loss(scores[rows][:, perm], inv[target[rows]], 3, None, lambda p, r: trans(emb[perm], p, r))
    assert moved.item() == pytest.approx(base.item(), abs=1e-5)


def test_memory_grows_linearly_with_order():
    torch.manual_seed(4)
    b = n = 32
    scores = torch.randn(b, n, requires_grad=True)
    emb = torch.randn(n, 16)
    target = torch.stack([torch.randperm(n) for _ in range(b)])
    trans = Transition(16, 8, max_order=8)
    mem = [
        saved_bytes(lambda r=r: plackett_luce_loss(scores, target, r, None, lambda p, o: trans(emb, p, o)))
        for r in range(3, 9)
    ]
    steps = [y - x for x, y in zip(mem, mem[1:])]
    assert max(steps) == min(steps), steps  # the same cost per extra order: linear
    # a bounded number of [B, K, N] float tensors per order (counted once per op saving them)
    assert max(steps) <= 16 * b * n * n * 4


def test_rank_targets_break_ties_by_index():
    ref = torch.tensor([[0.5, 1.0, 0.5, 1.0]])
    assert rank_targets(ref).tolist() == [[1, 3, 0, 2]]


def test_ranking_consistency_teacher_reference_and_order1():
    torch.manual_seed(5)
    u, v = torch.randn(6, 8), torch.randn(6, 8)
    plain = ranking_consistency_loss(u, v, 10.0)
    ref = torch.randn(6, 6)
    teacher = ranking_consistency_loss(u, v, 10.0, reference=ref)
    assert torch.isfinite(plain) and torch.isfinite(teacher) and plain.item() != teacher.item()
    # with the reference equal to each view's own ranking the loss is RankCLIP's cross term
    cross = ranking_consistency_loss(u, v, 10.0, in_modal=False)
    s = clip_logits(u, v, 10.0)
    want = 0.5 * (plackett_luce_loss(s, rank_targets(s.T)) + plackett_luce_loss(s.T, rank_targets(s)))
    assert cross.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("pairwise, tuplewise", [(False, True), (True, False)])
def test_term_switches_remove_exactly_their_terms(pairwise, tuplewise):
    """pairwise / tuple-wise off (the ablations) equal the full module with those λ at 0."""
    torch.manual_seed(6)
    b, n = 3, 6
    scores, emb = torch.randn(b, n, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)
    target = torch.stack([torch.randperm(n) for _ in range(b)])
    full = Transition(5, 4, max_order=4).double()
    part = Transition(5, 4, max_order=4, pairwise=pairwise, tuplewise=tuplewise).double()
    with torch.no_grad():
        full.lam.copy_(torch.tensor([0.7, -0.4, 0.9], dtype=torch.float64))
        part.lam.copy_(full.lam)
        if pairwise:
            part.pair.weight.copy_(full.pair.weight)
            full.lam[1:] = 0
        else:
            part.tuple.weight.copy_(full.tuple.weight)
            full.lam[0] = 0
    assert (part.pair is None) != pairwise and (part.tuple is None) != tuplewise
    got = plackett_luce_loss(scores, target, 4, None, lambda p, r: part(emb, p, r))
    want = plackett_luce_loss(scores, target, 4, None, lambda p, r: full(emb, p, r))
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
