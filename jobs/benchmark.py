"""Benchmark the train steps (step time, throughput, FLOPs, MFU on known GPUs), the cost of
the ranking order and of a live vs cached teacher, the ranking objective at the paper's batch
sizes, the training stream against a DataLoader and a mock, and decode throughput; writes JSON +
Markdown (raytrain.bench).

    python jobs/benchmark.py [--scale embedded|paper] [--device cpu|cuda|meta] [--steps N] [--out DIR]
        [--threads N] [--skip cases,loss,ingest,decode] [--cases clip,rankclip_R3] [--compile]
        [--loss-batches 256,1024,4096] [--teacher vitb16:224:512]
"""

import argparse

import torch

from raytrain.bench import CASES, LOSS_BATCHES, SCALES, run


def names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def teacher(text: str) -> dict:
    size, image_size, rows, *batch = text.split(":")
    return {
        "size": size,
        "image_size": int(image_size),
        "rows": int(rows),
        **({"batch": int(batch[0])} if batch else {}),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="embedded")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "meta"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="meta: count the cases' FLOPs only (shapes without data; seconds even at paper scale)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (median reported)")
    p.add_argument("--out", default="results/benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--skip", type=names, default=[], help="parts to leave out: cases, loss, ingest, decode")
    p.add_argument("--cases", type=names, default=None, help=f"cases to run (default all: {','.join(CASES)})")
    p.add_argument("--compile", action="store_true", help="torch.compile each case's method (student and loss)")
    p.add_argument("--loss-batches", type=lambda s: [int(x) for x in names(s)], default=list(LOSS_BATCHES))
    p.add_argument(
        "--teacher",
        type=teacher,
        default=None,
        help="also time the teacher-cache build against its teacher's forward: SIZE:IMAGE_SIZE:ROWS[:BATCH]",
    )
    args = p.parse_args()
    unknown = set(args.cases or []) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    run(
        args.scale,
        args.device,
        args.steps,
        args.out,
        args.threads,
        args.skip,
        args.cases,
        args.compile,
        args.loss_batches,
        teacher=args.teacher,
    )
