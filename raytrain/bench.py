"""Speed measured, not asserted, as ratios from one run on one machine:

- `cases`: step time, throughput, FLOPs and MFU of the methods' train steps (eager, or compiled
  with torch.compile), the cost of the ranking order and of a live teacher relative to the cache;
- `loss_cost`: the ranking objective alone on fixed embeddings at the paper's batch sizes;
- `ingest`: the training stream (Ray Data, as a trial reads it) against a PyTorch DataLoader with
  the same decode and CPUs and against a mock loader, and at the train step's pace;
- `decode_rows_per_s_per_core`; and, for the GPU acceptance run (infra/gpu_check.sh),
  `teacher_throughput`: the teacher-cache build against its teacher's forward alone.

    python jobs/benchmark.py [--scale embedded|paper] [--device cpu|cuda] [--out DIR] [--skip ingest,loss]
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from raytrain.config import make_config
from raytrain.data.transforms import Preprocess, WordTokenizer
from raytrain.log import log
from raytrain.methods import build_method
from raytrain.train.optim import build_optimizer

# dense bf16 peak FLOP/s by device name, for MFU (None: unknown device, MFU not reported)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

SCALES = {
    # the embedded default's sweep student (tune_spaces/order_sweep.yaml)
    "embedded": [
        "data.image_size=32",
        "data.context_length=24",
        "model.embed_dim=64",
        "model.image.width=64",
        "model.image.depth=3",
        "model.image.heads=2",
        "model.image.patch=8",
        "model.text.width=64",
        "model.text.heads=2",
        "train.batch_size=128",
        "loss.depth=16",
    ],
    # a ViT-B/16-like student at 224 px with a ViT-B/16 teacher (the paper's scale per GPU)
    "paper": [
        "data.image_size=224",
        "data.context_length=32",
        "model.embed_dim=512",
        "model.image.width=768",
        "model.image.depth=12",
        "model.image.heads=12",
        "model.image.patch=16",
        "model.text.width=512",
        "model.text.depth=12",
        "model.text.heads=8",
        "train.batch_size=256",
        "loss.depth=16",
        "teachers.dinov3.size=vitb16",
        "teachers.dinov3.image_size=224",
    ],
}

CASES = {
    "clip": ["method=clip"],
    "rankclip_R1": ["method=rankclip", "loss.order=1"],
    "rankclip_R3": ["method=rankclip", "loss.order=3"],
    "rankclip_R5": ["method=rankclip", "loss.order=5"],
    "dinorankclip_R3_cached": ["method=dinorankclip", "loss.order=3", "cache.use=true", "cache.teachers=[dinov3,text]"],
    "dinorankclip_R3_live": ["method=dinorankclip", "loss.order=3", "dinorankclip.text_injection=false"],
}

LOSS_BATCHES = (256, 1024, 4096)  # the paper-scale profiles' batch per GPU (256) and global (4096)
LOSS_ORDERS = (0, 1, 3, 5)
SWEEP_SPACE = "tune_spaces/order_sweep.yaml"  # the step pace the ingest is measured at
SWEEP_STEP = ["loss.order=0"]  # its fastest trial (CLIP): the one that asks most of the stream


def batch_for(cfg, method, device) -> dict:
    """A synthetic batch with what the cache-fed stream carries."""
    from raytrain.teachers.dinov3 import describe

    b, size, length = cfg.train.batch_size, cfg.data.image_size, cfg.data.context_length
    dim, scales, grid = describe(cfg.teachers.dinov3)
    g = torch.Generator().manual_seed(0)
    out = {
        "pixels": torch.randn(b, 3, size, size, generator=g),
        "tokens": torch.randint(4, 100, (b, length), generator=g),
    }
    if cfg.cache.use:
        out.update(
            dinov3_cls=torch.randn(b, dim, generator=g),
            dinov3_multiscale=torch.randn(b, scales, grid * grid, dim, generator=g),
            text=torch.nn.functional.normalize(torch.randn(b, 384, generator=g), dim=-1),
        )
    return {k: v.to(device) for k, v in out.items()}


def train_step(cfg, device: str, compile: bool = False, vocab_size: int = 100) -> tuple[Callable, torch.nn.Module]:
    """The benchmark's train step (forward, backward, optimizer step; bf16 autocast on CUDA) as
    `step(batch)`, and the method it trains. `compile`: the method's forward (encoders and loss)
    through torch.compile."""
    torch.manual_seed(0)
    method = build_method(cfg, vocab_size).to(device)
    opt = build_optimizer(cfg.optim, method, method.lr_scales())
    forward = torch.compile(method) if compile else method
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step(batch):
        with amp:
            loss, _ = forward(batch, 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, method


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_time(cfg, device: str, steps: int, compile: bool = False) -> dict:
    """Median step time of `steps` timed steps after warm-up (compilation included in warm-up),
    FLOPs counted on the eager step. On the "meta" device (shapes without data) only the FLOPs:
    seconds instead of the hours a paper-scale step takes on one CPU core."""
    if device == "meta":
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            step, method = train_step(cfg, device)
            step(batch_for(cfg, method, device))
        return {"tflops_per_step": counter.get_total_flops() / 1e12, "trainable_params_m": _trainable(method)}
    step, method = train_step(cfg, device)
    batch = batch_for(cfg, method, device)
    step(batch)  # warm up (allocations, kernels)
    with FlopCounterMode(display=False) as counter:
        step(batch)
    flops = counter.get_total_flops()
    warmup_s = None
    if compile:
        step, method = train_step(cfg, device, compile=True)
        t0 = time.perf_counter()
        for _ in range(2):  # the first calls compile forward and backward
            step(batch)
        _sync(device)
        warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out = {
        "trainable_params_m": _trainable(method),
        "step_s": seconds,
        "samples_per_s": cfg.train.batch_size / seconds,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
    }
    if warmup_s is not None:
        out["compile_s"] = warmup_s
    return out


def _trainable(method: torch.nn.Module) -> float:
    """Trainable parameters, in millions."""
    return sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6


def decode_rate(size: int, n: int = 512) -> float:
    """Rows/s of the stream's decode + resize + normalize + tokenize on one core."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    cfg = make_config({}, [f"data.image_size={size}"]).data
    fn = Preprocess(WordTokenizer(["a", "red", "circle"]), cfg)
    batch = {
        "id": np.array([str(i) for i in range(n)]),
        "image": np.array(blobs, dtype=object),
        "caption": np.array(["a red circle"] * n, dtype=object),
    }
    t0 = time.perf_counter()
    fn(batch)
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- loss cost


def peak_memory(fn: Callable[[], None], device: str) -> int | None:
    """Bytes allocated at the peak of `fn()` beyond what was allocated before it: the CUDA
    allocator's peak, or on CPU the largest running total of the profiler's allocation records
    (None where the profiler gives none)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    totals = [0]
    try:  # the running total of CPU allocations, recorded with each allocation and free
        nodes = list(prof.profiler.kineto_results.experimental_event_tree())
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
                totals.append(node.extra_fields.total_allocated)
    except AttributeError:  # another torch's profiler internals
        return None
    return max(totals)


def loss_cost(
    device: str,
    batches: Iterable[int] = LOSS_BATCHES,
    orders: Iterable[int] = LOSS_ORDERS,
    repeats: int = 3,
    max_case_s: float = 60.0,
    memory_limit: int | None = None,
) -> dict:
    """Forward + backward time (median of up to `repeats` runs) and peak memory of the objective
    of order R on fixed embeddings of the paper-scale student (512-d, depth 16): R = 0 CLIP's
    loss, R ≥ 1 CLIP's + ranking_consistency_loss (RankCLIP targets, in-modal terms, transitions
    for R ≥ 2). A case is skipped, and said why, when projected from the same order at the
    largest smaller batch measured (time and memory ∝ B²) it would take over `max_case_s` per
    run or need over `memory_limit` bytes (default: half of the memory available now).
    `exp_pass_s`: one exponential over the four [B, K, B] lists, the least an order ≥ 2 loss
    computes (its forward alone takes several)."""
    from raytrain.losses.contrastive import clip_loss
    from raytrain.losses.ranking import CHUNK, Transition, ranking_consistency_loss

    cfg = make_config({}, SCALES["paper"])
    dim, depth, tdim = cfg.model.embed_dim, cfg.loss.depth, cfg.loss.transition_dim
    memory_limit = memory_limit or _available_memory(device) // 2
    out, measured = {"embed_dim": dim, "depth": depth, "transition_dim": tdim}, {}
    for b in sorted(batches):
        g = torch.Generator().manual_seed(b)
        u = torch.randn(b, dim, generator=g).to(device).requires_grad_()
        v = torch.randn(b, dim, generator=g).to(device).requires_grad_()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        entry = {}
        for r in sorted(orders):
            if r in measured:
                smaller, seconds, peak = measured[r]
                grow = (b / smaller) ** 2
                if seconds * grow > max_case_s or (peak or 0) * grow > memory_limit:
                    limits = f"limits {max_case_s:.0f} s, {memory_limit / 2**30:.1f} GiB"
                    entry[f"R{r}"] = {
                        "skipped": f"projected from B{smaller} (∝ B²): {seconds * grow:.0f} s per run, "
                        f"{(peak or 0) * grow / 2**30:.1f} GiB; {limits}"
                    }
                    log.info(f"loss cost B{b} R{r} skipped: {entry[f'R{r}']['skipped']}")
                    continue
            trans = [Transition(dim, tdim, r).to(device) for _ in range(2)] if r >= 2 else [None, None]

            def run(r=r, trans=trans, u=u, v=v, scale=scale):
                loss = clip_loss(u, v, scale)
                if r:
                    loss = loss + ranking_consistency_loss(u, v, scale, r, depth, True, None, *trans)
                loss.backward()
                _sync(device)

            peak = peak_memory(run, device)  # also the warm-up
            times = []  # a slow case is timed fewer times (its noise is smaller)
            while len(times) < repeats and sum(times) < max_case_s / 4:
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            entry[f"R{r}"] = {"s": statistics.median(times), "runs": len(times), "peak_bytes": peak}
            measured[r] = (b, entry[f"R{r}"]["s"], peak)
            log.info(f"loss cost B{b} R{r}: {entry[f'R{r}']['s'] * 1000:.1f} ms, peak {_mib(peak)}")
        base = entry.get("R0", {}).get("s")
        if base:
            entry.update({f"{k}_vs_R0": v["s"] / base for k, v in list(entry.items()) if k != "R0" and "s" in v})
        entry["exp_pass_s"] = _exp_pass(4 * b * min(depth, b) * b, CHUNK.get(device, CHUNK["cpu"]), device)
        out[f"B{b}"] = entry
    return out


def _exp_pass(elements: int, chunk: int, device: str) -> float:
    """Seconds to exponentiate `elements` floats in place, a chunk at a time."""
    buf = torch.randn(min(chunk, elements), device=device)
    reps = math.ceil(elements / buf.numel())
    buf.exp_()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        buf.exp_().neg_()  # stays finite
    _sync(device)
    return time.perf_counter() - t0


def _available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- ingest


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _consume(epochs: Iterable[Iterable], rows_of: Callable, step: Callable | None = None) -> dict:
    """Iterate the epochs' batches (running `step` on each): time to the first batch, then rows/s,
    steps/s, the waits for each later batch (p50, p99) and the share of time spent waiting, all
    after the first batch (an epoch's start is one of its waits); and apart, the later epochs'
    start waits and the rows/s without them (what a long epoch approaches)."""
    start = time.perf_counter()
    first = None
    waits, starts, rows, steps = [], [], 0, 0
    for batches in epochs:
        it = iter(batches)
        opening = first is not None
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            if first is None:
                first = t1
            else:
                waits.append(t1 - t0)
                if opening:
                    starts.append(t1 - t0)
                rows += rows_of(batch)
                steps += 1
            opening = False
            if step is not None:
                step(batch)
    end = time.perf_counter()
    span = max(end - (first or end), 1e-9)
    return {
        "time_to_first_batch_s": (first or end) - start,
        "rows_per_s": rows / span,
        "steps_per_s": steps / span,
        "fetch_p50_s": float(np.percentile(waits, 50)) if waits else None,
        "fetch_p99_s": float(np.percentile(waits, 99)) if waits else None,
        "data_wait_share": sum(waits) / span,
        "epoch_start_s": float(np.mean(starts)) if starts else None,
        "in_epoch_rows_per_s": rows / max(span - sum(starts), 1e-9),
        "batches": steps + (first is not None),
    }


class _Rows(torch.utils.data.Dataset):
    """The training files' rows (id, image bytes, caption) in memory; a batch of indices is
    decoded by the stream's own Preprocess (`__getitems__`: one call per batch, as Ray Data's
    map_batches does, instead of one per row)."""

    def __init__(self, src, cfg):
        import pyarrow as pa

        from raytrain.data.formats import read_file
        from raytrain.data.sources import resolve

        fs, _ = resolve(src.path, cfg.s3)
        columns = ["id", "image", cfg.caption_column]
        self.table = pa.concat_tables([read_file(fs, f, cfg, columns) for f in src.files])
        self.fn = Preprocess(src.tokenizer(cfg), cfg)

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitems__(self, indices) -> dict:
        rows = self.table.take(indices)
        batch = {c: np.array(rows.column(c).to_pylist(), dtype=object) for c in rows.column_names}
        return {k: torch.from_numpy(v) for k, v in self.fn(batch).items() if k != "id"}


def _whole(batch):  # collate_fn: __getitems__ already made the batch
    return batch


def _rows_of(batch) -> int:
    return len(batch["tokens"])


def dataloader_ingest(src, cfg, batch_size: int, epochs: int, workers: int, seed: int = 0) -> dict:
    """A plain PyTorch DataLoader over the same files with the same decode: shuffled, `workers`
    worker processes (persistent across epochs), `batch_size` rows per batch."""
    data = _Rows(src, cfg)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=_whole,
        generator=torch.Generator().manual_seed(seed),
    )
    return _consume((loader for _ in range(epochs)), _rows_of)


def mock_ingest(batch: dict, batches: int, epochs: int, step: Callable | None = None) -> dict:
    """A loader that costs nothing: the same ready batch, `batches` times per epoch."""
    return _consume(([batch] * batches for _ in range(epochs)), _rows_of, step)


def _ingest_worker(payload: dict) -> None:
    """Ray Train worker: each stream's batches exactly as the train loop asks for them, for
    `epochs` epochs; then the sweep's train step fed by the step stream and by a mock."""
    import ray.train

    from raytrain.train.feed import Feed
    from raytrain.train.loop import ROW_INFO

    torch.manual_seed(0)
    seed, out = payload["seed"], {"threads": torch.get_num_threads()}

    def epochs(name: str, n: int):
        # the train loop's reader (rank 0), arguments and all
        feed = Feed(ray.train.get_dataset_shard(name), payload["batch_size"][name], seed, 0, range(n))
        yield from (feed.epoch(epoch) for epoch in range(n))
        feed.close()

    for name, n in payload["epochs"].items():
        out[name] = _consume(epochs(name, n), lambda b: len(b["id"]))
    cfg = make_config(payload["step_config"])
    step, _ = train_step(cfg, "cpu", vocab_size=payload["vocab_size"])
    last = {}

    def feed(batch):
        keep = ~(batch["bad_image"] | batch["empty_caption"])
        last["batch"] = {k: torch.from_numpy(v[keep]) for k, v in batch.items() if k not in ROW_INFO}
        step(last["batch"])

    name, n = payload["step_stream"], payload["step_epochs"]
    out["step_ray_data"] = _consume(epochs(name, n), lambda b: len(b["id"]), feed)
    batches = out["step_ray_data"]["batches"] // n
    out["step_mock"] = mock_ingest(last["batch"], batches, n, step)
    with tempfile.TemporaryDirectory() as tmp:  # Train keeps a run's results with its checkpoint
        Path(tmp, "ingest.json").write_text(json.dumps(out))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ingest(
    cpus: int | None = None,
    epochs: int = 3,
    step_epochs: int = 2,
    rows_224: int = 2048,
    overrides: list[str] = (),
) -> dict:
    """The training stream's rows/s against a DataLoader and a mock, on the sweep's dataset (the
    embedded default) and on `rows_224` generated 224-px images, with `cpus` CPUs for each
    (default: this machine's): a local Ray cluster of `cpus` CPUs running one trial's Ray Train
    worker (the sweep's resources) fed by `train_dataset` as a trial is, in `cpus` decode
    tasks (`data.decode_tasks`); a DataLoader with `cpus` worker processes. Then the
    sweep's fastest train step on the sweep's own stream (its `data.decode_tasks`) against the
    same step on a mock batch: `ray_data_vs_mock` = steps/s with Ray Data / with the mock."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrain.data.pipeline import prepare, train_dataset
    from raytrain.data.synthetic import make_dataset
    from raytrain.tune.sweep import ingest_config, load_space, runtime_env

    cpus = cpus or os.cpu_count() or 1
    _, base, _ = load_space(SWEEP_SPACE, [*SWEEP_STEP, *overrides])
    out = {
        "cpus": cpus,
        "decode_tasks": {"streams": cpus, "step_pace": base.data.decode_tasks},
        "sweep": f"{SWEEP_SPACE} with {' '.join(SWEEP_STEP)}",
        "streams": {},
    }
    with tempfile.TemporaryDirectory(prefix="raytrain-bench-") as tmp:
        t0 = time.perf_counter()
        # in files of 256 rows, as a real dataset is many files (shared among the decode tasks)
        make_dataset(Path(tmp) / "d224", rows_224, 16, 0, 224, shard_rows=256)
        log.info(f"ingest: {rows_224} 224-px rows generated in {time.perf_counter() - t0:.1f} s")
        configs = {
            "embedded": base.override({"data.decode_tasks": cpus}),
            "224px": base.override({"data.path": f"{tmp}/d224", "data.image_size": 224, "data.decode_tasks": cpus}),
        }
        sources = {name: prepare(cfg.data) for name, cfg in configs.items()}
        batch = base.train.batch_size
        for name, src in sources.items():
            stream = out["streams"][name] = {"rows": src.num_rows, "image_size": configs[name].data.image_size}
            stream["dataloader"] = dataloader_ingest(src, configs[name].data, batch, epochs, cpus, base.seed)
            ready = next(iter(torch.utils.data.DataLoader(_Rows(src, configs[name].data), batch, collate_fn=_whole)))
            stream["mock"] = mock_ingest(ready, src.num_rows // batch, epochs)
            log.info(f"ingest {name}: DataLoader {stream['dataloader']['rows_per_s']:.0f} rows/s")
        started = not ray.is_initialized()
        if started:
            ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env()
            )
        try:
            payload = {
                "seed": base.seed,
                "batch_size": {name: batch for name in [*sources, "sweep"]},
                "epochs": {name: epochs for name in sources},
                "step_config": base.model_dump(mode="json"),
                "vocab_size": sources["embedded"].tokenizer(base.data).vocab_size,
                "step_stream": "sweep",
                "step_epochs": step_epochs,
            }
            trainer = TorchTrainer(
                _ingest_worker,
                train_loop_config=payload,
                scaling_config=ScalingConfig(
                    num_workers=1, use_gpu=False, resources_per_worker={"CPU": base.train.cpus_per_worker}
                ),
                datasets={
                    **{n: train_dataset(src, configs[n].data, base.seed) for n, src in sources.items()},
                    "sweep": train_dataset(sources["embedded"], base.data, base.seed),
                },
                dataset_config=ingest_config(),
                run_config=RunConfig(name="ingest", storage_path=f"{tmp}/runs"),
            )
            with trainer.fit().checkpoint.as_directory() as d:
                result = json.loads(Path(d, "ingest.json").read_text())
        finally:
            if started:
                ray.shutdown()
    out["worker_threads"] = result.pop("threads")
    for name, stream in out["streams"].items():
        stream["ray_data"] = result[name]
        rd, dl, mock = (stream[k]["rows_per_s"] for k in ("ray_data", "dataloader", "mock"))
        stream.update(
            ray_data_rows_per_s=rd,
            dataloader_rows_per_s=dl,
            mock_rows_per_s=mock,
            ray_data_vs_dataloader=_ratio(rd, dl),
            in_epoch_ray_data_vs_dataloader=_ratio(
                stream["ray_data"]["in_epoch_rows_per_s"], stream["dataloader"]["in_epoch_rows_per_s"]
            ),
            time_to_first_batch_s={k: stream[k]["time_to_first_batch_s"] for k in ("ray_data", "dataloader")},
            fetch_p99_s={k: stream[k]["fetch_p99_s"] for k in ("ray_data", "dataloader")},
        )
    pace = out["step_pace"] = {"ray_data": result["step_ray_data"], "mock": result["step_mock"]}
    pace["ray_data_vs_mock"] = _ratio(pace["ray_data"]["steps_per_s"], pace["mock"]["steps_per_s"])
    embedded = out["streams"]["embedded"]
    out.update(
        ray_data_rows_per_s=embedded["ray_data_rows_per_s"],
        dataloader_rows_per_s=embedded["dataloader_rows_per_s"],
        mock_rows_per_s=embedded["mock_rows_per_s"],
        ray_data_vs_dataloader=embedded["ray_data_vs_dataloader"],
        ray_data_vs_mock=pace["ray_data_vs_mock"],
        time_to_first_batch_s=embedded["ray_data"]["time_to_first_batch_s"],
        fetch_p99_s=embedded["ray_data"]["fetch_p99_s"],
        data_wait_share=pace["ray_data"]["data_wait_share"],
    )
    return out


# --------------------------------------------------------------------------- teacher cache


def teacher_throughput(
    device: str, size: str = "vitb16", image_size: int = 224, rows: int = 512, batch: int = 64
) -> dict:
    """The teacher-cache build's rows/s (read + decode + normalize + the DINOv3 teacher: the code
    each of the build's Ray actors runs per training file, `_ShardBuilder.build`) against the same
    teacher's forward alone on ready pixels (`model_rows_per_s`), on `rows` generated images with
    random weights. `build_vs_model` ≥ 0.8 means decode is not what limits the build."""
    from dataclasses import asdict

    from raytrain.data.pipeline import prepare
    from raytrain.data.sources import resolve
    from raytrain.data.synthetic import make_dataset
    from raytrain.teachers.cache import _ShardBuilder

    with tempfile.TemporaryDirectory(prefix="raytrain-teacher-") as tmp:
        make_dataset(tmp, rows, 16, 0, image_size)
        cfg = make_config(
            {},
            [
                f"data.path={tmp}",
                f"data.image_size={image_size}",
                f"teachers.dinov3.size={size}",
                f"teachers.dinov3.image_size={image_size}",
                "cache.teachers=[dinov3]",
                f"cache.batch_size={batch}",
            ],
        )
        src = prepare(cfg.data)
        fs, out_root = resolve(f"{tmp}/cache")
        builder = _ShardBuilder(cfg.model_dump(mode="json"), asdict(src), resolve(src.path)[0], fs, out_root)
        teacher = builder.teachers.dinov3
        pixels = torch.randn(batch, 3, image_size, image_size, device=builder.teachers.device)
        with torch.no_grad():
            teacher(pixels)  # warm up
            _sync(device)
            t0 = time.perf_counter()
            reps = max(1, rows // batch)
            for _ in range(reps):
                teacher(pixels)
            _sync(device)
        model = reps * batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        built = sum(builder.build(i)["rows"] for i in range(len(src.files)))
        _sync(device)
        build = built / (time.perf_counter() - t0)
    return {
        "teacher": size,
        "image_size": image_size,
        "rows": built,
        "device": str(builder.teachers.device),
        "build_rows_per_s": build,
        "model_rows_per_s": model,
        "build_vs_model": build / model,
    }


# --------------------------------------------------------------------------- the run


def run(
    scale: str = "embedded",
    device: str = "cpu",
    steps: int = 10,
    out: str | Path = "benchmark",
    threads: int | None = None,
    skip: Iterable[str] = (),
    cases: Iterable[str] | None = None,
    compile: bool = False,
    loss_batches: Iterable[int] = LOSS_BATCHES,
    ingest_options: dict | None = None,
    teacher: dict | None = None,
) -> dict:
    """Every measurement not in `skip` (of "cases", "loss", "ingest", "decode"), and with
    `teacher` (teacher_throughput's arguments) the teacher-cache build, written to
    `out/benchmark-<scale>-<device>[-compiled].json` and `.md`. `threads`: torch's CPU threads
    (default 1 on CPU: what a sweep trial's worker gets, and robust on a shared machine)."""
    skip = set(skip) | ({"loss", "ingest", "decode"} if device == "meta" else set())
    if device != "cuda" or threads:
        torch.set_num_threads(threads or 1)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    report = {
        "scale": scale,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "compiled": compile,
        "batch_size": make_config({}, SCALES[scale]).train.batch_size,
        "steps": steps,
        "load_average": list(os.getloadavg()),
    }
    if "cases" not in skip:
        results = {}
        for name in cases or CASES:
            cfg = make_config({}, SCALES[scale] + CASES[name])
            r = results[name] = step_time(cfg, device, steps, compile)
            r["gflops_per_sample"] = r["tflops_per_step"] * 1e3 / cfg.train.batch_size
            if "step_s" not in r:  # meta: FLOPs only
                log.info(f"{name}: {r['tflops_per_step']:.3f} TFLOP/step")
                continue
            if peak:
                r["mfu"] = r["achieved_tflops"] * 1e12 / peak
            log.info(
                f"{name}: {r['step_s'] * 1000:.1f} ms/step, {r['samples_per_s']:.1f} samples/s, "
                f"{r['achieved_tflops']:.3f} TFLOP/s" + (f", MFU {r['mfu']:.1%}" if peak else "")
            )
        report["cases"] = results
        report["ratios"] = _ratios(results)
    if "decode" not in skip:  # at the scale's image size and at 224 px
        sizes = sorted({make_config({}, SCALES[scale]).data.image_size, 224})
        report["decode_rows_per_s_per_core"] = {f"{size}px": decode_rate(size) for size in sizes}
    if "loss" not in skip:
        report["loss_cost"] = loss_cost(device, loss_batches)
    if "ingest" not in skip:
        report["ingest"] = ingest(**(ingest_options or {}))
    if teacher is not None:
        report["teacher"] = teacher_throughput(device, **teacher)
    report["load_average_end"] = list(os.getloadavg())
    name = f"benchmark-{scale}-{device}" + ("-compiled" if compile else "")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / f"{name}.md").write_text(text)
    print(text)
    return report


def _ratios(results: dict) -> dict:
    ratios = {}
    if any("step_s" not in r for r in results.values()):  # meta: FLOPs only
        return ratios
    if "clip" in results:
        clip = results["clip"]["step_s"]
        ratios = {f"{k}/clip": v["step_s"] / clip for k, v in results.items() if k != "clip"}
    if {"dinorankclip_R3_live", "dinorankclip_R3_cached"} <= set(results):
        ratios["live_teacher/cached"] = (
            results["dinorankclip_R3_live"]["step_s"] / results["dinorankclip_R3_cached"]["step_s"]
        )
    return ratios


def _f(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else f"{x:{fmt}}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.2f}"


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    mode = "compiled" if report["compiled"] else "eager"
    lines = [
        f"# Benchmark: {report['scale']} scale on {report['device']} (batch {report['batch_size']}, "
        f"{mode}, {report['threads']} torch threads)",
        "",
        f"Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in report['load_average'])}; "
        f"at the end: {', '.join(f'{x:.2f}' for x in report['load_average_end'])}.",
    ]
    if "cases" in report:
        lines += [
            "",
            "| case | params (M) | ms/step | samples/s | TFLOP/step | GFLOP/sample | TFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, v in report["cases"].items():
            lines.append(
                f"| {k} | {v['trainable_params_m']:.1f} | {_ms(v.get('step_s'))} | {_f(v.get('samples_per_s'), '.1f')} "
                f"| {v['tflops_per_step']:.4f} | {v['gflops_per_sample']:.2f} | {_f(v.get('achieved_tflops'), '.3f')} "
                f"| {_f(v.get('mfu'), '.1%')} |"
            )
        if report["ratios"]:
            lines += ["", "| ratio | value |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    if "decode_rows_per_s_per_core" in report:
        rates = ", ".join(f"{v:.0f} at {k}" for k, v in report["decode_rows_per_s_per_core"].items())
        lines += ["", f"Decode + resize + normalize + tokenize of random-noise PNGs, rows/s per core: {rates}."]
    if "loss_cost" in report:
        lc = report["loss_cost"]
        lines += [
            "",
            f"## Ranking objective on fixed embeddings ({lc['embed_dim']}-d, depth {lc['depth']}), forward + backward",
            "",
            "| batch | order | ms | peak memory | vs R0 |",
            "|---|---|---|---|---|",
        ]
        for b, entry in lc.items():
            if not b.startswith("B"):
                continue
            for r, v in entry.items():
                if not r.startswith("R") or "_vs_" in r:
                    continue
                if "skipped" in v:
                    lines.append(f"| {b[1:]} | {r[1:]} | skipped: {v['skipped']} | | |")
                else:
                    lines.append(
                        f"| {b[1:]} | {r[1:]} | {v['s'] * 1000:.1f} | {_mib(v['peak_bytes'])} "
                        f"| {_f(entry.get(f'{r}_vs_R0'))} |"
                    )
            lines.append(f"| {b[1:]} | one exp over the 4 lists | {entry['exp_pass_s'] * 1000:.1f} | | |")
    if "ingest" in report:
        ing = report["ingest"]
        lines += [
            "",
            f"## Ingest ({ing['cpus']} CPUs for each loader; Ray Train worker: {ing['worker_threads']} torch threads)",
            "",
            "| stream | loader | rows/s | first batch s | fetch p50 ms | fetch p99 ms "
            "| epoch start s | in-epoch rows/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, s in ing["streams"].items():
            for loader in ("ray_data", "dataloader", "mock"):
                v = s[loader]
                lines.append(
                    f"| {name} ({s['rows']} rows, {s['image_size']} px) | {loader} | {v['rows_per_s']:.0f} "
                    f"| {v['time_to_first_batch_s']:.2f} | {_ms(v['fetch_p50_s'])} | {_ms(v['fetch_p99_s'])} "
                    f"| {_f(v['epoch_start_s'])} | {v['in_epoch_rows_per_s']:.0f} |"
                )
            lines.append(
                f"| {name} | Ray Data / DataLoader | {_f(s['ray_data_vs_dataloader'])} | | | | "
                f"| {_f(s['in_epoch_ray_data_vs_dataloader'])} |"
            )
        pace = ing["step_pace"]
        lines += [
            "",
            f"At the train step's pace ({ing['sweep']}): Ray Data {pace['ray_data']['steps_per_s']:.2f} steps/s, "
            f"mock {pace['mock']['steps_per_s']:.2f} steps/s: ray_data_vs_mock {_f(pace['ray_data_vs_mock'])}; "
            f"waiting for data {pace['ray_data']['data_wait_share']:.1%} of the time.",
        ]
    if "teacher" in report:
        t = report["teacher"]
        lines += [
            "",
            f"Teacher cache build ({t['teacher']}, {t['image_size']} px, {t['rows']} rows, {t['device']}): "
            f"{t['build_rows_per_s']:.0f} rows/s; the teacher's forward alone {t['model_rows_per_s']:.0f} rows/s: "
            f"build_vs_model {t['build_vs_model']:.2f}.",
        ]
    return "\n".join(lines) + "\n"
