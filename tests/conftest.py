import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# what run_sweep gives the clusters it starts (raytrain.tune.sweep.runtime_env); the clusters tests
# start inherit it from here
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train's preemption watcher (an actor per worker group polling Ray for draining nodes) is
# Ray's own feature, and no test drains a node (test_elastic removes one): off, one Python process
# fewer per trial start (~1.5 CPU-seconds; the suite starts ~20)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's placement-group cleaner (an actor per trial) asks Ray's State API every second whether
# its trial's controller lives. Given no address it asks the cluster started last on this machine,
# which under pytest-xdist can be another test's cluster with a dashboard: that one does not know the
# controller, the cleaner takes it for dead and removes the live trial's placement group (a trial of
# test_cache failed so: "Destroying worker since its placement group was removed"). The clusters
# tests start in this process have no State API (no dashboard), and those in subprocesses need it
# for nothing, so the lookup goes to a port where nothing answers: the cleaner then waits, as it
# does when the API is down (test_state_api_lookups_stay_off_other_clusters)
os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")

# the smallest student every method trains with in tests: 16-px images, 16-wide towers, an 8-d joint space
TINY_MODEL = [
    "model.image.width=16",
    "model.image.heads=2",
    "model.image.patch=8",
    "model.text.width=16",
    "model.text.heads=2",
    "model.embed_dim=8",
    "data.image_size=16",
    "data.context_length=6",
]

TEST_KEY = TEST_SECRET = "testing"  # moto's test credentials; never real ones
TEST_REGION = "us-east-1"


@pytest.fixture
def ray_local():
    """An in-process local Ray instance for tests of Ray Data pieces: started by the first
    test that asks, shared by the next ones, shut down when the test process ends (or by a
    test that needs a cluster of its own: test_elastic)."""
    return start_local_ray()


def start_local_ray():
    """ray_local's cluster, for module-scoped fixtures."""
    import ray

    if not ray.is_initialized():
        # "local": always a fresh cluster of our own, never a stale or foreign one in /tmp/ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


class Driver(subprocess.Popen):
    """A process that starts a Ray cluster of its own (a sweep driver's `ray.init()`, a `ray start
    --block` head), in a session of its own: `ray_processes` finds only its Ray processes and
    `kill` stops them all, never another cluster on the machine (`ray stop` would stop them all)."""

    def __init__(self, cmd, **kwargs):
        super().__init__([str(c) for c in cmd], start_new_session=True, **kwargs)

    def ray_processes(self, name: str) -> list:
        """Its descendants whose command line holds `name` (e.g. "RayTrainWorker")."""
        import psutil

        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for proc in found:
            try:
                if name in " ".join(proc.cmdline()):
                    out.append(proc)
            except psutil.Error:  # exited meanwhile
                pass
        return out

    def kill(self) -> None:
        """SIGKILL its process group, then whatever is left of its session: Ray's workers take
        process groups of their own but stay in the session, also once orphaned."""
        import psutil

        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group has exited
            pass
        self.wait(timeout=60)
        for _ in range(20):
            left = [p for p in psutil.process_iter() if _session(p.pid) == self.pid]
            if not left:
                return
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"processes of the killed session {self.pid} still run: {left}")


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.fixture
def drivers():
    """Factory of `Driver`s, every one killed with its Ray processes at the end of the test."""
    started: list[Driver] = []

    def start(cmd, **kwargs) -> Driver:
        started.append(Driver(cmd, **kwargs))
        return started[-1]

    yield start
    for driver in started:
        driver.kill()


# ---- S3: a real S3-compatible server (moto's) on 127.0.0.1 ----------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_answers(endpoint: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=timeout):
            return True
    except Exception:  # noqa: BLE001
        # not a moto server? any HTTP answer at all still means it is up
        try:
            urllib.request.urlopen(endpoint, timeout=timeout)
            return True
        except urllib.error.HTTPError:
            return True
        except Exception:  # noqa: BLE001
            return False


class MotoServers:
    """Starts `moto_server -H 127.0.0.1 -p PORT` subprocesses and stops them all at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []
        exe = Path(sys.executable).parent / "moto_server"
        self.exe = str(exe) if exe.exists() else shutil.which("moto_server")

    def start(self, ready_within: float = 30.0) -> str:
        if self.exe is None:
            pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]', moto[server])")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        for _ in range(3):  # the free port can be taken between probing and binding; retry
            port = free_port()
            log = self.log_dir / f"moto-{port}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [self.exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
                )
            self.procs.append(proc)
            endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + ready_within
            while time.monotonic() < deadline and proc.poll() is None:
                if s3_answers(endpoint, timeout=0.5):
                    return endpoint
                time.sleep(0.05)
            if proc.poll() is None:
                self.stop(proc)
                pytest.fail(
                    f"moto_server on {endpoint} did not answer within {ready_within:.0f} s; "
                    f"log {log}:\n{log.read_text()[-2000:]}"
                )
            if b"in use" not in log.read_bytes():
                pytest.fail(
                    f"moto_server exited at start (rc {proc.returncode}); log {log}:\n{log.read_text()[-2000:]}"
                )
        pytest.fail("moto_server: no free port after 3 tries")

    def stop(self, proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self):
        for proc in self.procs:
            self.stop(proc)


@pytest.fixture(scope="session")
def moto_servers(tmp_path_factory):
    """Factory: `moto_servers.start()` → endpoint URL of a fresh moto server of one's own
    (for tests that change server-wide state, e.g. turn on IAM authentication)."""
    servers = MotoServers(tmp_path_factory.mktemp("moto"))
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def s3_server(request) -> str:
    """Endpoint URL (http://127.0.0.1:PORT) of a real S3-compatible server: the one in
    RAYTRAIN_TEST_S3_ENDPOINT when set (e.g. from `infra/s3_server.sh`), else a moto_server
    started for this session on a free port and stopped at its end."""
    endpoint = os.environ.get("RAYTRAIN_TEST_S3_ENDPOINT")
    if endpoint:
        endpoint = endpoint.rstrip("/")
        deadline = time.monotonic() + 10
        while not s3_answers(endpoint):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"RAYTRAIN_TEST_S3_ENDPOINT={endpoint} does not answer; start it with "
                    '`eval "$(bash infra/s3_server.sh)"` or unset it to let the tests start their own'
                )
            time.sleep(0.2)
        return endpoint
    return request.getfixturevalue("moto_servers").start()


def make_bucket(endpoint: str, name: str, key: str = TEST_KEY, secret: str = TEST_SECRET) -> None:
    import pyarrow.fs as pafs

    host, scheme = endpoint.split("://", 1)[1], endpoint.split("://", 1)[0]
    fs = pafs.S3FileSystem(
        access_key=key,
        secret_key=secret,
        region=TEST_REGION,
        endpoint_override=host,
        scheme=scheme,
        allow_bucket_creation=True,
    )
    fs.create_dir(name)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """`s3://<fresh bucket>` on `s3_server`, with the environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) pointing at that server for the test."""
    name = f"rt-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server, name)
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", TEST_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return f"s3://{name}"


def pytest_collection_modifyitems(items):
    """For pytest-xdist (infra/test.sh: `--dist loadgroup --no-loadscope-reorder`): a module's
    tests stay on one worker, so its module fixtures are built once, and the modules that start
    Ray clusters of their own (a test marked e2e: minutes each) are handed out first, so that
    the last modules the workers run are short ones and both finish at about the same time."""
    clusters = {item.module.__name__ for item in items if item.get_closest_marker("e2e")}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.module.__name__ not in clusters)  # stable: order kept within


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while fn runs (what training memory is made of)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    import torch

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
