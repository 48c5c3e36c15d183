"""A trial's Ray Train reports to Tune, one at a time, from the trial's own thread.

A trial is a Tune function trainable that runs a Ray Train run. Ray's TuneReportCallback passes
the run's reports to Tune through the trainable's main thread, which deadlocks (Ray 2.60) when a
report is still waiting there as the trial function returns: the main thread then blocks putting
it into Tune's one-slot result queue, which already holds the function's end marker and which
only that thread drains. It happens when Tune's driver is slow between two results (a W&B
callback under load) and the run ends soon after its last report; the trial then hangs forever.
Here the reports travel through a mailbox of our own, and the trial's thread hands each to
`ray.tune.report` (Tune's ordinary path) before the trial function returns.

One mailbox actor serves the whole sweep (`Relay.start`, in the driver), each run its own box:
an actor per trial would be one more Python process to start per trial (~1.8 CPU-seconds measured).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable

import ray
from ray import tune
from ray.train import UserCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHECKPOINT_PATH = "checkpoint_path"  # the metric TuneReportCallback names a report's checkpoint with


class Mailboxes:
    """The sweep's relay actor: a box of reports per Ray Train run (async: a run's `take` waits
    without holding up the other runs' calls)."""

    def __init__(self):
        self.boxes: dict[str, tuple[list, asyncio.Event]] = {}

    def _box(self, key: str) -> tuple[list, asyncio.Event]:
        return self.boxes.setdefault(key, ([], asyncio.Event()))

    async def put(self, key: str, report: dict) -> None:
        reports, ready = self._box(key)
        reports.append(report)
        ready.set()

    async def take(self, key: str, timeout: float) -> list[dict]:
        """The box's reports in the order they were put, waiting up to `timeout` s for one."""
        reports, ready = self._box(key)
        if not reports and timeout > 0:
            try:
                await asyncio.wait_for(ready.wait(), timeout)
            except TimeoutError:
                pass
        taken = reports[:]
        reports.clear()
        ready.clear()
        return taken

    async def close(self, key: str) -> None:
        self.boxes.pop(key, None)


def start_relay():
    """The sweep's relay actor, on the driver's node (a node that leaves takes its actors with it,
    and the sweep ends with the driver anyway); pass its handle to every trial."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(Mailboxes).remote()


class _Forward(UserCallback):
    """Runs in Ray Train's controller: each report of rank 0 (and its checkpoint's path) to the
    run's box, returning once the box holds it: every report is in before `fit` returns, and in
    order (an async actor may run calls sent together in any order)."""

    def __init__(self, relay, key: str):
        self.relay, self.key = relay, key

    def after_report(self, run_context, metrics, checkpoint):
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH] = checkpoint.path
        ray.get(self.relay.put.remote(self.key, report))


def fit_reporting(fit: Callable[[list], object], relay):
    """`fit(callbacks)` (one Ray Train run, given the callbacks to pass its RunConfig) in a thread,
    while this thread reports each of its results to Tune through `relay` (`start_relay`);
    returns what `fit` returns."""
    key = uuid.uuid4().hex
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fit([_Forward(relay, key)])
        except BaseException as e:  # noqa: BLE001  (raised again in the trial's thread)
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ray-train-run", daemon=True)
    thread.start()
    try:
        while True:
            running = thread.is_alive()  # before the take: a run that ends after it is drained next
            for report in ray.get(relay.take.remote(key, 0.2 if running else 0)):
                tune.report(report)
            if not running:
                break
    finally:
        relay.close.remote(key)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
