"""Cross-worker gather: 2 gloo processes give the single-process global-batch loss and,
after DDP's gradient averaging, the single-process gradients; unequal row counts work."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_MODEL
from torch.nn.parallel import DistributedDataParallel

from raytrain.config import make_config
from raytrain.methods import build_method

OVERRIDES = [
    "loss.order=3",
    "loss.depth=4",
    "loss.ramp=false",
    *TINY_MODEL,
]


def batch(n):
    g = torch.Generator().manual_seed(1)
    return {"pixels": torch.randn(n, 3, 16, 16, generator=g), "tokens": torch.randint(4, 30, (n, 6), generator=g)}


def build():
    torch.manual_seed(0)
    method = build_method(make_config({}, OVERRIDES), 30)
    with torch.no_grad():  # nonzero transition weights so the high-order terms are exercised
        method.image_transition.lam.fill_(0.3)
        method.text_transition.lam.fill_(-0.2)
    return method


def worker(rank, port, splits, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    method = build()
    model = DistributedDataParallel(method)
    full = batch(sum(splits))
    lo = sum(splits[:rank])
    loss, _ = model({k: v[lo : lo + splits[rank]] for k, v in full.items()}, 2.0)
    loss.backward()
    queue.put(
        (rank, loss.item(), {n: p.grad.numpy().copy() for n, p in method.named_parameters() if p.grad is not None})
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("splits", [(6, 6), (7, 5)])
def test_two_ranks_equal_single_process(splits):
    method = build()
    loss, _ = method(batch(sum(splits)), 2.0)
    loss.backward()
    want = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, splits, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, got_loss, grads in results:
        assert got_loss == pytest.approx(loss.item(), rel=1e-5), rank
        assert grads.keys() == want.keys()
        for name, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(g), want[name], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
