"""train_loop_per_worker: the same code on every Ray Train worker."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from raytrain import checkpoint
from raytrain.checkpoint import get_rng_state, set_rng_state
from raytrain.config import make_config
from raytrain.data.pipeline import DataSource
from raytrain.data.schema import SKIP_REASONS
from raytrain.dist import all_sum, gather_objects
from raytrain.log import log, set_level
from raytrain.methods import build_method
from raytrain.train.engines import build_engine
from raytrain.train.feed import Feed

ROW_INFO = ("id", "path", *SKIP_REASONS)  # batch columns that are not model inputs
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's sharded states inside a checkpoint


def worker_config(cfg, src: DataSource) -> dict:
    """What a trial hands its workers: plain data, so it pickles and validates again there."""
    return {"config": cfg.model_dump(mode="json"), "source": dataclasses.asdict(src)}


def train_loop_per_worker(payload: dict) -> None:
    started = time.perf_counter()
    cfg = make_config(payload["config"])
    set_level(cfg.run.log_level)
    src = DataSource(**payload["source"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()
    tokenizer = src.tokenizer(cfg.data)
    method = build_method(cfg, tokenizer.vocab_size, tokenizer.pad_id)

    local_batch = cfg.train.batch_size // world
    steps_per_epoch = src.num_rows // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} exceeds the {src.num_rows} training rows")
    total = min(cfg.train.epochs * steps_per_epoch, cfg.train.max_steps or 1 << 62)
    engine = build_engine(method, cfg, total, device)
    progress = {
        "step": 0,
        "seen": 0,
        "skipped": dict.fromkeys(SKIP_REASONS, 0),
        "resumed_step": -1,
        "world_size": world,
    }
    if (resumed := ray.train.get_checkpoint()) is not None:  # after a failure: continue exactly
        with resumed.as_directory() as d:
            saved, _ = checkpoint.load(d)
            sharded = Path(d) / DEEPSPEED_DIR
            # DeepSpeed's own states, optimizer moments included, at any world size (an elastic
            # resize re-partitions them through a universal checkpoint); DDP's state is whole
            if engine.sharded and sharded.is_dir():
                engine.load(sharded)
            else:
                engine.load_state_dict(saved["engine"])
        progress = {**saved["progress"], "resumed_step": saved["progress"]["step"], "world_size": world}
        if rank < len(saved["rng"]):  # a rank new to a larger world keeps its seeded state
            set_rng_state(saved["rng"][rank])
        log.info(f"resumed at step {progress['step']} from {resumed.path}")
    shard = ray.train.get_dataset_shard("train")

    # step times and, before each, the time blocked on the next batch (the first one's is the
    # stream's start-up, startup_s): data_wait_share says whether a run was input-bound
    window, waits, logs, first_batch_s, ready = [], [], {}, None, None
    # a run restarted from its final checkpoint trains no step: its final report has no loss
    loss, stats, first_epoch = torch.tensor(float("nan")), {}, progress["step"] // steps_per_epoch
    epoch = first_epoch
    feed = Feed(shard, local_batch, cfg.seed, rank, range(first_epoch, cfg.train.epochs))
    for epoch in range(first_epoch, cfg.train.epochs):
        # data position on resume: the same number of rows of this epoch at any world size; at
        # another one not the same rows (docs/training.md#training-on-spot-preemptible-nodes)
        done_in_epoch = progress["step"] - epoch * steps_per_epoch
        for i, batch in enumerate(feed.epoch(epoch)):
            if i >= steps_per_epoch or progress["step"] >= total:  # the same step count on every rank
                break
            if i < done_in_epoch:
                continue
            t0 = time.perf_counter()
            first_batch_s = first_batch_s or t0 - started
            if ready is not None:
                waits.append(t0 - ready)
            keep = ~(batch["bad_image"] | batch["empty_caption"])
            for reason in SKIP_REASONS:
                progress["skipped"][reason] += int(batch[reason].sum())
            inputs = {k: torch.from_numpy(v[keep]).to(device) for k, v in batch.items() if k not in ROW_INFO}
            # one optimizer step; DeepSpeed's gradient accumulation splits it into micro-batches
            # (the last one's loss and logs are reported)
            for micro in _split(inputs, engine.accumulation):
                loss, logs = engine(micro, 1 + epoch + i / steps_per_epoch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at step {progress['step']} (epoch {epoch}); lower optim.lr?"
                    )
                stats = engine.step(loss)
            window.append(time.perf_counter() - t0)
            progress["seen"] += int(keep.sum())
            progress["step"] += 1
            step = progress["step"]
            if step % cfg.train.report_every == 0 and step < total:
                save = cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
                report(
                    _metrics(loss, logs, stats, step, epoch, window, waits, local_batch),
                    engine,
                    progress,
                    cfg,
                    payload,
                    rank,
                    save,
                )
                window, waits = [], []
            ready = time.perf_counter()  # what follows, until the next batch arrives, is waiting for data
        if progress["step"] >= total:
            break
    feed.close()

    # Final report: skipped-row counts summed over ranks (a collective every rank runs),
    # evaluation on rank 0 (no collective inside) and the final checkpoint.
    skipped = progress["skipped"]
    counts = dict(zip(SKIP_REASONS, all_sum([skipped[r] for r in SKIP_REASONS])))
    metrics = _metrics(loss, logs, stats, progress["step"], epoch, window, waits, local_batch)
    metrics.update({f"skipped_{r}": int(n) for r, n in counts.items()}, skipped_rows=int(sum(counts.values())))
    metrics["samples_seen"] = int(all_sum([progress["seen"]])[0])
    metrics.update(
        resumed_step=progress["resumed_step"],
        world_size=world,
        startup_s=first_batch_s or 0.0,
        train_s=time.perf_counter() - started - (first_batch_s or 0.0),
    )
    state = engine.state_dict()  # every rank: a collective under DeepSpeed ZeRO
    if rank == 0 and cfg.train.eval and src.eval_dir:
        t0 = time.perf_counter()
        metrics.update(
            evaluate(eval_model(engine, state, cfg, tokenizer, device), tokenizer, cfg, src.eval_dir, device)
        )
        metrics["eval_s"] = time.perf_counter() - t0
    report(metrics, engine, progress, cfg, payload, rank, save=True, state=state)


def eval_model(engine, state: dict, cfg, tokenizer, device) -> torch.nn.Module:
    """The method to evaluate on rank 0 alone: DDP's own module, or under DeepSpeed an fp32
    copy from the consolidated state (DeepSpeed's parameters may be bf16, or ZeRO-3
    partitions that only a collective can gather)."""
    if engine.kind == "ddp":
        return engine.module
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same frozen teachers as the trained method's
        model = build_method(cfg, tokenizer.vocab_size, tokenizer.pad_id)
    model.load_state_dict(state["model"])
    return model.to(device)


def report(
    metrics: dict, engine, progress: dict, cfg, payload: dict, rank: int, save: bool, state: dict | None = None
) -> None:
    """ray.train.report on every rank; with `save`, a checkpoint: rank 0 writes the
    consolidated engine state (what export and a resume at another world size read), the
    progress (step, data position, counters) and every rank's RNG; under DeepSpeed every
    rank adds its own shards of DeepSpeed's checkpoint in deepspeed/ (Ray merges the ranks'
    directories into one checkpoint). `state`: engine.state_dict() when the caller has it."""
    if not save:
        ray.train.report(metrics)
        return
    rngs = gather_objects(get_rng_state())  # collectives: every rank runs both
    state = state or engine.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        if rank == 0:
            checkpoint.save(
                ckpt, {"engine": state, "progress": progress, "rng": rngs}, cfg, {"source": payload["source"]}
            )
        if engine.sharded:
            engine.save(ckpt / DEEPSPEED_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt) if ckpt.exists() else None)


def _split(inputs: dict, parts: int) -> list[dict]:
    if parts == 1:
        return [inputs]
    chunks = {k: torch.tensor_split(v, parts) for k, v in inputs.items()}
    return [{k: c[j] for k, c in chunks.items()} for j in range(parts)]


def _metrics(loss, logs, stats, step, epoch, window, waits, local_batch) -> dict:
    out = {k: float(v) for k, v in logs.items()}
    out.update(stats, loss=loss.item(), step=step, epoch=epoch)
    if window:
        out["step_time"] = float(np.mean(window))
        out["samples_per_s"] = local_batch / out["step_time"]
        # time blocked on the next batch / (that + step time), over the steps since the last report
        out["data_wait_share"] = float(sum(waits) / (sum(waits) + sum(window)))
    return out


@torch.no_grad()
def evaluate(method, tokenizer, cfg, eval_dir: str, device) -> dict[str, float]:
    """The embedded evaluation suite on each of the method's evaluation encoder pairs
    (`Method.evaluations`, with the same mode's `Method.patch_evaluations` for seg_miou), its
    metrics prefixed by the pair's name."""
    from raytrain.data.transforms import decode_image, normalize
    from raytrain.eval.datasets import read_split
    from raytrain.eval.suite import evaluate as run_suite

    method.eval()
    size, length = cfg.data.image_size, cfg.data.context_length

    def pixels(data: list[bytes]) -> torch.Tensor:
        decoded = [decode_image(b, size) for b in data]
        if any(d is None for d in decoded):
            raise ValueError(f"an evaluation image in {eval_dir} does not decode")
        return torch.from_numpy(normalize(np.stack(decoded), cfg.data.mean, cfg.data.std)).to(device)

    def tokens(captions: list[str]) -> torch.Tensor:
        return torch.from_numpy(tokenizer(captions, length)).to(device)

    results, patches = {}, method.patch_evaluations()
    for prefix, (images, texts) in method.evaluations().items():
        scores = run_suite(
            lambda data, f=images: f(pixels(data)),
            lambda caps, f=texts: f(tokens(caps), caps),
            eval_dir,
            None if (p := patches.get(prefix)) is None else lambda data, f=p: f(pixels(data)),
        )
        results.update({prefix + k: v for k, v in scores.items()})
    # a ranking loss's held-out NLL on the retrieval split's pairs (Method.ranking_evaluation)
    if (pairs := read_split(eval_dir, "retrieval")) is not None:
        results.update(method.ranking_evaluation(pixels(pairs["image"]), tokens(pairs["caption"]), pairs["caption"]))
    method.train()
    return results
