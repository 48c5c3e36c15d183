"""A trial's Ray Train reports to Tune, one at a time, from the trial's own thread.

A trial is a Tune function trainable that runs a Ray Train run. Ray's TuneReportCallback passes
the run's reports to Tune through the trainable's main thread, which deadlocks (Ray 2.60) when a
report is still waiting there as the trial function returns: the main thread then blocks putting
it into Tune's one-slot result queue, which already holds the function's end marker and which
only that thread drains. It happens when Tune's driver is slow between two results (a W&B
callback under load) and the run ends soon after its last report; the trial then hangs forever.
Here the reports travel through a queue of our own, and the trial's thread hands each to
`ray.tune.report` (Tune's ordinary path) before the trial function returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ray import tune
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

CHECKPOINT_PATH = "checkpoint_path"  # the metric TuneReportCallback names a report's checkpoint with


class _Forward(UserCallback):
    """Runs in Ray Train's controller: each report of rank 0 (and its checkpoint's path) to the queue."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH] = checkpoint.path
        self.queue.put(report)


def fit_reporting(fit: Callable[[list], object]):
    """`fit(callbacks)` (one Ray Train run, given the callbacks to pass its RunConfig) in a thread,
    while this thread reports each of its results to Tune; returns what `fit` returns."""
    queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fit([_Forward(queue)])
        except BaseException as e:  # noqa: BLE001  (raised again in the trial's thread)
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ray-train-run", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():  # the run has ended once the thread has
        try:
            tune.report(queue.get(timeout=0.2))
        except Empty:
            pass
    thread.join()
    queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
