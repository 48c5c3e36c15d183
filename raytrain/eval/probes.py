"""Fine-grained and geometric probes: attribute binding and the modality gap
(docs/evaluation.md#attribute-binding, #modality-gap)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [n, d] array, got shape {tuple(x.shape)}")
    return F.normalize(x.float(), dim=-1)


def _same_shape(**arrs: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in arrs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match, got {shapes}")


@torch.no_grad()
def binding_accuracy(image_emb, pos_emb, neg_emb) -> float:
    """Attribute-binding accuracy: (1/n) Σ_i 1[cos(u_i, p_i) > cos(u_i, q_i)].

    u_i image, p_i its true caption, q_i the caption with swapped attributes/relations.
    Strict inequality: a tie counts as a failure (a model that ignores binding scores 0,
    not 0.5, when both captions embed identically).
    """
    u, p, q = _unit(image_emb, "image_emb"), _unit(pos_emb, "pos_emb"), _unit(neg_emb, "neg_emb")
    _same_shape(image_emb=u, pos_emb=p, neg_emb=q)
    p, q = p.to(u.device), q.to(u.device)
    return ((u * p).sum(1) > (u * q).sum(1)).float().mean().item()


@torch.no_grad()
def modality_gap(image_emb, text_emb, seed: int = 0, max_iter: int = 100) -> dict[str, float]:
    """Modality gap of paired embeddings u_i (image), v_i (text), both L2-normalized.

    gap = ‖(1/n) Σ_i û_i − (1/n) Σ_i v̂_i‖ (distance between the modality centroids).
    separability = test accuracy of a logistic regression σ(w·x + b) telling image (1)
    from text (0): pairs are split 50/50 by a seeded permutation (both modalities of a
    pair fall on the same side, so the test set is balanced and unseen), the model is
    fit with LBFGS (≤ max_iter iterations, L2 penalty 1e-4‖w‖² to keep it finite on
    separable data) and predicts image when w·x + b > 0. 0.5 = no gap, 1 = separable.
    """
    u, v = _unit(image_emb, "image_emb"), _unit(text_emb, "text_emb")
    _same_shape(image_emb=u, text_emb=v)
    n = len(u)
    if n < 2:
        raise ValueError(f"modality_gap needs at least 2 pairs, got {n}")
    u, v = u.cpu().double(), v.cpu().double()  # CPU float64: small problem, reproducible
    gap = (u.mean(0) - v.mean(0)).norm().item()

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: n // 2], perm[n // 2 :]

    def split(idx):
        return torch.cat([u[idx], v[idx]]), torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).double()

    x, y = split(tr)
    w = torch.zeros(u.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    x, y = split(te)
    acc = ((x @ w + b > 0).double() == y).double().mean().item()
    return {"gap": gap, "separability": acc}
