"""Cross-modal retrieval metrics: Recall@K and mean average precision (docs/evaluation.md#retrieval)."""

from __future__ import annotations

import numpy as np
import torch

# Elements of `sim` handled per chunk when `chunk` is not given; about 40 bytes of
# scratch each (sorted values, indices, hits, cumulative counts), so ~170 MB a chunk.
_BUDGET = 1 << 22


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [queries, candidates], got shape {tuple(x.shape)}")
    return x.detach()


def retrieval_metrics(sim, ks=(1, 5, 10), positives=None, *, chunk: int | None = None) -> dict[str, float]:
    """Recall@K and MAP of one retrieval direction.

    `sim[i, j]` is the score of candidate j for query i (numpy array or tensor, any float
    dtype, any device). Query i's positives are `positives[i]` (boolean [Q, C], for
    multi-caption data), or candidate i alone when `positives` is None (then Q <= C).
    Call it on `sim.T` (and `positives.T`) for the other direction.

    Candidates are ranked by descending score, ties broken by lower index first (stable
    sort), so the result is deterministic. With `hit_i(r)` = 1 if the candidate at rank r
    (1-based) is a positive of query i and `P_i` = number of positives of query i:

        R@K = (1/Q) Σ_i 1[Σ_{r<=K} hit_i(r) >= 1]
        AP_i = (1/P_i) Σ_r hit_i(r) · (Σ_{s<=r} hit_i(s)) / r      (one positive: 1/rank)
        MAP = (1/Q) Σ_i AP_i

    Returns {"r@K": float for K in ks, "map": float}. Queries are processed `chunk` rows
    at a time (default: enough rows for ~4M scores) so large matrices fit in memory.
    """
    sim = _as_tensor(sim, "sim")
    q, c = sim.shape
    if q == 0 or c == 0:
        raise ValueError(f"sim must be non-empty, got shape {(q, c)}")
    if torch.isnan(sim).any():
        raise ValueError("sim contains NaN; rankings would be undefined")
    ks = tuple(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if positives is None:
        if q > c:
            raise ValueError(
                f"sim has {q} queries but {c} candidates; diagonal ground truth "
                "needs queries <= candidates (pass positives otherwise)"
            )
    else:
        positives = _as_tensor(positives, "positives")
        if positives.shape != sim.shape:
            raise ValueError(f"positives shape {tuple(positives.shape)} != sim shape {(q, c)}")
        positives = positives.bool()
        empty = (~positives.any(1)).nonzero()
        if len(empty):
            raise ValueError(f"positives has {len(empty)} queries with no positive (first: query {empty[0].item()})")

    step = chunk or max(1, _BUDGET // c)
    ranks = torch.arange(1, c + 1, device=sim.device, dtype=torch.float64)
    found = {k: 0 for k in ks}
    ap_sum = 0.0
    for a in range(0, q, step):
        b = min(a + step, q)
        # stable=True keeps equal scores in index order, which is the tie-break we promise
        order = torch.sort(sim[a:b], dim=1, descending=True, stable=True).indices
        if positives is None:
            hits = order == torch.arange(a, b, device=sim.device)[:, None]
        else:
            hits = positives[a:b].to(sim.device).gather(1, order)
        cum = hits.cumsum(1)
        ap = (hits * cum / ranks).sum(1) / cum[:, -1]
        ap_sum += ap.sum().item()
        for k in ks:
            # a query is found at K if its hit count within the first min(K, C) ranks is > 0
            found[k] += (cum[:, min(k, c) - 1] > 0).sum().item()
    out = {f"r@{k}": found[k] / q for k in ks}
    out["map"] = ap_sum / q
    return out
