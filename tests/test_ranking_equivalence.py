"""The ranking losses as computed (raytrain.losses.ranking: top-K targets, [N, N] tables, fused
chunked autograd function) against a straightforward implementation of their docstring
formulas: the same losses and gradients, up to floating-point reassociation."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import saved_bytes

from raytrain.losses import ranking
from raytrain.losses.ranking import Transition, plackett_luce_loss, rank_targets, ranking_consistency_loss


def reference_terms(trans, emb, prefix, order):
    """Σ_r λ_r T_r [B, K, N] by the Transition docstring, one row and position at a time."""
    e = emb.detach() if trans.detach else emb
    b, k = prefix.shape
    out = torch.zeros(b, k, e.shape[0], dtype=e.dtype)
    if order < 2:
        return out
    rows = []
    for row in range(b):
        positions = []
        for pos in range(k):
            prev = [prefix[row, pos - m] for m in range(1, pos + 1)]  # π_{k−1}, π_{k−2}, ...
            total = torch.zeros(e.shape[0], dtype=e.dtype)
            if prev and trans.pair is not None:
                q2, k2 = trans.pair(e).chunk(2, -1)
                total = total + trans.lam[0] * (q2 @ k2[prev[0]]) * trans.scale
            if prev and trans.tuple is not None:
                q, kt, v = trans.tuple(e).chunk(3, -1)
                for r in range(3, order + 1):
                    items = torch.stack(prev[: r - 1])
                    alpha = torch.softmax(q @ kt[items].T * trans.scale, dim=1)  # [N, items]
                    pooled = alpha @ v[items]  # Σ_m α_jm W'_v e_{π_{k−m}}
                    total = total + trans.lam[r - 2] * (q * pooled).sum(1) * trans.scale
            positions.append(total)
        rows.append(torch.stack(positions))
    return torch.stack(rows)


def reference_pl(scores, target, order, depth, terms=None):
    """−mean_rows(log P / K), log P = Σ_k [φ_k(π_k) − logsumexp over the unplaced φ_k]."""
    b, n = scores.shape
    k = n if depth is None else min(depth, n)
    total = 0.0
    for row in range(b):
        for pos in range(k):
            phi = scores[row] + (terms[row, pos] if terms is not None and order >= 2 else 0)
            remaining = target[row, pos:]
            total = total + phi[target[row, pos]] - torch.logsumexp(phi[remaining], 0)
    return -total / k / b


def reference_consistency(u, v, scale, order, depth, in_modal, reference, image_t, text_t):
    """ranking_consistency_loss's docstring: full stable sorts, terms per list."""
    un, vn = F.normalize(u, dim=-1), F.normalize(v, dim=-1)
    s_it = scale * un @ vn.T
    pairs = [(s_it, s_it.T, text_t, v), (s_it.T, s_it, image_t, u)]
    if in_modal:
        s_ii, s_tt = scale * un @ un.T, scale * vn @ vn.T
        pairs += [(s_ii, s_tt, image_t, u), (s_tt, s_ii, text_t, v)]
    total = 0.0
    for scores, other, trans, emb in pairs:
        target = torch.sort((other if reference is None else reference).detach(), dim=1, descending=True, stable=True)
        target = target.indices
        k = scores.shape[1] if depth is None else min(depth, scores.shape[1])
        terms = None if trans is None or order < 2 else reference_terms(trans, emb, target[:, :k], order)
        total = total + reference_pl(scores, target, order, depth, terms)
    return total / 2


def transitions(order, dim, seed, pairwise=True, tuplewise=True, detach=True):
    torch.manual_seed(seed)
    out = []
    for _ in range(2):
        t = Transition(dim, 4, max(order, 2), detach, pairwise, tuplewise).double()
        with torch.no_grad():
            t.lam.copy_(torch.randn_like(t.lam))  # λ = 0 at init would hide every term
            for p in (t.pair, t.tuple):
                if p is not None:
                    p.weight.mul_(3)  # sharper attention than the init's
        out.append(t)
    return out


def params(*modules):
    return [p for m in modules if m is not None for p in m.parameters()]


def assert_same(got, want, inputs):
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    grads = (torch.autograd.grad(x, inputs, allow_unused=True, retain_graph=True) for x in (got, want))
    for g, w, x in zip(*grads, inputs):  # None: not used (zero)
        zero = torch.zeros_like(x)
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("depth", [None, 3])
@pytest.mark.parametrize("teacher", [False, True])
def test_consistency_loss_matches_reference(order, depth, teacher, monkeypatch):
    monkeypatch.setattr(ranking, "CHUNK", {"cpu": 2 * 6 * 7})  # several row chunks per list
    torch.manual_seed(10 * order + (depth or 0))
    b, dim = 7, 5
    u = torch.randn(b, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, dim, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(b, b, dtype=torch.float64) if teacher else None
    image_t, text_t = transitions(order, dim, order, detach=order % 2 == 0) if order >= 2 else (None, None)
    got = ranking_consistency_loss(u, v, scale, order, depth, True, reference, image_t, text_t)
    want = reference_consistency(u, v, scale, order, depth, True, reference, image_t, text_t)
    assert_same(got, want, [u, v, scale, *params(image_t, text_t)])


@pytest.mark.parametrize("pairwise, tuplewise", [(False, True), (True, False), (False, False)])
def test_term_switches_match_reference(pairwise, tuplewise):
    torch.manual_seed(1)
    b, dim = 6, 4
    u = torch.randn(b, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, dim, dtype=torch.float64, requires_grad=True)
    image_t, text_t = transitions(4, dim, 2, pairwise, tuplewise, detach=False)
    got = ranking_consistency_loss(u, v, 2.0, 4, 4, False, None, image_t, text_t)
    want = reference_consistency(u, v, 2.0, 4, 4, False, None, image_t, text_t)
    assert_same(got, want, [u, v, *params(image_t, text_t)])


def test_ties_follow_the_stable_sort():
    """Duplicated items (the same caption twice) tie exactly: targets take them by index."""
    torch.manual_seed(2)
    b, dim = 8, 3
    u = torch.randn(b, dim, dtype=torch.float64)
    v = torch.randn(b, dim, dtype=torch.float64)
    u[5], v[3], v[6] = u[1], v[0], v[0]
    u.requires_grad_(), v.requires_grad_()
    image_t, text_t = transitions(3, dim, 3)
    got = ranking_consistency_loss(u, v, 4.0, 3, 3, True, None, image_t, text_t)
    want = reference_consistency(u, v, 4.0, 3, 3, True, None, image_t, text_t)
    assert_same(got, want, [u, v, *params(image_t, text_t)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_targets_top_k_is_the_sorts_prefix(dtype):
    torch.manual_seed(3)
    cases = [
        torch.randint(0, 4, (64, 40)).to(dtype),  # many ties, at the boundary and inside the top k
        torch.randn(32, 100, dtype=dtype),
        torch.zeros(3, 9, dtype=dtype),  # all tied
        torch.tensor([[0.0, -0.0, 1.0, -0.0, 0.0]], dtype=dtype),  # −0 ties with +0, as in the sort
    ]
    for ref in cases:
        full = torch.sort(ref, dim=1, descending=True, stable=True).indices
        for depth in (1, 2, 3, ref.shape[1] - 1, ref.shape[1], None):
            want = full if depth is None else full[:, :depth]
            assert torch.equal(rank_targets(ref, depth), want), (ref, depth)


def test_plackett_luce_with_tables_matches_reference():
    """plackett_luce_loss fed a transition's tables (fast path) or its materialized terms."""
    torch.manual_seed(4)
    b, n, dim = 5, 6, 4
    scores = torch.randn(b, n, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(n, dim, dtype=torch.float64, requires_grad=True)
    target = torch.stack([torch.randperm(n) for _ in range(b)])
    (trans,) = transitions(5, dim, 5, detach=False)[:1]
    for order in (2, 3, 5):
        for depth in (None, 1, 4):
            k = n if depth is None else depth
            want = reference_pl(scores, target, order, depth, reference_terms(trans, emb, target[:, :k], order))
            inputs = [scores, emb, *trans.parameters()]
            assert_same(plackett_luce_loss(scores, target, order, depth, trans.tables(emb, order)), want, inputs)
            terms = plackett_luce_loss(scores, target[:, :k], order, depth, lambda p, r: trans(emb, p, r))
            assert_same(terms, want, inputs)


def test_memory_does_not_grow_with_batch_chunks(monkeypatch):
    """Order ≥ 2 keeps only the inputs for backward (chunks are recomputed): saved bytes do not
    depend on the order, and a loss over many chunks equals the one-chunk loss."""
    torch.manual_seed(5)
    b, dim = 16, 8
    u, v = torch.randn(b, dim, requires_grad=True), torch.randn(b, dim, requires_grad=True)
    image_t, text_t = transitions(5, dim, 5)
    saved, values = [], []
    for order in (3, 4, 5):
        loss = lambda o=order: ranking_consistency_loss(u, v, 5.0, o, 8, True, None, image_t.float(), text_t.float())  # noqa: E731
        saved.append(saved_bytes(lambda f=loss: values.append(f())))
    assert saved[0] == saved[1] == saved[2], saved
    monkeypatch.setattr(ranking, "CHUNK", {"cpu": 8 * b})  # one row per chunk
    chunked = ranking_consistency_loss(u, v, 5.0, 5, 8, True, None, image_t, text_t)
    assert chunked.item() == pytest.approx(values[-1].item(), rel=1e-6)
    assert math.isfinite(chunked.item())
