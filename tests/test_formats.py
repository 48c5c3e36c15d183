"""Training data in img2dataset's parquet output and in WebDataset tar shards, local and on S3:
fixtures written in the real formats (img2dataset's column set, tars made with tarfile, the
sidecar files img2dataset writes beside tars), checked up front (missing columns, truncated
and broken tars name the file), streamed through `train_dataset` with bad rows flagged, and
the teacher cache built on a WebDataset dataset."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytrain.config import make_config
from raytrain.data.formats import iter_tar, read_file
from raytrain.data.pipeline import prepare, train_dataset
from raytrain.data.schema import SchemaError
from raytrain.data.sources import StorageError, resolve, write_atomic

# The columns img2dataset (rom1504/img2dataset) writes with --output_format parquet, its
# defaults (extract_exif, compute_hash="sha256", encode_format "jpg") and --caption_col: the
# input columns (caption, url), then downloader.py's key ... original_height, exif and the hash,
# then writer.py's ParquetSampleWriter appends the image column named after the encode format.
META = [
    ("caption", pa.string()),
    ("url", pa.string()),
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]
I2D_SCHEMA = pa.schema(META + [("jpg", pa.binary())])
TINY = ["teachers.dinov3.size=tiny", "teachers.dinov3.image_size=32", "data.image_size=32", "cache.batch_size=4"]


def image(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def i2d_row(key: str, caption, img: bytes | None, status: str = "success") -> dict:
    ok = status == "success"
    return {
        "caption": caption,
        "url": f"https://example.com/{key}.jpg",
        "key": key,
        "status": status,
        "error_message": None if ok else "HTTP Error 404: Not Found",
        "width": 24 if ok else None,
        "height": 24 if ok else None,
        "original_width": 24 if ok else None,
        "original_height": 24 if ok else None,
        "exif": "{}" if ok else None,
        "sha256": "0" * 64 if ok else None,
        "jpg": img,
    }


def parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar with <key>.<ext> members, each sample's members together (as webdataset's
    TarWriter writes them: extensions in sorted order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(members[ext]), 1_700_000_000
                tar.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


def members_end(data: bytes) -> int:
    """Where a tar's last member ends (its end-of-archive blocks follow)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset


def wds_sample(
    key: str, caption: str | None = None, img: bytes | None = None, ext: str = "jpg", meta: dict | None = None
):
    members = {} if img is None else {ext: img}
    if caption is not None:
        members["txt"] = caption.encode()
    members["json"] = json.dumps({"key": key, "status": "success", **(meta or {})}, indent=4).encode()
    return key, members


def img2dataset_files() -> dict[str, bytes]:
    """Two shards: 00000 has a failed download (null image), a success whose bytes are corrupt, a
    failed resize that still carries bytes, and an empty caption; 00001 is clean."""
    shard0 = [
        i2d_row("000000000", "a red circle", image(0)),
        i2d_row("000000001", "a blue square", None, "failed_to_download"),
        i2d_row("000000002", "a green cat", b"\xff\xd8 not a jpeg"),
        i2d_row("000000003", "", image(3)),
        i2d_row("000000004", "two dogs", image(4), "failed_to_resize"),
        i2d_row("000000005", "a big tree", image(5)),
    ]
    shard1 = [i2d_row(f"00001000{i}", f"photo number {i}", image(10 + i)) for i in range(4)]
    stats = json.dumps({"count": 6, "successes": 4, "failed_to_download": 1, "failed_to_resize": 1}).encode()
    return {
        "00000.parquet": parquet_bytes(shard0, I2D_SCHEMA),
        "00000_stats.json": stats,
        "00001.parquet": parquet_bytes(shard1, I2D_SCHEMA),
        "00001_stats.json": stats,
        "teacher_cache/abc/shard-00000.parquet": b"a cache beside the data is not training data",
    }


def webdataset_files() -> dict[str, bytes]:
    """Two tars with img2dataset's sidecars: 00000.tar has a png, a .jpeg and a .webp sample, one
    without .txt, one without an image, one with corrupt bytes; 00001.tar is clean."""
    tar0 = [
        wds_sample("000000000", "a red circle", image(0), meta={"caption_short": "circle"}),
        wds_sample("000000001", "a blue square", image(1, "PNG"), "png"),
        wds_sample("000000002", "a green cat", image(2), "jpeg"),
        wds_sample("000000003", None, image(3)),  # no caption member
        wds_sample("000000004", "two dogs"),  # no image member
        wds_sample("000000005", "a big tree", b"\xff\xd8 truncated jpeg"),
        wds_sample("000000006", "a small boat", image(6, "WEBP"), "webp"),
    ]
    tar1 = [wds_sample(f"00001000{i}", f"photo number {i}", image(10 + i)) for i in range(3)]
    meta = pa.schema(META)  # the sidecar: one metadata row per input row, no image bytes
    sidecar = parquet_bytes([{k: v for k, v in i2d_row(k, "x", None).items() if k != "jpg"} for k, _ in tar0], meta)
    stats = json.dumps({"count": 7, "successes": 7}).encode()
    return {
        "00000.tar": tar_bytes(tar0),
        "00000.parquet": sidecar,
        "00000_stats.json": stats,
        "00001.tar": tar_bytes(tar1),
        "00001.parquet": sidecar,
        "00001_stats.json": stats,
    }


def put(root: str, files: dict[str, bytes]) -> str:
    """Write {relative name: bytes} under a local directory or s3:// prefix; returns root."""
    fs, base = resolve(root)
    for name, data in files.items():
        write_atomic(fs, f"{base}/{name}", data)
    return root


def data_cfg(path, fmt, *extra):
    return make_config({}, ["data.image_size=16", f"data.path={path}", f"data.format={fmt}", *extra]).data


def stream(src, cfg, cache=None) -> dict[str, dict]:
    """id → {bad_image, empty_caption} of every row the training stream yields."""
    rows = {}
    for b in train_dataset(src, cfg, seed=0, cache=cache).iter_batches(batch_size=None, batch_format="numpy"):
        for j, i in enumerate(b["id"]):
            assert i not in rows, f"row {i} streamed twice"
            rows[i] = {"bad_image": bool(b["bad_image"][j]), "empty_caption": bool(b["empty_caption"][j])}
            if "dinov3_cls" in b:
                rows[i]["cls"] = b["dinov3_cls"][j]
    return rows


def flagged(rows: dict, reason: str) -> list[str]:
    return sorted(i for i, r in rows.items() if r[reason])


# ---- img2dataset parquet ----------------------------------------------------------------------


def test_img2dataset_parquet_streams_with_bad_rows_counted(tmp_path, ray_local):
    cfg = data_cfg(put(str(tmp_path / "i2d"), img2dataset_files()), "img2dataset")
    src = prepare(cfg)
    assert [f.rsplit("/", 1)[1] for f in src.files] == ["00000.parquet", "00001.parquet"]  # no stats, no cache
    assert src.num_rows == 10 and src.eval_dir is None
    assert {"red", "circle", "photo"} <= set(src.vocabulary)
    rows = stream(src, cfg)
    assert sorted(rows) == [f"00000000{i}" for i in range(6)] + [f"00001000{i}" for i in range(4)]
    # failed download (null image), corrupt bytes, failed resize (status, though bytes are there)
    assert flagged(rows, "bad_image") == ["000000001", "000000002", "000000004"]
    assert flagged(rows, "empty_caption") == ["000000003"]
    table = read_file(resolve(cfg.path)[0], src.files[0], cfg)
    assert table.column_names == ["id", "image", "caption"] and table["image"].null_count == 2


def test_img2dataset_missing_columns_name_file_and_column(tmp_path):
    files = img2dataset_files()
    no_caption = pa.schema([f for f in I2D_SCHEMA if f.name != "caption"])  # img2dataset run without --caption_col
    files["00001.parquet"] = parquet_bytes(
        [{k: v for k, v in i2d_row("1", "x", image(1)).items() if k != "caption"}], no_caption
    )
    put(str(tmp_path / "a"), files)
    with pytest.raises(SchemaError, match=r"a/00001\.parquet: missing column 'caption' .*--caption_col"):
        prepare(data_cfg(tmp_path / "a", "img2dataset"))
    with pytest.raises(SchemaError, match=r"a/00000\.parquet: missing column 'webp' .*data\.image_column"):
        prepare(data_cfg(tmp_path / "a", "img2dataset", "data.image_column=webp"))
    # a webdataset download's metadata parquet read as img2dataset parquet: no image column
    put(str(tmp_path / "w"), webdataset_files())
    with pytest.raises(SchemaError, match=r"w/00000\.parquet: missing column 'jpg' .*data\.format=webdataset"):
        prepare(data_cfg(tmp_path / "w", "img2dataset"))
    with pytest.raises(
        StorageError, match=r"no \.parquet files directly under .*/nothing \(data\.format=img2dataset\)"
    ):
        prepare(data_cfg(tmp_path / "nothing", "img2dataset"))


# ---- WebDataset tars --------------------------------------------------------------------------


def test_webdataset_streams_with_bad_rows_counted(tmp_path, ray_local):
    cfg = data_cfg(put(str(tmp_path / "wds"), webdataset_files()), "webdataset", "data.extra_captions=[caption_short]")
    src = prepare(cfg)
    assert [f.rsplit("/", 1)[1] for f in src.files] == ["00000.tar", "00001.tar"]  # sidecars are not data
    assert src.num_rows == 10 and src.eval_dir is None
    assert {"red", "boat", "photo"} <= set(src.vocabulary) and "none" not in src.vocabulary
    rows = stream(src, cfg)
    assert sorted(rows) == [f"00000000{i}" for i in range(7)] + [f"00001000{i}" for i in range(3)]
    assert flagged(rows, "bad_image") == ["000000004", "000000005"]  # no image member, corrupt bytes
    assert flagged(rows, "empty_caption") == ["000000003"]  # no .txt member
    table = read_file(resolve(cfg.path)[0], src.files[0], cfg)
    assert table.column_names == ["id", "image", "caption", "caption_short"]
    assert table["caption_short"].to_pylist() == ["circle"] + [None] * 6  # from the .json member
    assert table["image"][1].as_py() == image(1, "PNG") and table["image"][6].as_py() == image(6, "WEBP")


def test_broken_tars_are_named(tmp_path):
    good = tar_bytes([wds_sample(f"k{i}", f"caption {i}", image(i)) for i in range(3)])
    end = members_end(tar_bytes([wds_sample(f"k{i}", f"caption {i}", image(i)) for i in range(2)]))
    cases = {
        "cut inside a member": (good[:1500], r"truncated or not a tar file \(unexpected end of data\)"),
        "cut between samples": (
            good[:end],
            r"truncated tar: it ends at byte \d+ after sample 'k1' without tar's end-of-archive",
        ),
        "not a tar": (b"<html>403 Forbidden</html>" * 40, r"truncated or not a tar file"),
        "split sample": (
            tar_bytes([("k0", {"jpg": image(0)}), ("k1", {"jpg": image(1)}), ("k0", {"txt": b"late"})]),
            r"id 'k0' appears twice, at samples 0 and 2 .*the members of sample 'k0' are not adjacent",
        ),
    }
    for i, (data, match) in enumerate(cases.values()):
        root = put(str(tmp_path / f"d{i}"), {"00000.tar": good, "00001.tar": data})
        with pytest.raises(SchemaError, match=rf"d{i}/00001\.tar: {match}"):
            prepare(data_cfg(root, "webdataset"))
        with pytest.raises(SchemaError, match=rf"d{i}/00001\.tar: {match}"):  # the streaming reader too
            list(iter_tar(*resolve(f"{root}/00001.tar"), data_cfg(root, "webdataset")))
    # a tar of no samples (img2dataset's, when every download of a shard failed) is no error
    empty = io.BytesIO()
    tarfile.open(fileobj=empty, mode="w").close()
    assert (
        prepare(
            data_cfg(put(str(tmp_path / "e"), {"00000.tar": good, "00001.tar": empty.getvalue()}), "webdataset")
        ).num_rows
        == 3
    )
    # a shard replaced by a good one after a failed check is read again
    put(str(tmp_path / "d1"), {"00001.tar": good})
    assert prepare(data_cfg(tmp_path / "d1", "webdataset")).num_rows == 6
    with pytest.raises(StorageError, match=r"no \.tar files directly under"):
        prepare(
            data_cfg(put(str(tmp_path / "sidecars"), {"00000.parquet": b"x", "00000_stats.json": b"{}"}), "webdataset")
        )


# ---- ids ------------------------------------------------------------------------------------


def raytrain_file(ids, id_type=None) -> bytes:
    id_type = id_type or pa.string()
    rows = [{"id": i, "image": image(j), "caption": f"photo number {j}"} for j, i in enumerate(ids)]
    return parquet_bytes(rows, pa.schema([("id", id_type), ("image", pa.binary()), ("caption", pa.string())]))


def id_layouts(ids: list[str]) -> dict[str, dict[str, bytes]]:
    """One training file per layout whose rows carry `ids` (in order), beside a clean file."""
    i2d = [i2d_row(k, f"photo {j}", image(j)) for j, k in enumerate(ids)]
    return {
        "raytrain": {"train/part-0.parquet": raytrain_file(["a", "b"]), "train/part-1.parquet": raytrain_file(ids)},
        "img2dataset": {
            "00000.parquet": parquet_bytes(i2d[:1], I2D_SCHEMA),
            "00001.parquet": parquet_bytes(i2d, I2D_SCHEMA),
        },
        "webdataset": {
            "00000.tar": tar_bytes([wds_sample("a", "x", image(0))]),
            "00001.tar": tar_bytes([wds_sample(k, f"photo {j}", image(j)) for j, k in enumerate(ids)]),
        },
    }


def test_repeated_and_missing_ids_are_named_before_anything_trains(tmp_path):
    for fmt, files in id_layouts(["1", "5", "2", "5"]).items():
        root = put(str(tmp_path / f"dup-{fmt}"), files)
        unit = "samples" if fmt == "webdataset" else "rows"
        with pytest.raises(
            SchemaError,
            match=rf"dup-{fmt}/(train/part-1\.parquet|00001\.(parquet|tar)): id '5' appears twice, at {unit} 1 and 3",
        ):
            prepare(data_cfg(root, fmt))
    # the same id in adjacent samples of a tar (its members repeat), and a null id
    root = put(
        str(tmp_path / "adjacent"),
        {"00000.tar": tar_bytes([wds_sample("5", "x", image(0)), wds_sample("5", "y", image(1))])},
    )
    with pytest.raises(SchemaError, match=r"00000\.tar: id '5' appears twice, at samples 0 and 1"):
        prepare(data_cfg(root, "webdataset"))
    root = put(str(tmp_path / "null"), {"train/part-0.parquet": raytrain_file(["a", "b", None])})
    with pytest.raises(SchemaError, match=r"part-0\.parquet: row 2 \(counted from 0\) has no id"):
        prepare(data_cfg(root, "raytrain"))
    root = put(str(tmp_path / "float"), {"train/part-0.parquet": raytrain_file([1.0, 2.0], pa.float64())})
    with pytest.raises(SchemaError, match=r"column 'id' has type double, expected string or integer"):
        prepare(data_cfg(root, "raytrain"))


def test_integer_ids_are_read_as_their_decimal_strings(tmp_path, ray_local):
    ints = put(str(tmp_path / "ints"), {"train/part-0.parquet": raytrain_file([7, 10, 123], pa.int64())})
    strings = put(str(tmp_path / "strings"), {"train/part-0.parquet": raytrain_file(["7", "10", "123"])})
    src, same = prepare(data_cfg(ints, "raytrain")), prepare(data_cfg(strings, "raytrain"))
    assert src.file_rows == (3,) and src.file_ids == same.file_ids  # the same ids, whatever their type
    assert read_file(resolve(ints)[0], src.files[0], data_cfg(ints, "raytrain"))["id"].to_pylist() == ["7", "10", "123"]
    assert sorted(stream(src, data_cfg(ints, "raytrain"))) == ["10", "123", "7"]
    i2d = [{**i2d_row("x", f"photo {k}", image(k)), "key": k} for k in (3, 4)]
    root = put(
        str(tmp_path / "i2d"), {"00000.parquet": parquet_bytes(i2d, I2D_SCHEMA.set(2, pa.field("key", pa.uint32())))}
    )
    assert read_file(resolve(root)[0], prepare(data_cfg(root, "img2dataset")).files[0], data_cfg(root, "img2dataset"))[
        "id"
    ].to_pylist() == ["3", "4"]
    with pytest.raises(SchemaError, match=r"part-0\.parquet: id '7' appears twice, at rows 0 and 2"):
        prepare(
            data_cfg(
                put(str(tmp_path / "dup"), {"train/part-0.parquet": raytrain_file([7, 8, 7], pa.int32())}), "raytrain"
            )
        )


def test_cache_build_refuses_repeated_ids_in_every_layout(tmp_path):
    """Past the schema check too (a file changed after it): the shard builder names file, id, rows."""
    from dataclasses import asdict

    from raytrain.data.formats import list_files
    from raytrain.data.pipeline import DataSource
    from raytrain.teachers.cache import _ShardBuilder

    for fmt, files in id_layouts(["1", "5", "2", "5"]).items():
        cfg = make_config({}, TINY + [f"data.path={put(str(tmp_path / fmt), files)}", f"data.format={fmt}"])
        fs, base = resolve(cfg.data.path)
        src = DataSource(cfg.data.path, tuple(list_files(fs, base, cfg.data)), 6, None, None)  # not checked
        builder = _ShardBuilder(cfg.model_dump(mode="json"), asdict(src), fs, fs, str(tmp_path / f"cache-{fmt}"))
        builder.build(0)  # the clean file
        with pytest.raises(SchemaError, match=rf"{fmt}/\S*1\.\w+: id '5' appears twice, at (rows|samples) 1 and 3"):
            builder.build(1)


def test_teacher_cache_on_webdataset(tmp_path, ray_local):
    """The cache builds from tars through the same reader, counts the same skips, and the
    training stream joins its outputs by sample id."""
    from raytrain.teachers.cache import CacheReader, build_cache

    root = put(str(tmp_path / "wds"), webdataset_files())
    cfg = make_config({}, TINY + [f"data.path={root}", "data.format=webdataset", f"cache.path={tmp_path / 'cache'}"])
    manifest = build_cache(cfg)
    assert [s["rows"] for s in manifest["shards"]] == [4, 3] and manifest["skipped"] == {
        "bad_image": 2,
        "empty_caption": 1,
    }
    assert manifest["fingerprint"]["dataset"] == {"files": ["00000.tar", "00001.tar"], "rows": 10}
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    rows = stream(src, cfg.data, reader)
    assert len(rows) == 10
    for i, r in rows.items():
        path = src.files[0] if i.startswith("00000") else src.files[1]
        if r["bad_image"] or r["empty_caption"]:
            assert not r["cls"].any()
        else:
            assert r["cls"].any() and np.array_equal(r["cls"], reader.lookup(path, [i])["dinov3_cls"][0])


# ---- S3 ---------------------------------------------------------------------------------------


def test_both_formats_on_s3(s3_bucket, ray_local):
    i2d = data_cfg(put(f"{s3_bucket}/i2d", img2dataset_files()), "img2dataset")
    src = prepare(i2d)
    bucket = s3_bucket[len("s3://") :]
    assert src.files == (f"{bucket}/i2d/00000.parquet", f"{bucket}/i2d/00001.parquet") and src.num_rows == 10
    rows = stream(src, i2d)
    assert len(rows) == 10 and flagged(rows, "bad_image") == ["000000001", "000000002", "000000004"]

    wds = data_cfg(put(f"{s3_bucket}/wds", webdataset_files()), "webdataset")
    src = prepare(wds)
    assert src.files == (f"{bucket}/wds/00000.tar", f"{bucket}/wds/00001.tar") and src.num_rows == 10
    rows = stream(src, wds)
    assert len(rows) == 10 and flagged(rows, "bad_image") == ["000000004", "000000005"]
    assert flagged(rows, "empty_caption") == ["000000003"]

    good = tar_bytes([wds_sample("k0", "a cat", image(0))])
    put(f"{s3_bucket}/cut", {"00000.tar": good[: members_end(good)]})  # an upload that stopped after the members
    with pytest.raises(SchemaError, match=rf"^{s3_bucket}/cut/00000\.tar: truncated tar"):
        prepare(data_cfg(f"{s3_bucket}/cut", "webdataset"))
    with pytest.raises(SchemaError, match=rf"^{s3_bucket}/wds/00000\.parquet: missing column 'jpg'"):
        prepare(data_cfg(f"{s3_bucket}/wds", "img2dataset"))
