"""Plackett-Luce ranking losses of order R (docs/methods.md#rankclip-and-the-order-r-family).

order 0 = CLIP (matched item first, depth 1), order 1 = RankCLIP (plain PL over the list),
order R ≥ 2 adds attention-parameterized transition terms to each position's utilities:

    φ_k(j) = s_ij + Σ_{r=2..R} λ_r · T_r(e_j ; e_{π_{k−1}}, …, e_{π_{k−r+1}})

How it is computed (the results are the formulas' up to floating-point reassociation;
tests/test_ranking_equivalence.py checks losses and gradients against a direct implementation):

- Only the first K = depth positions of a target enter the loss, so targets are each row's top K
  (`rank_targets(reference, depth)`: a partial sort with the full stable sort's tie-breaking).
- Plain PL (order ≤ 1): the candidates below position K enter only through one logsumexp of the
  unranked rest, so the cost is O(B·N) for any depth.
- Every transition term depends on the candidate j and one previous item i only through an
  [N, N] table (`Tables`: T_2, the tuple attention's logits and values), so a [B, K, N] term is
  a row gather from a table instead of a matmul per position.
- Order ≥ 2: one autograd function computes the transition terms, the masked softmax over the
  remaining candidates and the log-likelihood on row chunks of ~CHUNK [rows, K, N] elements,
  with hand-written gradients; a batch of several chunks is recomputed chunk by chunk in
  backward (one chunk is kept from forward), so beyond the [N, N] tables memory is a few
  chunk-sized buffers per order whatever the batch, and no [B, K, N] mask or index tensor is
  ever built. Lists ranked along the same target with the same transition (a teacher's
  reference) share one computation of the terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init

# [rows, K, N] elements per chunk of the fused order ≥ 2 loss: a few MB on CPU (stays in cache),
# larger on accelerators (fewer kernel launches); any other device uses the CPU size
CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}


class Tables(NamedTuple):
    """A transition's terms over (previous item i, candidate j) as [N, N] tables, 1/√d included:

    pair[i, j]  = ⟨W_q e_j, W_k e_i⟩ / √d       (T_2 with π_{k−1} = i)
    logit[i, j] = ⟨W'_q e_j, W'_k e_i⟩ / √d     (the tuple attention's logit of item i for j)
    value[i, j] = ⟨W'_q e_j, W'_v e_i⟩ / √d     (its value term: T_r = Σ_m α_jm value[π_{k−m}, j])

    None where the term is off (ablation) or above the order; `lam` holds λ_2..λ_max_order."""

    lam: Tensor
    pair: Tensor | None
    logit: Tensor | None
    value: Tensor | None
    order: int


def plackett_luce_loss(
    scores: Tensor,
    target_rank: Tensor,
    order: int = 1,
    depth: int | None = None,
    transition: Tables | Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Negative PL log-likelihood of the target ranking, per ranked position, mean over rows.

        log P(π₁..π_K) = Σ_{k=1..K} [ φ_k(π_k) − logsumexp_{m ∉ {π₁..π_{k−1}}} φ_k(m) ]
        loss = mean_rows( −log P / K )

    scores `[B, N]` are the utilities s; target_rank `[B, ≥K]` holds each row's candidate
    indices best first (a permutation of 0..N−1, or its first K entries); `depth` = K ranked
    positions (None = N). For order ≥ 2 the transition terms (φ_k(j) − s_ij) come from a
    transition's `Tables` (fast path) or from a callable `transition(prefix, order)` mapping the
    target prefix `[B, K]` to `[B, K, N]`; else φ_k = s (plain PL).
    """
    n = scores.shape[-1]
    k = n if depth is None else min(depth, n)
    if scores.ndim != 2 or target_rank.ndim != 2 or target_rank.shape[0] != scores.shape[0] or target_rank.shape[1] < k:
        raise ValueError(
            f"scores {tuple(scores.shape)} must be [B, N] and target_rank {tuple(target_rank.shape)} [B, ≥{k}] "
            "(each row's candidate indices, best first)"
        )
    prefix = target_rank[:, :k]
    if transition is None or order < 2:
        loglik = _plain_loglik(scores, prefix)
    elif isinstance(transition, Tables):
        loglik = _ranked_loglik(scores[None], prefix, transition)[0]
    else:
        loglik = _RankedPL.apply(scores[None], prefix, None, None, None, None, transition(prefix, order), order)[0]
    return -(loglik / k).mean()


def rank_targets(reference: Tensor, depth: int | None = None) -> Tensor:
    """Target rankings (stop-gradient): each row's indices sorted by descending reference
    score, ties broken by index; with `depth`, only the first `depth` of them — the full
    sort's first `depth` exactly, from a partial sort (top-k) instead of a sort of every row."""
    ref = reference.detach()
    n = ref.shape[1]
    if depth is None or depth >= n:
        return torch.sort(ref, dim=1, descending=True, stable=True).indices
    vals, idx = ref.topk(depth, dim=1)  # values sorted; equal values in an unspecified order
    kth = vals[:, -1:]
    # the entries above the depth-th value are all among topk's first `above`; the slots after them
    # go to entries equal to it, which the stable sort takes smallest index first
    above = (ref > kth).sum(1, keepdim=True)
    cols = torch.arange(n, 0, -1, device=ref.device, dtype=torch.int32)  # larger for smaller index
    tied = torch.where(ref == kth, cols, 0).topk(depth, dim=1).indices
    slot = torch.arange(depth, device=ref.device)
    pick = torch.where(slot < above, idx, tied.gather(1, (slot - above).clamp_min(0))).sort(dim=1).values
    order = ref.gather(1, pick).sort(dim=1, descending=True, stable=True).indices  # ties: index order
    return pick.gather(1, order)


def _plain_loglik(scores: Tensor, prefix: Tensor) -> Tensor:
    """Σ_k [s_{π_k} − logsumexp_{m ≥ k} s_{π_m}] per row. φ is constant over positions, so the
    normalizers are a reverse log-cumsum-exp of the ranked scores after the logsumexp of the
    unranked rest (the candidates below position K only enter through it)."""
    x = scores.gather(1, prefix)
    if prefix.shape[1] < scores.shape[1]:
        rest = scores.scatter(1, prefix, float("-inf")).logsumexp(1, keepdim=True)
        tail = torch.logcumsumexp(torch.cat([x, rest], 1).flip(1), dim=1).flip(1)[:, :-1]
    else:
        tail = torch.logcumsumexp(x.flip(1), dim=1).flip(1)
    return (x - tail).sum(1)


def _ranked_loglik(scores: Tensor, prefix: Tensor, tab: Tables) -> Tensor:
    """log P per row `[S, B]` of the lists `scores` `[S, B, N]`, all ranked along `prefix`
    `[B, K]` with the transition terms of `tab`."""
    return _RankedPL.apply(scores, prefix, tab.lam, tab.pair, tab.logit, tab.value, None, tab.order)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 inputs under autocast), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


class _Workspace:
    """Named buffers reused from one row chunk to the next: on CPU a fresh multi-MB tensor per
    op costs more in page faults than the op itself."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self.flat = dtype, device, {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        size = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < size:
            buf = self.flat[name] = torch.empty(size, dtype=self.dtype, device=self.device)
        return buf[:size].view(shape)


def _gather(table: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """table[index] `[*index.shape, N]` into `out`."""
    torch.index_select(table, 0, index.reshape(-1), out=out.view(-1, table.shape[1]))
    return out


class _Target(NamedTuple):
    """A target prefix `[c, K]` with the indices every chunk needs: each position's previous
    item `[c, K]` (n, a table's extra row of zeros, at position 0) and the candidates already
    placed at positions 1..K−1 `[c, K−1, K−1]` (row k−1: π_1..π_{k−1}, padded with π_1)."""

    prefix: Tensor
    previous: Tensor
    placed: Tensor

    @classmethod
    def of(cls, prefix: Tensor, n: int) -> _Target:
        k = prefix.shape[1]
        col = torch.arange(max(k - 1, 0), device=prefix.device)
        placed = prefix[:, torch.where(col[None, :] <= col[:, None], col[None, :], 0)]
        return cls(prefix, torch.cat([prefix.new_full((prefix.shape[0], 1), n), prefix[:, :-1]], 1), placed)

    def rows(self, rows: slice) -> _Target:
        return _Target(*(x[rows] for x in self))


def _terms(tab: _Prepared, tgt: _Target, n: int, ws: _Workspace, keep: bool = False) -> tuple[Tensor, dict]:
    """Σ_r λ_r T_r `[c, K, N]` for the target prefixes `[c, K]` (0 at position 0, which has no
    previous item), without autograd, in `ws`; and with `keep` what backward needs: the logit
    and value rows of each position's previous item (`a1`, `v1`) and, per order r = 3..R, the
    tuple attention's (T_r, L_r) (`orders`; L_r its log-normalizer), over positions 1..K−1.

    The tuple attention of order r at position k attends over the items 1..min(r−1, k) positions
    back; one softmax grows lag by lag (online: running max, rescaled sums), so T_3..T_R cost
    one pass over the lags together. The item m back of positions m..K−1 is the previous item of
    positions 1..K−m, so every lag reads the rows gathered once for lag 1."""
    prefix = tgt.prefix
    c, k = prefix.shape
    t, state = ws("t", c, k, n), {"orders": []}
    if tab.pair is None or k < 2:
        t.zero_()
    else:  # λ_2 T_2 in one gather; position 0 reads the table's extra row of zeros
        _gather(tab.lam_pair, tgt.previous, t)
    if tab.logit is None or k < 2:
        return t, state
    body, prev, shape = t[:, 1:], prefix[:, :-1], (c, k - 1, n)
    a1, v1 = _gather(tab.logit, prev, ws("a1", *shape)), _gather(tab.value, prev, ws("v1", *shape))
    state.update(a1=a1, v1=v1)
    run_max, num, den = ws("max", *shape).copy_(a1), ws("num", *shape).copy_(v1), ws("den", *shape).fill_(1)
    for m in range(2, tab.order):  # lag m; T_{m+1} is ready after it
        if m < k:  # positions m..K−1
            lag = (c, k - m, n)
            a, v = a1[:, : k - m], v1[:, : k - m]
            mx, nm, dn = run_max[:, m - 1 :], num[:, m - 1 :], den[:, m - 1 :]
            new = torch.maximum(mx, a, out=ws("new", *lag))
            decay = mx.sub_(new).exp_()
            w = torch.sub(a, new, out=ws("w", *lag)).exp_()
            nm.mul_(decay).addcmul_(w, v)
            dn.mul_(decay).add_(w)
            mx.copy_(new)
        term = torch.div(num, den, out=ws(f"term{m + 1}" if keep else "term", *shape))
        if keep:
            state["orders"].append((term, torch.log(den, out=ws(f"lse{m + 1}", *shape)).add_(run_max)))
        body.addcmul_(term, tab.lam[m - 1])
    return t, state


def _terms_backward(tab: _Prepared, tgt: _Target, state: dict, grad: Tensor, acc: dict, ws: _Workspace) -> None:
    """Accumulate the gradients of Σ_{b,k,j} grad·t (t from `_terms`) into `acc` (see `_grads`).

    pair: ∂/∂(λ_2 pair)[i] = Σ_{(b,k): π_{k−1} = i} grad[b, k] (acc "pair", a row per item and a
    last one for position 0); tuple, T_r = Σ_{m<r} α_rm c_m with α_rm = exp(a_m − L_r) (a_m,
    c_m: logit and value of the item m back): ∂/∂c_m = Σ_{r>m} λ_r grad α_rm,
    ∂/∂a_m = Σ_{r>m} λ_r grad α_rm (c_m − T_r), ∂/∂λ_r = Σ grad · T_r; the lags' gradients are
    summed per item position before one scatter into the tables."""
    c, k = tgt.prefix.shape
    n = grad.shape[-1]
    if k < 2:
        return
    if "pair" in acc:
        acc["pair"].index_add_(0, tgt.previous.reshape(-1), grad.view(-1, n))
    if tab.logit is None:
        return
    g, orders = grad[:, 1:], state["orders"]
    if "lam" in acc:
        for r, (term, _) in enumerate(orders, start=3):
            acc["lam"][r - 2] += torch.mul(g, term, out=ws("prod", *term.shape)).sum()
    if "logit" not in acc and "value" not in acc:
        return
    shape = (c, k - 1, n)
    da, dv = ws("da", *shape), ws("dv", *shape)  # per position of the item: Σ over the lags
    for m in range(1, min(tab.order, k)):  # lag m reaches positions m..K−1
        lag = (c, k - m, n)
        a, v = state["a1"][:, : k - m], state["v1"][:, : k - m]
        weight, weighted, alpha = ws("weight", *lag), ws("weighted", *lag), ws("alpha", *lag)
        for r in range(max(3, m + 1), tab.order + 1):  # Σ_r λ_r α_rm and Σ_r λ_r α_rm T_r
            term, lse = orders[r - 3]
            first = r == max(3, m + 1)
            e = torch.sub(a, lse[:, m - 1 :], out=weight if first else alpha).exp_().mul_(tab.lam[r - 2])
            if first:
                torch.mul(e, term[:, m - 1 :], out=weighted)
            else:
                weight.add_(e)
                weighted.addcmul_(e, term[:, m - 1 :])
        gm = g[:, m - 1 :]
        diff = torch.mul(v, weight, out=alpha).sub_(weighted)  # Σ_r λ_r α_rm (c_m − T_r)
        if m == 1:  # lag 1 covers every position: it initializes the sums
            torch.mul(diff, gm, out=da), torch.mul(weight, gm, out=dv)
        else:
            da[:, : k - m].addcmul_(diff, gm), dv[:, : k - m].addcmul_(weight, gm)
    items = tgt.previous[:, 1:].reshape(-1)
    if "logit" in acc:
        acc["logit"].index_add_(0, items, da.view(-1, n))
    if "value" in acc:
        acc["value"].index_add_(0, items, dv.view(-1, n))


def _grads(tab: _Prepared, acc: dict, need) -> list:
    """(∂lam, ∂pair, ∂logit, ∂value) from what `_terms_backward` accumulated (None: not in `need`)."""
    dlam = acc.get("lam")
    dpair = None
    if "pair" in acc:
        rows = acc["pair"][:-1]  # ∂/∂(λ_2 pair); the last row collected position 0
        if dlam is not None:
            dlam[0] += (rows * tab.pair).sum()
        dpair = rows * tab.lam[0] if need[1] else None
    return [dlam, dpair, acc.get("logit"), acc.get("value")]


def _accumulators(tab: _Prepared, need) -> dict:
    """Zeroed gradient accumulators for what `need` asks of (lam, pair, logit, value)."""
    acc = {}
    if need[0]:
        acc["lam"] = torch.zeros_like(tab.lam)
    if tab.pair is not None and (need[0] or need[1]):  # ∂λ_2 needs the pair rows too
        acc["pair"] = torch.zeros_like(tab.lam_pair)
    for name, x, wanted in (("logit", tab.logit, need[2]), ("value", tab.value, need[3])):
        if x is not None and wanted:
            acc[name] = torch.zeros_like(x)
    return acc


def _log_likelihood(s: Tensor, phi: Tensor, tgt: _Target, probs: bool) -> Tensor:
    """φ += s `[c, N]` in place (φ holds the terms `[c, K, N]`), −inf at the candidates already
    placed, then Σ_k [φ_k(π_k) − logsumexp over the rest] per row `[c]`; with `probs`, φ ends as
    the softmax over the remaining candidates."""
    phi.add_(s.unsqueeze(1))
    if tgt.prefix.shape[1] > 1:
        phi[:, 1:].scatter_(2, tgt.placed, float("-inf"))
    chosen = phi.gather(2, tgt.prefix.unsqueeze(-1)).squeeze(-1)
    top = phi.amax(2, keepdim=True)
    z = phi.sub_(top).exp_().sum(2, keepdim=True)
    if probs:
        phi.div_(z)
    return (chosen - top.squeeze(-1) - z.log().squeeze(-1)).sum(1)


class _RankedPL(torch.autograd.Function):
    """log P per row `[S, B]` of S lists `[S, B, N]` ranked along one target prefix `[B, K]`,
    with transition terms from tables (lam, pair, logit, value) or given whole (`terms`
    `[B, K, N]`). Row chunks of ~CHUNK elements, recomputed in backward; a batch that fits in
    one chunk keeps it from forward to backward instead (memory bounded by CHUNK either way)."""

    @staticmethod
    def forward(ctx, scores, prefix, lam, pair, logit, value, terms, order):
        ctx.save_for_backward(scores, prefix, lam, pair, logit, value, terms)
        ctx.order, ctx.kept = order, None
        out = torch.empty(scores.shape[:2], dtype=_compute_dtype(scores), device=scores.device)
        chunks = list(_chunks(scores, prefix, (lam, pair, logit, value), terms, order, keep=False, lazy=True))
        keep = len(chunks) == 1 and any(ctx.needs_input_grad)
        for chunk in chunks:
            rows, s, p, phis, extra = chunk(keep)
            for i, phi in enumerate(phis):
                out[i, rows] = _log_likelihood(s[i], phi, p, probs=keep)
            if keep:  # φ now holds the softmax that backward needs
                ctx.kept = rows, s, p, phis, extra
        return out

    @staticmethod
    def backward(ctx, gout):
        scores, prefix, lam, pair, logit, value, terms = ctx.saved_tensors
        need = ctx.needs_input_grad
        dtype = _compute_dtype(scores)
        dscores = torch.zeros(scores.shape, dtype=dtype, device=scores.device) if need[0] else None
        dterms = torch.zeros(terms.shape, dtype=dtype, device=terms.device) if terms is not None and need[6] else None
        gout, acc, tab = gout.to(dtype), {}, None
        kept, ctx.kept = ctx.kept, None
        chunks = [kept] if kept else _chunks(scores, prefix, (lam, pair, logit, value), terms, ctx.order, keep=True)
        for rows, s, p, phis, (tab, state, ws) in chunks:
            if tab is not None and not acc:
                acc = _accumulators(tab, need[2:6])
            k = p.prefix.shape[1]
            grad = None
            for i, phi in enumerate(phis):  # ∂ log P / ∂φ_k(j) = δ_{j=π_k} − softmax(φ_k)_j
                g = gout[i, rows].view(-1, 1, 1)
                if not kept:
                    _log_likelihood(s[i], phi, p, probs=True)
                gphi = phi.mul_(-g).scatter_add_(2, p.prefix.unsqueeze(-1), g.expand(-1, k, 1))
                if dscores is not None:
                    dscores[i, rows] = gphi.sum(1)
                grad = gphi if grad is None else gphi.add_(grad)
            if dterms is not None:
                dterms[rows] = grad
            if acc:
                _terms_backward(tab, p, state, grad, acc, ws)
        grads = _grads(tab, acc, need[2:6]) if acc else [None] * 4
        out = [
            None if d is None else d.to(x.dtype) for d, x in zip([dscores, *grads], (scores, lam, pair, logit, value))
        ]
        return out[0], None, *out[1:], None if dterms is None else dterms.to(terms.dtype), None


class _Prepared(NamedTuple):
    """Tables in the compute dtype, with λ_2 pair extended by a row of zeros (`lam_pair`)."""

    lam: Tensor
    pair: Tensor | None
    logit: Tensor | None
    value: Tensor | None
    order: int
    lam_pair: Tensor | None


def _prepare(tables, order: int, dtype: torch.dtype) -> _Prepared:
    lam, pair, logit, value = (None if x is None else x.to(dtype) for x in tables)
    lam_pair = None if pair is None else torch.cat([pair * lam[0], pair.new_zeros(1, pair.shape[1])])
    return _Prepared(lam, pair, logit, value, order, lam_pair)


def _n(tab: _Prepared) -> int:
    """The number of candidates, from the tables."""
    return (tab.pair if tab.pair is not None else tab.logit).shape[1]


def _chunks(scores, prefix, tables, terms, order, keep, lazy=False):
    """Per row chunk: (rows, scores[:, rows], prefix[rows], one φ buffer per list holding the
    terms of those rows, (prepared tables, tuple state with `keep`, workspace)); with `lazy`, a
    function of `keep` that computes it, per chunk."""
    dtype = _compute_dtype(scores)
    lists, b, n = scores.shape
    k = prefix.shape[1]
    ws = _Workspace(dtype, scores.device)
    tab = _prepare(tables, order, dtype) if terms is None else None
    step = max(1, CHUNK.get(scores.device.type, CHUNK["cpu"]) // (k * n))
    target = _Target.of(prefix, n)

    def chunk(rows: slice, keep: bool):
        p = target.rows(rows)
        if tab is None:
            t, state = terms[rows], {}
        else:
            t, state = _terms(tab, p, n, ws, keep)
        # the last list takes the terms' own buffer (they are not needed after it)
        phis = [ws(f"phi{i}", *t.shape).copy_(t) for i in range(lists - 1)]
        phis.append(t if tab is not None else ws("phi", *t.shape).copy_(t))
        return rows, scores[:, rows].to(dtype), p, phis, (tab, state, ws)

    for start in range(0, b, step):
        rows = slice(start, start + step)
        yield (lambda keep, rows=rows: chunk(rows, keep)) if lazy else chunk(rows, keep)


class _Terms(torch.autograd.Function):
    """Σ_r λ_r T_r `[B, K, N]` from a transition's tables (the terms materialized)."""

    @staticmethod
    def forward(ctx, prefix, lam, pair, logit, value, order):
        ctx.save_for_backward(prefix, lam, pair, logit, value)
        ctx.order = order
        dtype = _compute_dtype(lam)
        tab = _prepare((lam, pair, logit, value), order, dtype)
        return _terms(tab, _Target.of(prefix, _n(tab)), _n(tab), _Workspace(dtype, lam.device))[0]

    @staticmethod
    def backward(ctx, grad):
        prefix, *given = ctx.saved_tensors
        dtype = _compute_dtype(given[0])
        tab, ws = _prepare(given, ctx.order, dtype), _Workspace(dtype, grad.device)
        need = ctx.needs_input_grad[1:5]
        acc = _accumulators(tab, need)
        target = _Target.of(prefix, _n(tab))
        state = _terms(tab, target, _n(tab), ws, keep=True)[1]
        _terms_backward(tab, target, state, grad.to(dtype).contiguous(), acc, ws)
        return None, *(None if d is None else d.to(x.dtype) for d, x in zip(_grads(tab, acc, need), given)), None


class Transition(nn.Module):
    """Attention transition terms T_r for r = 2..max_order over candidate embeddings e.

    T_2(j; k)  = ⟨W_q e_j, W_k e_{π_{k−1}}⟩ / √d                                (pairwise)
    T_r(j; k)  = ⟨W'_q e_j, Σ_m α_jm W'_v e_{π_{k−m}}⟩ / √d, m = 1..r−1,        (tuple-wise)
                 α_j = softmax_m(⟨W'_q e_j, W'_k e_{π_{k−m}}⟩ / √d)
    Σ_r λ_r T_r with λ zero-initialized, so an order-R model starts as plain PL (RankCLIP).
    Tuple terms share one attention whose softmax grows item by item (online softmax), so
    all orders cost O(B·K·N·R) memory and no tuple is ever enumerated. Since ⟨W'_q e_j,
    Σ_m α_jm W'_v e_i⟩ = Σ_m α_jm ⟨W'_q e_j, W'_v e_i⟩, every term is built from [N, N] tables
    (`tables`).
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

    def tables(self, emb: Tensor, order: int) -> Tables:
        """The terms of `order` over candidate embeddings emb `[N, d]` as [N, N] tables."""
        if order > self.max_order:
            raise ValueError(f"order {order} exceeds this transition's max_order {self.max_order}")
        e = emb.detach() if self.detach else emb
        pair = logit = value = None
        if order >= 2 and self.pair is not None:
            q2, k2 = self.pair(e).chunk(2, dim=-1)
            pair = k2 @ q2.T * self.scale
        if order >= 3 and self.tuple is not None:
            q, kt, v = self.tuple(e).chunk(3, dim=-1)
            logit, value = kt @ q.T * self.scale, v @ q.T * self.scale
        return Tables(self.lam, pair, logit, value, order)

    def forward(self, emb: Tensor, prefix: Tensor, order: int) -> Tensor:
        """emb `[N, d]` candidate embeddings; prefix `[B, K]` target indices → `[B, K, N]`."""
        tab = self.tables(emb, order)
        if tab.pair is None and tab.logit is None:
            return emb.new_zeros(*prefix.shape, emb.shape[0])
        return _Terms.apply(prefix, *tab[:4], order)


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
    lists = [(s_it, s_it.T, "text"), (s_it.T, s_it, "image")]  # (scores, the view ranking them, candidates)
    if in_modal:
        s_ii, s_tt = logit_scale * u @ u.T, logit_scale * v @ v.T
        lists += [(s_ii, s_tt, "image"), (s_tt, s_ii, "text")]
    k = s_it.shape[1] if depth is None else min(depth, s_it.shape[1])
    tables = {}
    if order >= 2:  # each transition's tables once, for both lists it ranks
        for side, trans, emb in (("image", image_transition, image_emb), ("text", text_transition, text_emb)):
            if trans is not None:
                tables[side] = trans.tables(emb, order)
    total = 0.0
    if reference is None:
        for scores, other, side in lists:
            total = total + plackett_luce_loss(scores, rank_targets(other, k), order, k, tables.get(side))
        return total / 2
    target = rank_targets(reference, k)  # one target for all lists
    for side in ("text", "image"):
        scores = [s for s, _, on in lists if on == side]
        if side in tables:  # the lists on the same candidates share the terms
            total = total - (_ranked_loglik(torch.stack(scores), target, tables[side]) / k).mean(1).sum()
        else:
            total = total + sum(plackett_luce_loss(s, target, order, k) for s in scores)
    return total / 2
