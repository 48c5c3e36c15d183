"""The optimizer and learning-rate schedule every engine steps with (the `optim` section)."""

from __future__ import annotations

import math

import torch


def build_optimizer(cfg, module: torch.nn.Module, lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """`cfg` (optim) over `module`'s trainable parameters: weight decay on matrices only;
    `lr_scales` maps a parameter-name prefix to a multiplier of `lr` (a small head that must learn
    within the run's budget, e.g. `loss.transition_lr_scale`)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)
            groups.setdefault((p.ndim >= 2, scale), []).append(p)
    params = [
        {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
        # the unscaled groups first: engines log param_groups[0]'s lr as "lr"
        for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0], kv[0][1]))
    ]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg, step: int, total: int) -> float:
    """Linear warmup over `cfg.warmup_steps`, then cosine decay to 0 at `total`: a multiplier of `lr`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(cfg, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a scheduler stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total))
