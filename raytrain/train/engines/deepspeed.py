"""DeepSpeed (ZeRO 0–3, fp32/bf16/fp16, gradient accumulation, optimizer offload) behind the
Engine interface. `save(dir)` / `load(dir)` are DeepSpeed's own sharded checkpoints (every rank
calls them); `load` at another world size (an elastic resize) goes through a universal checkpoint
(`to_universal`), so the optimizer moments come back re-partitioned. `state_dict()` is the
consolidated fp32 module state (world-size independent); with ZeRO ≥ 1 and more than one rank it
is a collective, so every rank must call it. Importing this module does not import deepspeed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import os
import shutil
import tempfile
import time
import types
from pathlib import Path

import torch

from raytrain.dist import world_size
from raytrain.log import log
from raytrain.train.optim import build_optimizer, build_schedule

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg, world_size: int) -> dict:
    """DeepSpeed's JSON config from the typed config (train.batch_size, train.deepspeed.*,
    optim.grad_clip). The optimizer and LR schedule are not in it: DeepSpeedEngine passes
    the torch optimizer of `build_optimizer` and our warmup+cosine LambdaLR to
    `deepspeed.initialize`, so DDP and DeepSpeed step with the same optimizer (and
    DeepSpeed compiles no fused_adam). Raises ValueError naming the fields that conflict."""
    ds = cfg.train.deepspeed
    batch, accum = cfg.train.batch_size, ds.grad_accumulation
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if batch % (world_size * accum):
        raise ValueError(
            f"train.batch_size {batch} is not divisible by world_size {world_size} × "
            f"train.deepspeed.grad_accumulation {accum} (= {world_size * accum}): the per-rank micro-batch "
            f"train.batch_size / (world_size × grad_accumulation) must be a whole number"
        )
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError("train.deepspeed.offload_optimizer=true needs train.deepspeed.zero_stage >= 1 (got 0)")
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        # pin_memory off: harmless on GPU nodes, and the CPU accelerator has no pinned memory
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // world_size // accum,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),  # 0 = no clipping
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        # our torch optimizer (AdamW or SGD) under ZeRO, offloaded ones included
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop reports; keep DeepSpeed's per-step prints off
        "wall_clock_breakdown": False,
    }
    if ds.precision == "fp16":  # dynamic loss scaling
        config["fp16"].update(
            loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1
        )
    return config


@contextlib.contextmanager
def _broadcastable_scalars(deepspeed):
    """DeepSpeed 0.19.8 broadcasts parameters inside `deepspeed.initialize` as
    `p.data.view(torch.uint8)`, which raises for 0-dim parameters such as the student's
    `log_scale` ("self.dim() cannot be 0 to view Float as Byte"): in the engine's
    `_broadcast_model` (every stage) and in ZeRO-3's `Init._zero_init_param`. While
    `deepspeed.initialize` runs, both see 0-dim parameters as 1-element views of the same
    storage; nothing else changes, and the shapes stay as the module made them."""
    from deepspeed import comm
    from deepspeed.runtime.zero.partition_parameters import Init

    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    broadcast_model, zero_init_param = engine_cls._broadcast_model, Init._zero_init_param

    def broadcast(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.view(1)
        try:
            broadcast_model(self)
        finally:
            for p in scalars:
                p.data = p.data.view(())

    def init_param(self, param):
        if param.dim() != 0:
            return zero_init_param(self, param)
        self._convert_to_deepspeed_param(param)  # as the original, with a 1-element view
        group = self.get_partition_dp_group(param)
        src = 0 if comm.get_world_group() == group else comm.get_global_rank(group, 0)
        comm.broadcast(param.data.view(1).view(torch.uint8), src, group)
        param.partition()

    engine_cls._broadcast_model, Init._zero_init_param = broadcast, init_param
    try:
        yield
    finally:
        engine_cls._broadcast_model, Init._zero_init_param = broadcast_model, zero_init_param


@contextlib.contextmanager
def _without_shm_comm():
    """On the CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op
    (`deepspeed_shm_comm`, a C++ extension built with the machine's compiler into
    ~/.cache/torch_extensions: ~30-60 s on every fresh machine or HOME) when
    `deepspeed.initialize` starts it. Only `inference_all_reduce` (inference tensor
    parallelism) uses that op; training's collectives are torch.distributed's, so the build is
    skipped: it is DeepSpeed's own fallback when the op cannot be built."""
    comm_torch = importlib.import_module("deepspeed.comm.torch")  # the attribute is torch itself
    build = comm_torch.build_shm_op
    comm_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        comm_torch.build_shm_op = build


def _set_zero3_fp32(param, value: torch.Tensor) -> None:
    """This rank's slice of a ZeRO-3 parameter's fp32 master copy from the full value.
    DeepSpeed 0.19.8's `safe_set_full_fp32_param` reads past the end of the value for the
    padded last partition (numel not divisible by the world size); this clips to it."""
    opt = param._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    n, flat = part.numel(), value.detach().flatten().to(part.device, part.dtype)
    start = n * opt._get_param_partition_rank(param)
    valid = max(0, min(n, flat.numel() - start))
    if valid:
        part.data[:valid].copy_(flat[start : start + valid])
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


class DeepSpeedEngine:
    """DeepSpeed (ZeRO 0–3, fp32/bf16/fp16, gradient accumulation, optimizer offload) over
    the process group that Ray Train (or a test) set up; same interface as DDPEngine.

    With `train.deepspeed.grad_accumulation` G > 1, each `engine(batch)` / `step(loss)`
    pair is one micro-batch of `micro_batch_size` rows and the optimizer steps on every
    G-th call (`step` then returns the new lr and grad norm; in between, the last ones)."""

    kind = "deepspeed"
    sharded = True  # save()/load(): DeepSpeed's own checkpoints, optimizer shards included

    @staticmethod
    def check(cfg) -> None:
        """Derive DeepSpeed's JSON for every rank count the run may have (train.num_workers, or
        train.min_workers..num_workers when elastic): ValueError naming the fields that conflict,
        before Ray starts (the rank count at run time is checked again)."""
        worlds = range(cfg.train.min_workers or cfg.train.num_workers, cfg.train.num_workers + 1)
        for world in worlds:
            deepspeed_config(cfg, world)
        if len(worlds) > 1 and cfg.train.deepspeed.zero_stage and cfg.optim.name != "adamw":
            raise ValueError(
                f"train.min_workers {cfg.train.min_workers} (elastic) with train.deepspeed.zero_stage "
                f"{cfg.train.deepspeed.zero_stage} needs optim.name=adamw, not {cfg.optim.name}: a resize "
                "re-partitions the optimizer states through DeepSpeed's universal checkpoint, which carries Adam's "
                "moments only"
            )

    def summary(self) -> str:
        clip = " (gradient clipping by raytrain: DeepSpeed gets 0)" if self._own_clip else ""
        return f"config={json.dumps(self.config, sort_keys=True)}{clip}"

    def __init__(self, method: torch.nn.Module, cfg, total_steps: int, device: torch.device):
        try:
            import deepspeed
        except Exception as e:  # noqa: BLE001  (any import failure: say what to do)
            raise ImportError(
                f"train.engine=deepspeed but deepspeed does not import ({type(e).__name__}: {e}); "
                "install deepspeed==0.19.8 or set train.engine=ddp"
            ) from e
        d = torch.distributed
        if not (d.is_available() and d.is_initialized()):
            raise RuntimeError(
                "train.engine=deepspeed needs a torch.distributed process group before the engine is built "
                "(Ray Train's TorchTrainer sets one up; in a single process call "
                "torch.distributed.init_process_group('gloo', rank=0, world_size=1))"
            )
        world = world_size()
        if "LOCAL_RANK" not in os.environ:
            if world > 1:
                raise RuntimeError("train.engine=deepspeed: LOCAL_RANK is not set (Ray Train sets it on each worker)")
            os.environ["LOCAL_RANK"] = "0"
        self.config = deepspeed_config(cfg, world)
        ds = cfg.train.deepspeed
        # ZeRO 0 in fp32: DeepSpeed steps our torch optimizer directly, records no grad norm,
        # and its own clip_grad_norm_ raises on 0-dim parameters (in-place multiply by a
        # [1]-shaped coefficient, DeepSpeed 0.19.8): this engine clips there, as DDPEngine.
        self._own_clip = ds.zero_stage == 0 and ds.precision == "fp32"
        self._grad_clip = cfg.optim.grad_clip
        passed = dict(self.config, gradient_clipping=0.0) if self._own_clip else self.config
        self.dtype = _DTYPES[cfg.train.deepspeed.precision]
        self.accumulation = self.config["gradient_accumulation_steps"]
        self.micro_batch_size = self.config["train_micro_batch_size_per_gpu"]
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)

        optimizer = build_optimizer(cfg.optim, method, method.lr_scales())
        scheduler = build_schedule(cfg.optim, optimizer, total_steps)
        try:
            with _broadcastable_scalars(deepspeed), _without_shm_comm():
                engine, _, _, _ = deepspeed.initialize(
                    model=method, optimizer=optimizer, lr_scheduler=scheduler, config=passed, dist_init_required=False
                )
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"deepspeed.initialize failed for train.deepspeed={cfg.train.deepspeed.model_dump()} "
                f"(config {json.dumps(self.config, sort_keys=True)}): {type(e).__name__}: {e}"
            ) from e
        self.engine = engine
        self.module = engine.module  # the method itself (its parameters cast to bf16/fp16 when set)
        self.scheduler = engine.lr_scheduler
        # ZeRO 0 with bf16/fp16 wraps our optimizer in FP16_UnfusedOptimizer (FP16_Optimizer
        # for DeepSpeed's FusedAdam), which keeps fp32 master copies of its own
        self._fp16_optimizer = type(engine.optimizer).__name__ in ("FP16_Optimizer", "FP16_UnfusedOptimizer")
        if self._fp16_optimizer:
            # which runs one optimizer step on zero gradients
            # when it is built: with AdamW that decays the fp32 master weights once and starts
            # the step count at 1. Undo it, so step 1 is the first real step as under DDP.
            engine.optimizer.refresh_fp32_params()
            engine.basic_optimizer.state.clear()
        self._norm = float("nan")

    # -- training

    def __call__(self, batch, epoch: float):
        device = self.engine.device
        moved = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(device, self.dtype) if self.dtype is not None and v.is_floating_point() else v.to(device)
            moved[k] = v
        return self.engine(moved, epoch)

    def step(self, loss: torch.Tensor) -> dict[str, float]:
        engine = self.engine
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        own = None
        if boundary and self._own_clip:  # the reduced grads; the norm before clipping, as DDPEngine
            params = [p for p in self.module.parameters() if p.grad is not None]
            own = float(torch.nn.utils.clip_grad_norm_(params, self._grad_clip or float("inf")))
        engine.step()
        if boundary:
            self.module.after_step()
            norm = own if own is not None else engine.get_global_grad_norm()
            self._norm = float(norm) if norm is not None else float("nan")
        return {"lr": self.scheduler.get_last_lr()[0], "grad_norm": self._norm}

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (micro-batches / grad_accumulation)."""
        return self.engine.global_steps

    # -- consolidated fp32 state (world-size independent)

    def _fp16_master_views(self) -> dict[int, torch.Tensor]:
        """id(param) → its fp32 master copy in FP16_UnfusedOptimizer / FP16_Optimizer."""
        views = {}
        opt = self.engine.optimizer
        if hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer: one flat fp32 tensor per group
            for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for p in params:
                    views[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
                    offset += p.numel()
        else:
            for params, masters in zip(opt.fp16_groups, opt.fp32_groups):
                views.update({id(p): m for p, m in zip(params, masters)})
        return views

    def _full_fp32_params(self) -> dict[int, torch.Tensor]:
        """id(param) → the full fp32 value on the CPU: the optimizer's fp32 master weights
        for trained parameters (collective under ZeRO ≥ 1), the module's for frozen ones."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        masters = self._fp16_master_views() if self._fp16_optimizer else {}
        out = {}
        for p in self.module.parameters():
            if id(p) in out:
                continue
            if id(p) in masters:
                value = masters[id(p)]
            elif p.requires_grad and (hasattr(p, "_hp_mapping") or hasattr(p, "_z3_optimizer")):
                value = safe_get_full_fp32_param(p)
            elif hasattr(p, "ds_id"):  # frozen ZeRO-3 parameter: gather it
                with GatheredParameters([p]):
                    value = p.detach().clone()
            else:
                value = p.detach()
            out[id(p)] = value.to("cpu", torch.float32, copy=True)
        return out

    def state_dict(self) -> dict:
        """{"model": fp32 module state (keys as method.state_dict()), "scheduler", "steps"}.
        Optimizer moments are not in it: `save(dir)` / `load(dir)` resume exactly.
        A collective under ZeRO ≥ 1 with several ranks: call it on every rank."""
        full = self._full_fp32_params()
        model = {}
        for key, t in self.module.state_dict(keep_vars=True).items():
            if id(t) in full:
                model[key] = full[id(t)]
            else:  # buffers
                t = t.detach().to("cpu", copy=True)
                model[key] = t.float() if t.is_floating_point() else t
        e = self.engine
        steps = {"global_steps": e.global_steps, "global_samples": e.global_samples, "skipped_steps": e.skipped_steps}
        return {"model": model, "scheduler": self.scheduler.state_dict(), "steps": steps}

    def load_state_dict(self, state: dict) -> None:
        """Module weights (fp32, into the module and the optimizer's fp32 master copies),
        LR-schedule position and step counters from `state_dict()` (or DDPEngine's: its
        "model" has the same keys). Optimizer moments start fresh."""
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_set_full_fp32_param

        model = state["model"]
        tensors = self.module.state_dict(keep_vars=True)
        missing, unexpected = sorted(set(tensors) - set(model)), sorted(set(model) - set(tensors))
        if missing or unexpected:
            raise KeyError(f"state does not fit the module: missing {missing}, unexpected {unexpected}")
        masters = self._fp16_master_views() if self._fp16_optimizer else {}
        with torch.no_grad():
            for key, t in tensors.items():
                value = model[key]
                if hasattr(t, "ds_id"):  # ZeRO-3: write the gathered parameter, re-partitioned on exit
                    with GatheredParameters([t], modifier_rank=0):
                        t.data.copy_(value)
                        if t.dim() == 0:  # the exit broadcast views it as uint8 (see _broadcastable_scalars)
                            t.data = t.data.view(1)
                    if len(t.ds_shape) == 0 and t.data.numel() == 1:  # still gathered (persistent)
                        t.data = t.data.view(())
                else:
                    t.data.copy_(value.to(t.device, t.dtype))
                if not (isinstance(t, torch.nn.Parameter) and t.requires_grad):
                    continue
                if id(t) in masters:
                    masters[id(t)].copy_(value)
                elif hasattr(t, "_z3_optimizer"):
                    _set_zero3_fp32(t, value)
                elif hasattr(t, "_hp_mapping"):
                    safe_set_full_fp32_param(t, value.to(self.engine.device, torch.float32))
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        for name, value in state.get("steps", {}).items():
            setattr(self.engine, name, value)
        log.info(
            "DeepSpeedEngine.load_state_dict restored weights, LR schedule and step counters; "
            "optimizer moments start fresh (engine.load(dir) resumes exactly)"
        )

    # -- DeepSpeed's sharded checkpoints (every rank calls these)

    def save(self, directory: str | Path, tag: str | None = None) -> Path:
        """DeepSpeed's save_checkpoint: <dir>/<tag>/ (default global_step<N>) + <dir>/latest,
        holding module, optimizer shards, LR scheduler and step counters. Every rank calls it."""
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"raytrain_engine": self.kind})
        return Path(directory)

    def load(self, directory: str | Path, tag: str | None = None) -> dict:
        """DeepSpeed's load_checkpoint of `save`'s directory: module, fp32 master weights, optimizer
        states, LR schedule and step counters; returns the client state. Every rank calls it.

        ZeRO ≥ 1 shards the optimizer states by data-parallel rank, and DeepSpeed loads those
        shards only at the degree they were saved at. Saved at another one (an elastic resize),
        they load through a universal checkpoint (`to_universal`, converted once per machine into
        its temp directory and removed after): every parameter's fp32 weight and Adam moments
        whole, re-partitioned for this world size; the module's buffers (which that path leaves
        alone) from the saved module. ZeRO 0 keeps whole optimizer states: any world size."""
        directory = Path(directory)
        tag = tag or (directory / "latest").read_text().strip()
        saved = len(list((directory / tag).glob("*zero_pp_rank_*_optim_states.pt")))  # 0 under ZeRO 0
        if saved in (0, world_size()):
            return self._load_checkpoint(directory, tag)
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in (directory / tag).iterdir())
        digest = hashlib.sha256(repr((str((directory / tag).resolve()), files)).encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"raytrain-universal-{digest}"
        t0 = time.perf_counter()
        with open(f"{out}.lock", "w") as lock:  # the first rank on this machine converts; the others wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "latest_universal").is_file():  # written last by the conversion
                to_universal(directory / tag, out / tag)
        self.engine._config.load_universal_checkpoint = True  # DeepSpeed's checkpoint.load_universal
        try:
            client = self._load_checkpoint(out, tag)
        finally:
            self.engine._config.load_universal_checkpoint = False
        model_file = min((directory / tag).glob("*model_states.pt"))  # rank 0's holds the buffers
        module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        with torch.no_grad():
            for name, buffer in self.module.named_buffers():
                if name in module:
                    buffer.copy_(module[name])
        torch.distributed.barrier()  # every rank has read the conversion
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.lock").unlink(missing_ok=True)
        log.info(
            f"DeepSpeedEngine.load: ZeRO states saved at world size {saved} loaded at {world_size()} through a "
            f"universal checkpoint ({time.perf_counter() - t0:.1f}s); optimizer moments intact"
        )
        return client

    def _load_checkpoint(self, directory: Path, tag: str) -> dict:
        path, client = self.engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory} (tag {tag})")
        return client or {}


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal checkpoint of the ZeRO checkpoint `src` (`<dir>/<tag>`), written by
    its ds_to_universal into `dst` (`<out>/<tag>`, with `<out>/latest_universal`): each
    parameter's fp32 weight and optimizer moments whole (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`),
    which load at any data-parallel degree (DeepSpeed's `checkpoint.load_universal`).

    Two adaptations, both in what the converter reads: the universal_checkpoint_info it asks of
    the client (tensor-parallel layout patterns, for Megatron-style models) is injected, as its
    --inject_missing_state does, since this model has no tensor parallelism; and DeepSpeed
    0.19.8's converter concatenates each parameter's merged pieces with torch.cat, which raises
    for 0-dim parameters (the student's logit scale), so it reads a copy of the model-states file
    whose param_shapes list them as 1-element. The loader flattens every state before slicing,
    so they load back into the 0-dim parameter unchanged. Serial (one process): it runs inside a
    training worker."""
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    staged = dst.parent / f"{dst.name}.input"
    shutil.rmtree(staged, ignore_errors=True)  # left by a conversion killed midway
    staged.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.endswith("model_states.pt"):
            state = torch.load(f, map_location="cpu", weights_only=False)
            if PARAM_SHAPES in state:
                state[PARAM_SHAPES] = [{k: s or torch.Size([1]) for k, s in g.items()} for g in state[PARAM_SHAPES]]
            torch.save(state, staged / f.name)
        else:
            (staged / f.name).symlink_to(f.resolve())
    args = types.SimpleNamespace(
        input_folder=str(staged),
        output_folder=str(dst),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    printed = io.StringIO()  # its progress lines and bars: shown only if it fails
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001  (any failure: say which checkpoint and what it printed)
        raise RuntimeError(
            f"DeepSpeed's ds_to_universal failed on {src} ({type(e).__name__}: {e}); it printed:\n"
            f"{printed.getvalue()[-2000:]}"
        ) from e
    finally:
        shutil.rmtree(staged, ignore_errors=True)
