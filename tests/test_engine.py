"""The DeepSpeed engine: its JSON config built from the typed config (pure, no DeepSpeed),
and real single-process DeepSpeed runs on the CPU (gloo, world 1).

DeepSpeed keeps process-wide state (its comm backend, the accelerator, patched torch
functions under ZeRO-3), so the runs happen in one spawned worker process that holds the
gloo process group for the whole module; each test sends it a function and checks what
comes back. The worker's TORCH_EXTENSIONS_DIR is a new empty directory, as on a fresh
machine: the engine must compile nothing there (DeepSpeed's CPU backend would build its
shared-memory all-reduce op, ~30-60 s; training does not use it). An initialize takes
~1-3 s and a tiny step ~10-30 ms.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import socket
import statistics
import tempfile
import time

import pytest
import torch
from conftest import TINY_MODEL

from raytrain.config import make_config
from raytrain.train.engines import DDPEngine, build_engine
from raytrain.train.engines.deepspeed import deepspeed_config
from raytrain.train.optim import lr_factor

TINY = [
    *TINY_MODEL,
    "teachers.dinov3.image_size=16",
]
BASE = TINY + ["train.engine=deepspeed", "train.batch_size=8", "optim.warmup_steps=2"]
TOTAL_STEPS = 100  # LR schedule length: the ~10 test steps stay near the peak LR
DDP_RTOL, DDP_ATOL = 1e-5, 1e-6  # DDP vs DeepSpeed ZeRO-0 fp32: losses and grad norms


def config(*overrides: str):
    return make_config({}, BASE + list(overrides))


# ---------------------------------------------------------------- (a) the JSON config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_config_keys(stage, precision):
    cfg = config(f"train.deepspeed.zero_stage={stage}", f"train.deepspeed.precision={precision}", "train.batch_size=32")
    ds = deepspeed_config(cfg, 2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == cfg.optim.grad_clip == 1.0
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed to deepspeed.initialize
    assert ds["zero_allow_untested_optimizer"] is True
    # DeepSpeed's own invariant
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2


@pytest.mark.parametrize(
    "batch,world,accum,micro", [(8, 1, 1, 8), (64, 2, 4, 8), (96, 4, 3, 8), (12, 3, 2, 2), (128, 8, 16, 1)]
)
def test_config_batch_arithmetic(batch, world, accum, micro):
    cfg = config(f"train.batch_size={batch}", f"train.deepspeed.grad_accumulation={accum}")
    ds = deepspeed_config(cfg, world)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        batch,
        micro,
        accum,
    )


@pytest.mark.parametrize("batch,world,accum", [(12, 2, 4), (8, 3, 1), (10, 1, 4), (16, 4, 8)])
def test_config_rejects_batch_not_divisible(batch, world, accum):
    cfg = config(f"train.batch_size={batch}", f"train.deepspeed.grad_accumulation={accum}")
    with pytest.raises(
        ValueError,
        match=rf"train\.batch_size {batch} .*world_size {world} .*train\.deepspeed\.grad_accumulation {accum}",
    ):
        deepspeed_config(cfg, world)


def test_config_offload_and_clipping():
    for stage in (1, 2, 3):
        ds = deepspeed_config(
            config(f"train.deepspeed.zero_stage={stage}", "train.deepspeed.offload_optimizer=true"), 1
        )
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False  # our torch optimizer steps the offloaded states
    with pytest.raises(ValueError, match=r"train\.deepspeed\.offload_optimizer.*train\.deepspeed\.zero_stage"):
        deepspeed_config(config("train.deepspeed.zero_stage=0", "train.deepspeed.offload_optimizer=true"), 1)
    assert deepspeed_config(config("optim.grad_clip=null"), 1)["gradient_clipping"] == 0.0
    assert deepspeed_config(config("optim.grad_clip=0.5"), 1)["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(config(), 0)


def test_build_engine_ddp_says_which(capsys):
    from raytrain.methods import build_method

    cfg = config("train.engine=ddp")
    engine = build_engine(build_method(cfg, 30), cfg, TOTAL_STEPS, torch.device("cpu"))
    assert isinstance(engine, DDPEngine) and engine.kind == "ddp"
    assert "engine=ddp" in capsys.readouterr().out
    calls = []
    engine.module.after_step = lambda: calls.append(1)  # e.g. an EMA teacher's update
    engine.step(engine(_batch(), 1.0)[0])
    assert calls == [1]


def test_deepspeed_engine_fails_loudly(monkeypatch):
    """No silent fallback to DDP: a missing deepspeed or process group raises, saying why."""
    import sys
    import types

    from raytrain.methods import build_method

    cfg = config()
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed → ImportError
    with pytest.raises(ImportError, match="train.engine=deepspeed but deepspeed does not import"):
        build_engine(build_method(cfg, 30), cfg, TOTAL_STEPS, torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))  # imports; no process group here
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        build_engine(build_method(cfg, 30), cfg, TOTAL_STEPS, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"train\.batch_size 8 .*grad_accumulation 3"):
        deepspeed_config(config("train.deepspeed.grad_accumulation=3"), 1)


def test_loop_splits_a_step_into_accumulation_micro_batches():
    """With grad_accumulation G the training loop feeds each step's rows as G micro-batches."""
    from raytrain.train.loop import _split

    inputs = {"pixels": torch.arange(20.0).view(10, 2), "tokens": torch.arange(10)}
    parts = _split(inputs, 2)
    assert [p["tokens"].tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert torch.equal(torch.cat([p["pixels"] for p in parts]), inputs["pixels"])
    assert _split(inputs, 1) == [inputs]


# ------------------------------------------------- worker-side code (runs in the spawned process)


def _init_worker(port: int, backend: str, hide_cuda: bool) -> None:
    os.environ.update(
        LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="torch-extensions-")
    if hide_cuda:  # the CPU tests stay on the CPU on GPU machines too
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch.distributed as dist

    torch.set_num_threads(1)  # tiny model: threads only add jitter on a busy 2-core machine
    dist.init_process_group(backend, rank=0, world_size=1)


def _batch(device="cpu"):
    g = torch.Generator().manual_seed(0)
    b = {"pixels": torch.randn(8, 3, 16, 16, generator=g), "tokens": torch.randint(4, 30, (8, 6), generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def _engine(overrides, seed=0, device="cpu"):
    from raytrain.methods import build_method

    cfg = config(*overrides)
    torch.manual_seed(seed)
    method = build_method(cfg, 30)
    return build_engine(method, cfg, TOTAL_STEPS, torch.device(device)), cfg


def _warm() -> tuple[float, list[str]]:
    """Build one DeepSpeed engine: its time and what it compiled into TORCH_EXTENSIONS_DIR."""
    t = time.perf_counter()
    _engine(["train.deepspeed.zero_stage=0", "train.deepspeed.precision=fp32"])
    return time.perf_counter() - t, os.listdir(os.environ["TORCH_EXTENSIONS_DIR"])


def _train(engine_name: str, stage: int, precision: str, steps: int = 10, device: str = "cpu") -> dict:
    t0 = time.perf_counter()
    overrides = [
        f"train.engine={engine_name}",
        f"train.deepspeed.zero_stage={stage}",
        f"train.deepspeed.precision={precision}",
    ]
    engine, cfg = _engine(overrides, device=device)
    init_s = time.perf_counter() - t0
    seen = {}
    engine.module.register_forward_pre_hook(lambda m, args: seen.update({k: v.dtype for k, v in args[0].items()}))
    batch, out = _batch(device), {"losses": [], "lrs": [], "norms": [], "step_s": []}
    logs_finite = True
    for _ in range(steps):
        t = time.perf_counter()
        loss, logs = engine(batch, 3.0)
        stats = engine.step(loss)
        out["step_s"].append(time.perf_counter() - t)
        out["losses"].append(loss.item())
        out["lrs"].append(stats["lr"])
        out["norms"].append(stats["grad_norm"])
        logs_finite &= all(math.isfinite(float(v)) for v in logs.values())
    out.update(
        init_s=init_s,
        logs_finite=logs_finite,
        param_dtype=next(engine.module.parameters()).dtype,
        input_dtypes=seen,
        expected_lrs=[cfg.optim.lr * lr_factor(cfg.optim, i + 1, TOTAL_STEPS) for i in range(steps)],
    )
    return out


def _fp16() -> dict:
    """Whether DeepSpeed's accelerator here supports fp16 (the question deepspeed.initialize asks:
    CPUs with AVX512-FP16/AMX do, others do not), and what building an fp16 engine gives."""
    from deepspeed.accelerator import get_accelerator

    out = {"supported": get_accelerator().is_fp16_supported(), "error": "", "losses": []}
    try:
        engine, _ = _engine(["train.deepspeed.precision=fp16"])
    except RuntimeError as e:
        out["error"] = str(e)
        return out
    for _ in range(3):
        loss, _ = engine(_batch(), 3.0)
        engine.step(loss)
        out["losses"].append(loss.item())
    return out


def _initialize_error() -> str:
    """deepspeed.initialize refusing a config, on every machine: a ZeRO stage that does not exist."""
    import raytrain.train.engines.deepspeed as engine

    derive = engine.deepspeed_config
    engine.deepspeed_config = lambda cfg, world: {**derive(cfg, world), "zero_optimization": {"stage": 7}}
    try:
        _engine(["train.deepspeed.precision=fp32"])
    except RuntimeError as e:
        return str(e)
    finally:
        engine.deepspeed_config = derive
    return ""


def _accumulate() -> dict:
    """ZeRO-1 fp32, batch 8 = 1 rank × 2 accumulation × micro 4: 4 micro-steps, 2 optimizer steps."""
    engine, cfg = _engine(
        ["train.deepspeed.zero_stage=1", "train.deepspeed.precision=fp32", "train.deepspeed.grad_accumulation=2"]
    )
    batch = {k: v[:4] for k, v in _batch().items()}
    lrs, steps, hooks = [], [], []
    engine.module.after_step = lambda: hooks.append(engine.global_steps)  # e.g. an EMA teacher's update
    for _ in range(4):
        lrs.append(engine.step(engine(batch, 3.0)[0])["lr"])
        steps.append(engine.global_steps)
    return {
        "lrs": lrs,
        "steps": steps,
        "micro": engine.micro_batch_size,
        "accumulation": engine.accumulation,
        "expected": [cfg.optim.lr * lr_factor(cfg.optim, s, TOTAL_STEPS) for s in steps],
        "hooks": hooks,
    }


def _params(engine) -> dict[str, torch.Tensor]:
    """The module's (bf16) parameters, gathered under ZeRO-3."""
    from deepspeed.runtime.zero import GatheredParameters

    named = list(engine.module.named_parameters())
    with GatheredParameters([p for _, p in named], enabled=hasattr(named[0][1], "ds_id")):
        return {n: p.detach().cpu().clone() for n, p in named}


def _optimizer_state(engine) -> list[dict]:
    """The torch AdamW's state that DeepSpeed steps (per flat fp32 partition under ZeRO)."""
    state = engine.engine.basic_optimizer.state
    return [{k: v.detach().cpu().clone() for k, v in s.items()} for s in state.values()]


def _same(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bitwise)."""
    return [k for k in a if not torch.equal(a[k], b[k])]


def _round_trip(stage: int, precision: str, directory: str, device: str = "cpu") -> dict:
    """Train A 3 steps, save; B (other init) loads DeepSpeed's checkpoint; C (other init)
    loads A's consolidated state_dict; then A and B take one more identical step."""
    overrides = [f"train.deepspeed.zero_stage={stage}", f"train.deepspeed.precision={precision}"]
    batch = _batch(device)
    a, _ = _engine(overrides, seed=0, device=device)
    for _ in range(3):
        a.step(a(batch, 3.0)[0])
    t = time.perf_counter()
    a.save(directory)
    save_s = time.perf_counter() - t
    state = a.state_dict()
    b, _ = _engine(overrides, seed=1, device=device)
    differed_before = bool(_same(_params(a), _params(b)))
    t = time.perf_counter()
    b.load(directory)
    load_s = time.perf_counter() - t
    b_state = b.state_dict()
    out = {
        "differed_before": differed_before,
        "params_diff": _same(_params(a), _params(b)),
        "fp32_diff": _same(state["model"], b_state["model"]),
        "optim_diff": [
            i for i, (x, y) in enumerate(zip(_optimizer_state(a), _optimizer_state(b), strict=True)) if _same(x, y)
        ],
        "global_steps": (a.global_steps, b.global_steps),
        "lr": (a.scheduler.get_last_lr(), b.scheduler.get_last_lr()),
        "fp32_dtypes": {v.dtype for v in state["model"].values()},
        "param_dtype": next(a.module.parameters()).dtype,
        "save_s": save_s,
        "load_s": load_s,
    }
    c, _ = _engine(overrides, seed=2, device=device)
    c.load_state_dict(state)
    out["c_fp32_diff"] = _same(state["model"], c.state_dict()["model"])
    out["c_params_diff"] = _same(_params(a), _params(c))
    out["c_steps_lr"] = (
        c.global_steps,
        c.scheduler.get_last_lr(),
        [g["lr"] for g in c.scheduler.optimizer.param_groups],
    )
    # the next step: identical losses and parameters only if optimizer moments came back too
    la, lb, lc = a(batch, 3.0)[0], b(batch, 3.0)[0], c(batch, 3.0)[0]
    a.step(la), b.step(lb)
    out["next_loss"] = (la.item(), lb.item(), lc.item())
    out["next_params_diff"] = _same(_params(a), _params(b))
    out["optim_step"] = [s["step"].item() for s in _optimizer_state(b) if "step" in s]
    return out


# ------------------------------------------------------------- (b) DeepSpeed on the CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Worker:
    """One spawned process holding a world-1 process group; runs module functions."""

    def __init__(self, backend: str, hide_cuda: bool):
        ctx = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_init_worker, initargs=(_free_port(), backend, hide_cuda)
        )

    def __call__(self, fn, *args, timeout: float = 180):
        return self.pool.submit(fn, *args).result(timeout=timeout)

    def close(self):
        processes = list((self.pool._processes or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # only this pool's own worker
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def cpu_worker():
    worker = _Worker("gloo", hide_cuda=True)
    t = time.perf_counter()
    first_engine_s, compiled = worker(_warm, timeout=400)
    assert compiled == [], compiled  # nothing built on a fresh machine (raytrain skips deepspeed_shm_comm)
    print(
        f"\nfirst DeepSpeed engine (incl. worker start): {first_engine_s:.1f}s, "
        f"worker ready {time.perf_counter() - t:.1f}s"
    )
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def zero0_fp32(cpu_worker):
    return cpu_worker(_train, "deepspeed", 0, "fp32")


def _assert_trains(run, dtype):
    losses = run["losses"]
    assert all(math.isfinite(x) for x in losses + run["norms"]), run
    assert run["logs_finite"]
    assert losses[-1] < losses[0] and statistics.mean(losses[-3:]) < statistics.mean(losses[:3]), losses
    assert all(n > 0 for n in run["norms"])
    assert run["lrs"] == pytest.approx(
        run["expected_lrs"], rel=1e-9
    )  # our warmup+cosine LambdaLR, stepped by DeepSpeed
    assert run["param_dtype"] == dtype
    print(
        f"\ninit {run['init_s']:.2f}s, median step {statistics.median(run['step_s']) * 1e3:.1f} ms, "
        f"losses {losses[0]:.3f} -> {losses[-1]:.3f}"
    )


def test_zero2_bf16_trains(cpu_worker):
    run = cpu_worker(_train, "deepspeed", 2, "bf16")
    _assert_trains(run, torch.bfloat16)
    assert run["input_dtypes"] == {"pixels": torch.bfloat16, "tokens": torch.int64}  # floats cast, tokens untouched


def test_zero0_fp32_trains(zero0_fp32):
    _assert_trains(zero0_fp32, torch.float32)
    assert zero0_fp32["input_dtypes"] == {"pixels": torch.float32, "tokens": torch.int64}


def test_zero0_fp32_matches_ddp(cpu_worker, zero0_fp32):
    """Same seed, batch, AdamW, clipping and LR schedule: DDPEngine and DeepSpeed ZeRO-0
    fp32 agree step by step (rtol 1e-5, atol 1e-6 on losses and grad norms)."""
    ddp = cpu_worker(_train, "ddp", 0, "fp32")
    assert ddp["losses"] == pytest.approx(zero0_fp32["losses"], rel=DDP_RTOL, abs=DDP_ATOL)
    assert ddp["norms"] == pytest.approx(zero0_fp32["norms"], rel=DDP_RTOL, abs=DDP_ATOL)
    assert ddp["lrs"] == zero0_fp32["lrs"]
    diff = max(abs(x - y) for x, y in zip(ddp["losses"], zero0_fp32["losses"]))
    print(f"\nmax |loss_ddp - loss_deepspeed| over {len(ddp['losses'])} steps: {diff:.2e}")


def test_initialize_failure_is_explicit(cpu_worker):
    message = cpu_worker(_initialize_error)
    assert "deepspeed.initialize failed" in message and "'precision': 'fp32'" in message and "stage" in message


def test_fp16_follows_the_accelerator(cpu_worker):
    """fp16 trains where DeepSpeed's accelerator supports it, and fails with the config named where not."""
    r = cpu_worker(_fp16)
    if r["supported"]:
        assert r["error"] == "" and all(math.isfinite(x) for x in r["losses"]), r
    else:
        assert "deepspeed.initialize failed" in r["error"] and "'precision': 'fp16'" in r["error"], r
        assert "fp16 is not supported" in r["error"], r


def test_gradient_accumulation(cpu_worker):
    r = cpu_worker(_accumulate)
    assert (r["micro"], r["accumulation"]) == (4, 2)
    assert r["steps"] == [0, 1, 1, 2]  # the optimizer steps on every 2nd micro-batch
    assert r["hooks"] == [1, 2]  # and the method's after_step runs once after each optimizer step
    assert r["lrs"] == pytest.approx(r["expected"], rel=1e-9)  # and so does the LR schedule


def _assert_round_trip(r, dtype):
    assert r["differed_before"]  # B started from other weights
    assert r["params_diff"] == [] and r["fp32_diff"] == [], r
    assert r["optim_diff"] == [], r
    assert r["global_steps"] == (3, 3) and r["lr"][0] == r["lr"][1]
    assert r["fp32_dtypes"] == {torch.float32} and r["param_dtype"] == dtype
    assert r["c_fp32_diff"] == [] and r["c_params_diff"] == [], r
    assert r["c_steps_lr"][0] == 3 and r["c_steps_lr"][1] == r["lr"][0] and r["c_steps_lr"][2] == r["lr"][0]
    assert r["next_loss"][0] == r["next_loss"][1] == r["next_loss"][2] and r["next_params_diff"] == [], r
    assert r["optim_step"] and set(r["optim_step"]) == {4}  # the optimizer's step count came back (3, +1)
    print(f"\nsave {r['save_s']:.2f}s, load {r['load_s']:.2f}s")


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (0, "bf16"), (3, "bf16")])
def test_checkpoint_round_trip(cpu_worker, tmp_path, stage, precision):
    r = cpu_worker(_round_trip, stage, precision, str(tmp_path / "ckpt"))
    _assert_round_trip(r, torch.bfloat16)


# ---------------------------------------------------------------------- (c) on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero2_bf16_on_gpu(tmp_path):
    worker = _Worker("nccl", hide_cuda=False)
    try:
        run = worker(_train, "deepspeed", 2, "bf16", 10, "cuda", timeout=400)
        _assert_trains(run, torch.bfloat16)
        _assert_round_trip(worker(_round_trip, 2, "bf16", str(tmp_path / "ckpt"), "cuda"), torch.bfloat16)
    finally:
        worker.close()


def test_compiled_and_eager_steps_give_the_same_losses():
    """train.compile: the same method, seed and batches give the same losses to float tolerance."""
    from raytrain.methods import build_method

    def losses(compiled: bool) -> list[float]:
        flags = ["train.engine=ddp", "method=clip", "model.image.depth=1", "model.text.depth=1"]
        cfg = config(*flags, f"train.compile={str(compiled).lower()}")
        torch.manual_seed(0)
        engine = build_engine(build_method(cfg, 30), cfg, TOTAL_STEPS, torch.device("cpu"))
        out = []
        for _ in range(3):
            loss, _ = engine(_batch(), 3.0)
            engine.step(loss)
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert compiled == pytest.approx(eager, rel=1e-4), (eager, compiled)
