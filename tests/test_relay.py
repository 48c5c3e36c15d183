"""The sweep's relay (tune/relay.py): a Ray Train run's reports reach Tune from the trial's own
thread, all of them, in order, each run's through its own box of the sweep's one actor. And the
test clusters' State API lookups (conftest), which must never reach another test's cluster."""

import threading
import time
from types import SimpleNamespace

import pytest

from raytrain.tune import relay as relay_module
from raytrain.tune.relay import CHECKPOINT_PATH, fit_reporting, start_relay


@pytest.fixture(scope="module")
def relay():
    from conftest import start_local_ray

    ray = start_local_ray()
    actor = start_relay()
    yield actor
    ray.kill(actor)


@pytest.fixture
def reported(monkeypatch):
    """What the trial's thread hands to `ray.tune.report`, with that thread's name."""
    seen = []
    report = lambda r: seen.append((r, threading.current_thread().name))  # noqa: E731
    monkeypatch.setattr(relay_module, "tune", SimpleNamespace(report=report))
    return seen


def test_boxes_keep_order_and_are_separate(relay):
    import ray

    for key, step in (("a", 0), ("b", 9), ("a", 1), ("a", 2)):  # one at a time, as a run reports
        ray.get(relay.put.remote(key, {"step": step}))
    assert ray.get(relay.take.remote("a", 0)) == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert ray.get(relay.take.remote("a", 0)) == []
    t0 = time.perf_counter()
    assert ray.get(relay.take.remote("a", 0.3)) == [] and time.perf_counter() - t0 >= 0.3  # waited for one
    ray.get(relay.close.remote("a"))
    assert ray.get(relay.take.remote("b", 0)) == [{"step": 9}]


def test_every_report_reaches_tune_in_order_before_the_trial_ends(relay, reported):
    class Checkpoint:
        path = "/runs/t/checkpoint_1"

    def fit(callbacks):
        (forward,) = callbacks
        for step in range(5):
            forward.after_report(None, [{"step": step}, {"step": -1}], Checkpoint() if step == 4 else None)
            time.sleep(0.05 * (step % 2))
        return "result"  # right after the last report: the deadlock's case

    assert fit_reporting(fit, relay) == "result"
    assert [r["step"] for r, _ in reported] == [0, 1, 2, 3, 4]  # rank 0's, all of them
    assert reported[-1][0][CHECKPOINT_PATH] == "/runs/t/checkpoint_1"
    assert {thread for _, thread in reported} == {threading.current_thread().name}


def test_a_failed_run_reports_first_and_raises_its_error(relay, reported):
    def fit(callbacks):
        callbacks[0].after_report(None, [{"step": 0}], None)
        raise FloatingPointError("loss became nan")

    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit_reporting(fit, relay)
    assert [r for r, _ in reported] == [{"step": 0}]


def test_state_api_lookups_stay_off_other_clusters(ray_local):
    """In a worker of the tests' local cluster, Ray's State API goes to the address conftest sets
    (nothing answers there), not to the cluster started last on the machine; asked about a live
    actor, it raises the error Ray Train's placement-group cleaner waits on, never "not found"
    (which the cleaner reads as a dead controller, removing a live trial's placement group)."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Probe:
        def lookup(self) -> tuple[str, str]:
            """Where this worker's State API goes, and what it says about this live actor."""
            from ray.dashboard.utils import get_address_for_submission_client
            from ray.util.state import get_actor
            from ray.util.state.exception import RayStateApiException

            try:
                found = repr(get_actor(ray.get_runtime_context().get_actor_id(), timeout=5))
            except RayStateApiException as e:
                found = type(e).__name__
            return get_address_for_submission_client(None), found

    probe = Probe.remote()
    address, found = ray.get(probe.lookup.remote())
    ray.kill(probe)
    assert address == "http://127.0.0.1:9" and found == "ServerUnavailable", (address, found)
