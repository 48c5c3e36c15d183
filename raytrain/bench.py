"""Speed measured, not asserted: step time, throughput, FLOPs and MFU of the methods' train
steps, the cost of the ranking order and of a live teacher relative to the cache, and the
decode throughput of the data pipeline — as ratios from one run on one machine.

    python jobs/benchmark.py [--scale embedded|paper] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from raytrain.config import make_config
from raytrain.data.transforms import Preprocess, WordTokenizer
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


def step_time(cfg, device: str, steps: int) -> dict:
    torch.manual_seed(0)
    method = build_method(cfg, 100).to(device)
    opt = build_optimizer(cfg.optim, method, method.lr_scales())
    batch = batch_for(cfg, method, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss, _ = method(batch, 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm up (allocations, kernels)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "step_s": seconds,
        "samples_per_s": cfg.train.batch_size / seconds,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
    }


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


def run(scale: str = "embedded", device: str = "cpu", steps: int = 10, out: str | Path = "benchmark") -> dict:
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    results = {}
    for name, overrides in CASES.items():
        cfg = make_config({}, SCALES[scale] + overrides)
        r = step_time(cfg, device, steps)
        if peak:
            r["mfu"] = r["achieved_tflops"] * 1e12 / peak
        results[name] = r
        print(
            f"{name:26s} {r['step_s'] * 1000:9.1f} ms/step {r['samples_per_s']:9.1f} samples/s "
            f"{r['achieved_tflops']:8.3f} TFLOP/s" + (f"  MFU {r['mfu']:.1%}" if peak else ""),
            flush=True,
        )
    clip = results["clip"]["step_s"]
    ratios = {f"{k}/clip": v["step_s"] / clip for k, v in results.items() if k != "clip"}
    ratios["live_teacher/cached"] = (
        results["dinorankclip_R3_live"]["step_s"] / results["dinorankclip_R3_cached"]["step_s"]
    )
    size = make_config({}, SCALES[scale]).data.image_size
    report = {
        "scale": scale,
        "device": device_name,
        "batch_size": make_config({}, SCALES[scale]).train.batch_size,
        "steps": steps,
        "cases": results,
        "ratios": ratios,
        "decode_rows_per_s_per_core": decode_rate(size),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"benchmark-{scale}-{device}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Benchmark: {scale} scale on {device_name} (batch {report['batch_size']})",
        "",
        "| case | ms/step | samples/s | TFLOP/step | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in results.items():
        mfu = f"{v['mfu']:.1%}" if "mfu" in v else "n/a"
        lines.append(
            f"| {k} | {v['step_s'] * 1000:.1f} | {v['samples_per_s']:.1f} | {v['tflops_per_step']:.4f} "
            f"| {v['achieved_tflops']:.3f} | {mfu} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    lines += [
        "",
        f"Decode + resize + normalize + tokenize: {report['decode_rows_per_s_per_core']:.0f} rows/s per core "
        f"at {size} px.",
    ]
    (out / f"benchmark-{scale}-{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
