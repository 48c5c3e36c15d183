"""Initialization streams: each part of a model draws its initial weights from its own RNG
stream, derived from a seed and the part's name, so switching one part on or off (an
ablation) never changes another part's initial weights — rows of an ablation table then
differ only by what they switch, not by a reshuffled initialization."""

from __future__ import annotations

import contextlib
import zlib

import torch


@contextlib.contextmanager
def part_init(name: str, seed: int | None = None):
    """Build a part inside this context: the CPU RNG is seeded from (seed, name) and restored
    on exit. `seed` None = the seed of the enclosing stream (torch.initial_seed()), so parts
    nest: `part_init("image_injection", 0)` around `part_init("refiner")`."""
    seed = torch.initial_seed() if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        yield
