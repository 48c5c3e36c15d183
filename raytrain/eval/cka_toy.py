"""freeze-align's toy study (its appendix A.4): does a higher CKA between two embedding
spaces predict a lower CLIP loss once they are aligned by projections?

A latent "world" Z ~ U(-1, 1)^{n×d}; two modalities A = T₁(Z) + w₁·U(0,1)^{n×d} and
B = T₂(Z) + w₂·U(0,1)^{n×d}, with T₁, T₂ independent random 2-layer ReLU MLPs (hidden ≫ d)
and noise weights w₁, w₂ ~ U(0, 1). For each instance: CKA(A, B), and the minimum CLIP loss
reached in `steps` Adam steps by linear projections of A and B with a learnable
temperature. All instances train at once (batched), so 10³ instances take seconds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from raytrain.eval.cka import linear_cka
from raytrain.losses.contrastive import clip_loss


def random_mlp(x: Tensor, hidden: int, g: torch.Generator) -> Tensor:
    """A randomly initialized 2-layer ReLU MLP (nn.Linear's default init), per instance:
    x `[I, n, d]` → `[I, n, d]`."""
    i, _, d = x.shape

    def uniform(*shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    h = torch.relu(x @ uniform(i, d, hidden, fan_in=d) + uniform(i, 1, hidden, fan_in=d))
    return h @ uniform(i, hidden, d, fan_in=hidden) + uniform(i, 1, d, fan_in=hidden)


def toy_pairs(instances: int, n: int = 32, d: int = 16, hidden: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`instances` independent (A, B) pairs `[I, n, d]` drawn as the paper's Figure A.3."""
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.rand(instances, n, d, generator=g) - 1
    a = random_mlp(z, hidden, g) + torch.rand(instances, 1, 1, generator=g) * torch.rand(instances, n, d, generator=g)
    b = random_mlp(z, hidden, g) + torch.rand(instances, 1, 1, generator=g) * torch.rand(instances, n, d, generator=g)
    return a, b


def min_clip_loss(a: Tensor, b: Tensor, dim: int = 16, steps: int = 500, lr: float = 3e-4, seed: int = 0) -> Tensor:
    """Per instance, the lowest CLIP loss reached by linear projections P_a, P_b (`d → dim`)
    and a learnable temperature (init 0.07), trained with Adam for `steps` steps.

    The loss after a fixed budget measures how easily the pair aligns; with a large lr
    (1e-2) every instance of 32 points reaches ~0 (projections memorize them) and the
    comparison says nothing, so the default budget is deliberately small."""
    g = torch.Generator().manual_seed(seed)
    i, _, d = a.shape
    pa = torch.nn.Parameter(torch.randn(i, d, dim, generator=g) / math.sqrt(d))
    pb = torch.nn.Parameter(torch.randn(i, b.shape[-1], dim, generator=g) / math.sqrt(b.shape[-1]))
    log_scale = torch.nn.Parameter(torch.full((i,), math.log(1 / 0.07)))
    opt = torch.optim.Adam([pa, pb, log_scale], lr=lr)
    per_instance = torch.vmap(clip_loss)
    best = torch.full((i,), float("inf"))
    for _ in range(steps):
        losses = per_instance(a @ pa, b @ pb, log_scale.clamp(max=math.log(100)).exp())
        best = torch.minimum(best, losses.detach())
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # instances share nothing: each gets its own gradient
        opt.step()
    return best


def run(
    instances: int = 1000,
    n: int = 32,
    d: int = 16,
    hidden: int = 256,
    steps: int = 500,
    lr: float = 3e-4,
    seed: int = 0,
) -> dict:
    """CKA and minimum CLIP loss per instance, and their correlations."""
    a, b = toy_pairs(instances, n, d, hidden, seed)
    cka = linear_cka(a, b).float().numpy()
    loss = min_clip_loss(a, b, d, steps, lr, seed).numpy()
    return {
        "cka": cka.tolist(),
        "min_clip_loss": loss.tolist(),
        "pearson_cka_log_loss": float(np.corrcoef(cka, np.log(loss))[0, 1]),
        "spearman_cka_loss": float(np.corrcoef(_ranks(cka), _ranks(loss))[0, 1]),
        "params": {"instances": instances, "n": n, "d": d, "hidden": hidden, "steps": steps, "lr": lr, "seed": seed},
    }


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(result["cka"], result["min_clip_loss"], s=6, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("linear CKA(A, B)")
    ax.set_ylabel(f"minimum CLIP loss in {result['params']['steps']} steps")
    ax.set_title(
        f"Pearson r(CKA, log loss) = {result['pearson_cka_log_loss']:.2f}, "
        f"Spearman = {result['spearman_cka_loss']:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
