"""The teacher cache: manifest and counts, atomic shards, resume equals a whole build,
fingerprint mismatches named, per-shard id join, and cached == on-the-fly training."""

import contextlib
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import start_local_ray
from PIL import Image

from raytrain.config import make_config
from raytrain.data.pipeline import prepare, train_dataset
from raytrain.data.transforms import decode_image, normalize
from raytrain.methods import build_method
from raytrain.teachers import build_dinov3, build_text
from raytrain.teachers.cache import CacheMismatch, CacheReader, build_cache, shard_name

TINY = ["teachers.dinov3.size=tiny", "teachers.dinov3.image_size=32", "data.image_size=32", "cache.batch_size=4"]


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path) -> Path:
    """Three training files of 6 rows; file 1 has an undecodable image, file 2 an empty caption."""
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


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "ds")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(dataset, its directory, manifest, what the build printed): the dataset with its default
    cache built once, for the tests that only read them (a build starts a teacher actor: seconds
    each)."""
    start_local_ray()
    tmp = tmp_path_factory.mktemp("built")
    dataset = write_dataset(tmp / "ds")
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # raytrain's log writes to sys.stdout as it is
        manifest = build_cache(config(dataset, tmp))
    return dataset, tmp, manifest, printed.getvalue()


def config(dataset, tmp_path, *extra):
    return make_config({}, TINY + [f"data.path={dataset}", f"cache.path={tmp_path / 'cache'}", *extra])


def test_build_manifest_and_counts(built, ray_local):
    dataset, tmp_path, manifest, printed = built
    assert manifest["rows"] == 16 and manifest["skipped"] == {"bad_image": 1, "empty_caption": 1}
    assert [s["rows"] for s in manifest["shards"]] == [6, 5, 5]
    assert manifest["shapes"]["dinov3_cls"] == [64] and manifest["shapes"]["dinov3_multiscale"] == [4, 16, 64]
    assert manifest["fingerprint"]["dataset"]["rows"] == 18 and "dinov3" in manifest["fingerprint"]["weights"]
    assert "teacher cache complete: 16 rows in 3 shards" in printed
    shard = pq.read_table(tmp_path / "cache" / shard_name(0))
    assert shard.schema.field("dinov3_cls").type.value_type == pa.float16()
    assert build_cache(config(dataset, tmp_path)) == manifest  # complete: reused, not rebuilt


def test_resume_after_interruption_equals_whole_build(built, tmp_path, ray_local):
    dataset, whole_dir, whole, _ = built
    part = tmp_path / "b" / "cache"
    cfg = config(dataset, tmp_path / "b")
    shutil.copytree(whole_dir / "cache", part)  # a whole build's shards (the manifest names no path)
    # an interrupted build: shard 1 and the manifest never landed, a temp file was left behind
    os.remove(part / shard_name(1))
    os.remove(part / "manifest.json")
    (part / ".tmp-shard-00001.parquet").write_bytes(b"half written")
    kept = (part / shard_name(0)).stat().st_mtime_ns
    resumed = build_cache(cfg)
    assert (part / shard_name(0)).stat().st_mtime_ns == kept  # complete shards are skipped
    for i in range(3):
        assert (part / shard_name(i)).read_bytes() == (whole_dir / "cache" / shard_name(i)).read_bytes()
    assert resumed == whole


def test_mismatched_cache_is_refused_naming_the_field(built, ray_local):
    dataset, tmp_path, *_ = built
    with pytest.raises(CacheMismatch, match=r"teachers\.dinov3\.grid: cache has 4, config wants 2"):
        CacheReader.open(config(dataset, tmp_path, "teachers.dinov3.grid=2"), prepare(config(dataset, tmp_path).data))
    with pytest.raises(CacheMismatch, match=r"preprocessing\.image_size"):
        build_cache(config(dataset, tmp_path, "data.image_size=16", "teachers.dinov3.image_size=16"))


def test_lookup_matches_the_teacher_on_the_fly(built, ray_local):
    cfg = config(*built[:2])
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    table = pq.read_table(src.files[0])
    images = np.stack([decode_image(b, 32) for b in table.column("image").to_pylist()])
    live = build_dinov3(cfg.teachers.dinov3)(torch.from_numpy(normalize(images, cfg.data.mean, cfg.data.std)))
    got = reader.lookup(src.files[0], table.column("id").to_pylist()[::-1])
    torch.testing.assert_close(torch.from_numpy(got["dinov3_cls"]), live.cls.flip(0), atol=2e-2, rtol=2e-3)
    with pytest.raises(KeyError, match="no outputs for sample id 'f1-2'"):
        reader.lookup(src.files[1], ["f1-2"])  # the undecodable row is not cached


def test_training_stream_joins_by_id(built, ray_local):
    cfg = config(*built[:2])
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


def test_cached_and_live_teacher_give_the_same_loss(built, ray_local):
    """The rankclip teacher-target loss on a batch: cached outputs vs the teacher run live."""
    dataset, tmp_path, *_ = built
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


def test_text_teacher_targets_from_the_cache_equal_the_live_text_teacher(dataset, tmp_path, ray_local):
    """loss.target=text_teacher on a batch: the cached `text` outputs give the loss that the
    text teacher run live on the same rows' captions gives."""
    cfg = config(
        dataset, tmp_path, "cache.use=true", "cache.teachers=[text]", "loss.order=2", "loss.target=text_teacher"
    )
    build_cache(cfg)
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    batch = next(iter(train_dataset(src, cfg.data, 0, reader).iter_batches(batch_size=6, batch_format="numpy")))
    keep = ~(batch["bad_image"] | batch["empty_caption"])
    inputs = {k: torch.from_numpy(batch[k][keep]) for k in ("pixels", "tokens", "text")}
    captions = {
        i: c for f in src.files for i, c in zip(*pq.read_table(f, columns=["id", "caption"]).to_pydict().values())
    }
    live = build_text(cfg.teachers.text).encode([captions[i] for i in batch["id"][keep]])
    torch.testing.assert_close(inputs["text"], live, atol=2e-2, rtol=2e-3)
    losses = []
    for text in (inputs["text"], live):
        torch.manual_seed(0)
        method = build_method(cfg, src.tokenizer(cfg.data).vocab_size)
        losses.append(method({**inputs, "text": text}, 2.5)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_sweep_with_and_without_cache_trains_the_same(built, tmp_path, ray_local):
    """Two trials of one sweep, equal but for cache.use: the same final training losses (the
    sweep reuses the module's complete cache)."""
    from raytrain.tune.sweep import run_sweep

    dataset, cache = built[0], built[1] / "cache"

    space = tmp_path / "space.yaml"
    space.write_text(
        "name: cache_check\n"
        "config: {loss: {order: 1, target: teacher, ramp: false},"
        " train: {epochs: 1, batch_size: 6, report_every: 1, eval: false, cpus_per_worker: 0.45},"
        " run: {max_concurrent_trials: 2}, model: {image: {patch: 8}}}\n"
        "grid: {cache.use: [false, true]}\ngroup: cache.use\nmetrics: [loss, rank]\nprimary: loss\nmode: min\n"
    )
    report = run_sweep(
        space,
        TINY + [f"data.path={dataset}", f"cache.path={cache}", f"run.storage_path={tmp_path / 'runs'}"],
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
    feats, mask = build_text(cfg.teachers.text).encode_tokens([caption], 6)
    assert np.allclose(got["text_tokens"][0], feats[0], atol=2e-2) and np.array_equal(got["text_mask"][0], mask[0])
    assert set(manifest["fingerprint"]["weights"]) == {"dinov3", "text", "text_tokens", "yolo"}


def test_integer_ids_join_the_cache(tmp_path, ray_local):
    """Integer ids: the cache and the training stream both see their decimal strings."""
    root = tmp_path / "ints"
    (root / "train").mkdir(parents=True)
    for f in range(2):
        ids = pa.array([100 * f + i for i in range(4)], pa.int64())
        images, captions = [png(10 * f + i) for i in range(4)], [f"a red circle number {i}" for i in range(4)]
        pq.write_table(pa.table({"id": ids, "image": images, "caption": captions}), root / "train" / f"p{f}.parquet")
    cfg = config(root, tmp_path)
    build_cache(cfg)
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    assert pq.read_table(tmp_path / "cache" / shard_name(1))["id"].to_pylist() == ["100", "101", "102", "103"]
    rows = 0
    for b in train_dataset(src, cfg.data, 0, reader).iter_batches(batch_size=None, batch_format="numpy"):
        for j, i in enumerate(b["id"]):
            want = reader.lookup(src.files[int(i) // 100], [i])["dinov3_cls"][0]
            assert np.array_equal(b["dinov3_cls"][j], want) and want.any(), i
            rows += 1
    assert rows == 8


def test_a_shard_of_another_version_of_its_file_is_refused(built, tmp_path, ray_local, caplog):
    """At open (the manifest's per-shard rows and id digests), when a worker reads the shard
    (its footer; a repeated id), and by a resumed build, which builds such a shard again."""
    dataset = tmp_path / "ds"  # copies of the module's dataset and cache, changed below
    shutil.copytree(built[0], dataset)
    shutil.copytree(built[1] / "cache", tmp_path / "cache")
    cfg = config(dataset, tmp_path)
    part0, part1 = (dataset / "train" / f"part-{f}.parquet" for f in (0, 1))
    table0, table1 = pq.read_table(part0), pq.read_table(part1)
    reader = CacheReader.open(cfg, prepare(cfg.data))
    # the same number of rows (the fingerprint's count is unchanged), other ids
    pq.write_table(table0.set_column(0, "id", pa.array([f"g{i}" for i in range(6)])), part0)
    stale = r"shard-00000\.parquet holds the outputs of \S*part-0\.parquet as it was when built \(6 rows, ids \w+\), "
    stale += r"but the file now has 6 rows"
    with pytest.raises(CacheMismatch, match=stale):
        CacheReader.open(cfg, prepare(cfg.data))
    with pytest.raises(CacheMismatch, match=stale):
        build_cache(cfg)  # a complete cache is reused only when every shard is its file's
    # a row moved from file 0 to file 1: the total is unchanged, both files' shards are stale
    pq.write_table(table0.slice(0, 5), part0)
    pq.write_table(pa.concat_tables([table1, table0.slice(5)]), part1)
    with pytest.raises(CacheMismatch, match=r"\(6 rows, ids \w+\), but the file now has 5 rows"):
        CacheReader.open(cfg, prepare(cfg.data))
    pq.write_table(table0, part0)
    pq.write_table(table1, part1)
    # read by a worker: a shard replaced by another file's, or holding an id twice
    shard0, shard1 = (tmp_path / "cache" / shard_name(i) for i in (0, 1))
    kept = shard0.read_bytes()
    shard0.write_bytes(shard1.read_bytes())
    with pytest.raises(CacheMismatch, match=stale):  # file 1's ids
        reader.lookup(reader.files[0], ["f0-0"])
    twice = pq.read_table(shard1)
    pq.write_table(pa.concat_tables([twice, twice.slice(0, 1)]).replace_schema_metadata(twice.schema.metadata), shard1)
    with pytest.raises(CacheMismatch, match=r"shard-00001\.parquet \(of \S*part-1\.parquet\) holds id 'f1-0' twice"):
        reader.lookup(reader.files[1], ["f1-0"])
    # an interrupted build resumed after file 0 changed: its existing shard is built again
    shard0.write_bytes(kept)
    (tmp_path / "cache" / "manifest.json").unlink()
    shard1.unlink()
    pq.write_table(table0.set_column(0, "id", pa.array([f"g{i}" for i in range(6)])), part0)
    with caplog.at_level("INFO", logger="raytrain"):
        manifest = build_cache(cfg)
    assert "shard-00000.parquet was built from another version of" in caplog.text
    reader = CacheReader.open(cfg, prepare(cfg.data))
    assert manifest["shards"][0]["source_rows"] == 6 and reader.lookup(reader.files[0], ["g3"])["dinov3_cls"].any()
