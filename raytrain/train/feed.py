"""A Ray Train worker's batches, epoch by epoch, read ahead across epoch boundaries.

Each epoch of a Ray Data stream is a new execution: its tasks start, its first file is read and
decoded and the local shuffle buffer fills before the first batch (~0.6 s at the order sweep's
size on 2 cores, 7–9 % of its epochs). Read in turn, the trainer waits for that at every epoch.
`Feed` reads the same `iter_batches` calls in a thread, up to `ahead` batches ahead of the
trainer, and goes on into the next epoch while the last batches of this one train: the start
overlaps those steps. The batches and their order are the same as reading each epoch's
`iter_batches` in turn.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

# batches held ahead of the trainer: enough to cover an epoch's start at the CPU step's pace
# (~0.6 s / 0.17 s); at 224 px and batch 256 each is ~150 MB of host memory
AHEAD = 4
_END = object()  # an epoch's last item


class Feed:
    """The batches of `epochs` from a dataset shard, as the train loop reads them: `batch_size`
    rows, the last partial batch dropped, shuffled locally in a buffer of four batches with a
    seed per (seed, epoch, rank). `epoch(e)` yields epoch e's batches; `close()` stops the reader
    (a trainer that stops early, or fails)."""

    def __init__(self, shard, batch_size: int, seed: int, rank: int, epochs: range, ahead: int = AHEAD):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        args = (shard, batch_size, seed, rank, epochs)
        self._thread = threading.Thread(target=self._read, args=args, name="raytrain-feed", daemon=True)
        self._thread.start()

    def _read(self, shard, batch_size: int, seed: int, rank: int, epochs: range) -> None:
        try:
            for epoch in epochs:
                batches = shard.iter_batches(
                    batch_size=batch_size,
                    batch_format="numpy",
                    drop_last=True,
                    local_shuffle_buffer_size=4 * batch_size,
                    local_shuffle_seed=seed * 7919 + epoch * 31 + rank,
                )
                for batch in batches:
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, _END)):
                    return
        except BaseException as e:  # noqa: BLE001 — raised again in the trainer's thread
            self._put((None, e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def epoch(self, epoch: int) -> Iterator[dict]:
        """Epoch `epoch`'s batches in order (what an earlier epoch left unread is skipped)."""
        while True:
            at, item = self._queue.get()
            if at is None:
                raise item
            if at < epoch:  # the trainer left that epoch early
                continue
            if item is _END:
                return
            yield item

    def close(self) -> None:
        """Stop reading (a run that ends before its last epoch; a failed run's process ends)."""
        self._stop.set()
