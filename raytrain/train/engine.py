"""The optimization engine behind one small interface, so DeepSpeed can replace DDP:

    loss, logs = engine(batch, epoch)     # forward through the (wrapped) method
    stats = engine.step(loss)             # backward, clip, optimizer and LR schedule
    engine.state_dict() / engine.load_state_dict(state)
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from raytrain.train.dist import world_size


class DDPEngine:
    """Plain PyTorch: DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    kind = "ddp"

    def __init__(self, method: torch.nn.Module, cfg, total_steps: int, device: torch.device):
        self.module = method.to(device)
        self.model = DistributedDataParallel(method) if world_size() > 1 else method
        self.optimizer = cfg.optim.build([p for p in method.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cfg.optim.lr_at(s, total_steps))
        self.grad_clip = cfg.optim.grad_clip

    def __call__(self, batch, epoch: float):
        return self.model(batch, epoch)

    def step(self, loss: torch.Tensor) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": self.scheduler.get_last_lr()[0], "grad_norm": float(norm)}

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(method, cfg, total_steps: int, device) -> DDPEngine:
    engines = {"ddp": DDPEngine}
    return engines[cfg.train.engine](method, cfg, total_steps, device)
