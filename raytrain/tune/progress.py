"""A sweep's progress for people: one line per finished trial, with an ETA.

    raytrain: [3/18] loss.order=2 seed=0: mean_r@1 0.673 in 1m42s; 2 running, ETA 9m10s
    raytrain: [4/18] loss.order=5 seed=1 failed after 31s: FloatingPointError: loss became nan ...
    raytrain: 18 trials in 14m2s: 17 finished, 1 failed

Tune's own status tables are off (`verbose=0`); the ETA is the time per trial so far (wall
clock, so concurrency counts) times the trials left.
"""

from __future__ import annotations

import re
import time

from ray.tune import Callback

from raytrain.log import log


def duration(seconds: float) -> str:
    """73.4 → '1m13s', 3725 → '1h2m5s'."""
    s = round(seconds)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s" if m else f"{s}s"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(error: BaseException) -> str:
    """The line that says what went wrong (`FloatingPointError: loss became nan ...`), not
    the wrapper's header: Ray nests the worker's traceback inside its own."""
    lines = [ANSI.sub("", x).strip() for x in str(error).splitlines() if x.strip()]
    raised = [x for x in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", x)]
    return (raised or lines or [type(error).__name__])[-1]


class Progress(Callback):
    """Logs each trial's end (its grid values, `primary` metric and time) and the ETA. Counts
    come from Tune's trial list, so a resumed sweep numbers its trials right; the clock starts
    at `setup`, which Tune calls again when it restores this callback with a sweep."""

    def __init__(self, total: int, keys: list[str], primary: str):
        self.total, self.keys, self.primary = total, keys, primary
        self.setup()

    def setup(self, **info):
        self.started, self.ran = time.monotonic(), 0

    def _where(self, trials, trial) -> tuple[str, str]:
        """('[3/18] loss.order=2 seed=0', '; 15 left, ETA 9m10s') for a trial that just ended."""
        self.ran += 1
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        left = self.total - done
        eta = duration((time.monotonic() - self.started) / self.ran * left)
        params = " ".join(f"{k}={trial.config.get(k)}" for k in self.keys)
        return f"[{done}/{self.total}] {params}", f"; {left} left, ETA {eta}" if left > 0 else ""

    def on_trial_complete(self, iteration, trials, trial, **info):
        where, eta = self._where(trials, trial)
        result = trial.last_result or {}
        value = result.get(self.primary)
        shown = f"{self.primary} {value:.3f}" if isinstance(value, int | float) else "not evaluated"
        log.info(f"{where}: {shown} in {duration(result.get('time_total_s', 0.0))}{eta}")

    def on_trial_error(self, iteration, trials, trial, **info):
        where, eta = self._where(trials, trial)
        spent = duration((trial.last_result or {}).get("time_total_s", 0.0))
        error = trial.get_error()
        log.warning(f"{where} failed after {spent}{f': {error_summary(error)}' if error else ''}{eta}")

    def on_experiment_end(self, trials, **info):
        failed = sum(t.status == "ERROR" for t in trials)
        finished = sum(t.status == "TERMINATED" for t in trials)
        spent = duration(time.monotonic() - self.started)
        log.info(f"{len(trials)} trials ({spent} in this run): {finished} finished, {failed} failed")
