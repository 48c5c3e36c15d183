"""Benchmark the train steps (step time, throughput, FLOPs, MFU on known GPUs), the cost of
the ranking order and of a live vs cached teacher, and decode throughput; writes JSON + Markdown.

    python jobs/benchmark.py [--scale embedded|paper] [--device cpu|cuda] [--steps N] [--out DIR]
"""

import argparse

import torch

from raytrain.bench import SCALES, run

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="embedded")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="results/benchmark")
    args = p.parse_args()
    run(args.scale, args.device, args.steps, args.out)
