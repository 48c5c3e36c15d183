"""The teacher cache: manifest and counts, atomic shards, resume equals a whole build,
fingerprint mismatches named, per-shard id join, and cached == on-the-fly training."""

import io
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytrain.config import make_config
from raytrain.data.pipeline import prepare, train_dataset
from raytrain.data.transforms import decode_image, normalize
from raytrain.methods import build_method
from raytrain.teachers.cache import CacheMismatch, CacheReader, build_cache, shard_name

TINY = ["teachers.dinov3.size=tiny", "teachers.dinov3.image_size=32", "data.image_size=32", "cache.batch_size=4"]


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path):
    """Three training files of 6 rows; file 1 has an undecodable image, file 2 an empty caption."""
    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    for f in range(3):
        ids = [f"f{f}-{i}" for i in range(6)]
        images = [png(10 * f + i) for i in range(6)]
        captions = [f"a red circle number {i}" for i in range(6)]
        if f == 1:
            images[2] = b"broken"
        if f == 2:
            captions[4] = " "
        pq.write_table(
            pa.table({"id": ids, "image": images, "caption": captions}), root / "train" / f"part-{f}.parquet"
        )
    return root


def config(dataset, tmp_path, *extra):
    return make_config({}, TINY + [f"data.path={dataset}", f"cache.path={tmp_path / 'cache'}", *extra])


def test_build_manifest_and_counts(dataset, tmp_path, ray_local, capsys):
    cfg = config(dataset, tmp_path)
    manifest = build_cache(cfg)
    assert manifest["rows"] == 16 and manifest["skipped"] == {"bad_image": 1, "empty_caption": 1}
    assert [s["rows"] for s in manifest["shards"]] == [6, 5, 5]
    assert manifest["shapes"]["dinov3_cls"] == [64] and manifest["shapes"]["dinov3_multiscale"] == [4, 16, 64]
    assert manifest["fingerprint"]["dataset"]["rows"] == 18 and "dinov3" in manifest["fingerprint"]["weights"]
    assert "teacher cache complete: 16 rows in 3 shards" in capsys.readouterr().out
    shard = pq.read_table(tmp_path / "cache" / shard_name(0))
    assert shard.schema.field("dinov3_cls").type.value_type == pa.float16()
    assert build_cache(cfg) == manifest  # complete: reused, not rebuilt


def test_resume_after_interruption_equals_whole_build(dataset, tmp_path, ray_local):
    whole = build_cache(config(dataset, tmp_path / "a"))
    part = tmp_path / "b" / "cache"
    cfg = config(dataset, tmp_path / "b")
    build_cache(cfg)
    # an interrupted build: shard 1 and the manifest never landed, a temp file was left behind
    os.remove(part / shard_name(1))
    os.remove(part / "manifest.json")
    (part / ".tmp-shard-00001.parquet").write_bytes(b"half written")
    kept = (part / shard_name(0)).stat().st_mtime_ns
    resumed = build_cache(cfg)
    assert (part / shard_name(0)).stat().st_mtime_ns == kept  # complete shards are skipped
    for i in range(3):
        assert (part / shard_name(i)).read_bytes() == (tmp_path / "a" / "cache" / shard_name(i)).read_bytes()
    assert resumed == whole


def test_mismatched_cache_is_refused_naming_the_field(dataset, tmp_path, ray_local):
    build_cache(config(dataset, tmp_path))
    with pytest.raises(CacheMismatch, match=r"teachers\.dinov3\.grid: cache has 4, config wants 2"):
        CacheReader.open(config(dataset, tmp_path, "teachers.dinov3.grid=2"), prepare(config(dataset, tmp_path).data))
    with pytest.raises(CacheMismatch, match=r"preprocessing\.image_size"):
        build_cache(config(dataset, tmp_path, "data.image_size=16", "teachers.dinov3.image_size=16"))


def test_lookup_matches_the_teacher_on_the_fly(dataset, tmp_path, ray_local):
    cfg = config(dataset, tmp_path)
    build_cache(cfg)
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    table = pq.read_table(src.files[0])
    images = np.stack([decode_image(b, 32) for b in table.column("image").to_pylist()])
    live = cfg.teachers.dinov3.build()(torch.from_numpy(normalize(images, cfg.data.mean, cfg.data.std)))
    got = reader.lookup(src.files[0], table.column("id").to_pylist()[::-1])
    torch.testing.assert_close(torch.from_numpy(got["dinov3_cls"]), live.cls.flip(0), atol=2e-2, rtol=2e-3)
    with pytest.raises(KeyError, match="no outputs for sample id 'f1-2'"):
        reader.lookup(src.files[1], ["f1-2"])  # the undecodable row is not cached


def test_training_stream_joins_by_id(dataset, tmp_path, ray_local):
    cfg = config(dataset, tmp_path)
    build_cache(cfg)
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    rows = {}
    for b in train_dataset(src, cfg.data, 0, reader).iter_batches(batch_size=None, batch_format="numpy"):
        for j, i in enumerate(b["id"]):
            rows[i] = (b["dinov3_cls"][j], b["bad_image"][j] or b["empty_caption"][j])
    assert len(rows) == 18
    for i, (cls, skipped) in rows.items():
        path = src.files[int(i[1])]  # ids are f<file>-<row>
        want = np.zeros(64) if skipped else reader.lookup(path, [i])["dinov3_cls"][0]
        assert np.array_equal(cls, want), i


def test_cached_and_live_teacher_give_the_same_loss(dataset, tmp_path, ray_local):
    """The rankclip teacher-target loss on a batch: cached outputs vs the teacher run live."""
    extra = [
        "loss.order=2",
        "loss.target=teacher",
        "model.image.patch=8",
        "model.image.width=16",
        "model.image.heads=2",
        "model.text.width=16",
        "model.text.heads=2",
        "model.embed_dim=8",
        "data.context_length=8",
    ]
    cached_cfg = config(dataset, tmp_path, "cache.use=true", *extra)
    build_cache(cached_cfg)
    src = prepare(cached_cfg.data)
    reader = CacheReader.open(cached_cfg, src)
    batch = next(iter(train_dataset(src, cached_cfg.data, 0, reader).iter_batches(batch_size=6, batch_format="numpy")))
    keep = ~(batch["bad_image"] | batch["empty_caption"])
    inputs = {k: torch.from_numpy(batch[k][keep]) for k in ("pixels", "tokens", "dinov3_cls")}
    losses = []
    for cfg in (cached_cfg, config(dataset, tmp_path, "cache.use=false", *extra)):
        torch.manual_seed(0)
        method = build_method(cfg, src.tokenizer(cfg.data).vocab_size)
        assert (method.teacher is None) == cfg.cache.use  # no teacher is built when the cache serves it
        losses.append(method(inputs, 2.5)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_sweep_with_and_without_cache_trains_the_same(dataset, tmp_path, ray_local):
    """Two trials of one sweep, equal but for cache.use: the same final training losses."""
    from raytrain.tune.sweep import run_sweep

    space = tmp_path / "space.yaml"
    space.write_text(
        "name: cache_check\n"
        "config: {loss: {order: 1, target: teacher, ramp: false},"
        " train: {epochs: 1, batch_size: 6, report_every: 1, eval: false, cpus_per_worker: 0.45},"
        " run: {max_concurrent_trials: 1}, model: {image: {patch: 8}}}\n"
        "grid: {cache.use: [false, true]}\ngroup: cache.use\nmetrics: [loss, rank]\nprimary: loss\nmode: min\n"
    )
    report = run_sweep(
        space,
        TINY + [f"data.path={dataset}", f"cache.path={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}"],
    )
    trials = __import__("pandas").read_csv(Path(report).parent / "trials.csv")
    assert (trials["status"] == "TERMINATED").all(), trials["error"].tolist()
    live, cached = (trials.loc[trials["use"] == v].iloc[0] for v in (False, True))
    assert math.isfinite(live["loss"]) and cached["loss"] == pytest.approx(live["loss"], rel=1e-3)
    assert cached["rank"] == pytest.approx(live["rank"], rel=1e-3)


def test_all_three_teachers(dataset, tmp_path, ray_local, monkeypatch):
    """DINOv3, the shipped text teacher (pooled and per token) and an untrained YOLOv8 in
    one build, offline."""
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    cfg = config(
        dataset,
        tmp_path,
        "cache.teachers=[dinov3,text,text_tokens,yolo]",
        "teachers.yolo.top_k=4",
        "teachers.text.max_tokens=6",
    )
    manifest = build_cache(cfg)
    shapes = manifest["shapes"]
    assert shapes["text"] == [384] and shapes["yolo_boxes"] == [4, 4] and shapes["yolo_crops"] == [4, 64]
    assert {"yolo_conf", "yolo_cls", "yolo_area", "yolo_valid"} <= set(shapes)
    src = prepare(cfg.data)
    got = CacheReader.open(cfg, src).lookup(src.files[0], ["f0-0", "f0-1"])
    assert np.allclose(np.linalg.norm(got["text"], axis=1), 1, atol=1e-2)  # normalized sentence embeddings
    assert shapes["text_tokens"] == [6, 384] and shapes["text_mask"] == [6]
    caption = pq.read_table(src.files[0], columns=["caption"]).column(0)[0].as_py()
    feats, mask = cfg.teachers.text.build().encode_tokens([caption], 6)
    assert np.allclose(got["text_tokens"][0], feats[0], atol=2e-2) and np.array_equal(got["text_mask"][0], mask[0])
    assert set(manifest["fingerprint"]["weights"]) == {"dinov3", "text", "text_tokens", "yolo"}
