"""Engines: the optimization behind one small interface, one file each (ddp.py, deepspeed.py).

    engine = build_engine(method, cfg, total_steps, device)   # train.engine; logs one line
    loss, logs = engine(micro_batch, epoch)                    # forward through the (wrapped) method
    stats = engine.step(loss)                                  # backward, clip, optimizer, LR schedule
    engine.state_dict() / engine.load_state_dict(state)        # consolidated, any world size
    engine.save(dir) / engine.load(dir)                        # engine-native shards, when `sharded`

`check(cfg)` asks the configured engine whether it can run the config, before Ray starts.
An engine is never chosen silently: train.engine names it, and a failure says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from raytrain.dist import world_size
from raytrain.log import log
from raytrain.train.engines.ddp import DDPEngine
from raytrain.train.engines.deepspeed import DeepSpeedEngine


class Engine(Protocol):
    """What the training loop asks of an engine."""

    kind: str  # train.engine's value
    module: nn.Module  # the method itself, unwrapped (evaluation, after_step hooks)
    accumulation: int  # micro-batches per optimizer step: the loop splits a batch into these
    sharded: bool  # save()/load() keep engine-native sharded state (optimizer shards included)

    @staticmethod
    def check(cfg) -> None:
        """Raise ValueError naming the fields this engine cannot run (called before Ray starts)."""

    def __call__(self, batch: dict[str, Tensor], epoch: float) -> tuple[Tensor, dict]: ...

    def step(self, loss: Tensor) -> dict[str, float]:
        """Backward, clip, optimizer and LR-schedule step; {"lr", "grad_norm"}."""

    def state_dict(self) -> dict:
        """{"model": fp32 module state, ...}: what export and a resume at any world size read."""

    def load_state_dict(self, state: dict) -> None: ...

    def save(self, directory: str | Path) -> None:
        """Engine-native sharded checkpoint (every rank calls it); only when `sharded`."""

    def load(self, directory: str | Path) -> None: ...

    def summary(self) -> str:
        """Its settings, for the one line build_engine logs."""


ENGINES: dict[str, type] = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}


def check(cfg) -> None:
    """Whether train.engine can run `cfg`: ValueError naming the fields if not."""
    ENGINES[cfg.train.engine].check(cfg)


def build_engine(method: nn.Module, cfg, total_steps: int, device) -> Engine:
    """The engine named by train.engine, with one log line saying which and its settings. With
    train.compile the method's forward (student and losses) is compiled in place first, so DDP's
    and DeepSpeed's wrappers call the compiled module."""
    if cfg.train.compile:
        method.compile()
    engine = ENGINES[cfg.train.engine](method, cfg, total_steps, device)
    log.info(f"engine={engine.kind} world_size={world_size()} compile={cfg.train.compile} {engine.summary()}")
    return engine
