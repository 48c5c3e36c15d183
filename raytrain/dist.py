"""Cross-worker collectives used by the losses; the same calls on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """Stack of x from every rank; backward sums each rank's gradient of the whole stack
    (all_reduce, which gloo and NCCL both have) and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather(x: Tensor) -> Tensor:
    """Rows of x from every rank, in rank order, with gradients flowing back to each rank's
    own rows (OpenCLIP's gather_with_grad): every rank then computes the global-batch loss,
    and DDP's gradient averaging gives exactly the single-process gradient. Ranks may hold
    different row counts (skipped bad rows), so rows are padded for the collective."""
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - x.shape[0], *x.shape[1:])]) if x.shape[0] < max(sizes) else x
    parts = _AllGather.apply(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_sum(values: list[float], device="cpu") -> list[float]:
    """Sum of each value over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj) -> list:
    """`obj` from every rank, in rank order (picklable objects, e.g. RNG states)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
