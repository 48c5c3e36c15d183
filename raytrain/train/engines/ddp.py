"""Plain PyTorch: DDP over the process group that Ray Train (or a test) set up."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from raytrain.dist import world_size
from raytrain.train.optim import build_optimizer, build_schedule


class DDPEngine:
    """Plain PyTorch: DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    kind = "ddp"
    accumulation = 1  # one micro-batch per optimizer step
    sharded = False  # its state_dict is the whole state; nothing sharded to save()

    @staticmethod
    def check(cfg) -> None:
        """Nothing DDP-specific to check before Ray starts."""

    def __init__(self, method: torch.nn.Module, cfg, total_steps: int, device: torch.device):
        self.cfg = cfg
        self.module = method.to(device)
        self.model = DistributedDataParallel(method) if world_size() > 1 else method
        self.optimizer = build_optimizer(cfg.optim, method, method.lr_scales())
        self.scheduler = build_schedule(cfg.optim, self.optimizer, total_steps)
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
        self.module.after_step()
        return {"lr": self.scheduler.get_last_lr()[0], "grad_norm": float(norm)}

    def state_dict(self) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ----------------------------------------------------------------------------- DeepSpeed

    def summary(self) -> str:
        clip = self.cfg.optim.grad_clip
        return f"optimizer={self.cfg.optim.name} grad_clip={clip if clip else 'off'} precision=fp32"

    def save(self, directory) -> None:
        raise NotImplementedError("DDPEngine keeps no sharded state: state_dict() is the whole state")

    def load(self, directory) -> None:
        raise NotImplementedError("DDPEngine keeps no sharded state: load_state_dict() restores it")
