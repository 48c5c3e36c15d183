"""S3 as first-class storage, against a real S3-compatible server (moto's) on 127.0.0.1:
datasets read and validated from s3://, streamed with Ray Data, fast and named failures for
unreachable or silent endpoints and rejected credentials, atomic writes, config over env."""

import io
import json
import os
import socket
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import TEST_KEY, TEST_REGION, TEST_SECRET, free_port, make_bucket
from PIL import Image

from raytrain.config import S3Config, make_config
from raytrain.data.pipeline import prepare, train_dataset
from raytrain.data.schema import SchemaError
from raytrain.data.sources import StorageError, endpoint, exists, read_bytes, resolve, write_atomic


def png(color=(255, 0, 0), size=20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def good_rows(n=6, start=0):
    return {
        "id": [f"r{i}" for i in range(start, start + n)],
        "image": [png((i * 20 % 256, 0, 0)) for i in range(start, start + n)],
        "caption": [f"a red circle {i}" for i in range(start, start + n)],
    }


def write_s3_dataset(uri: str, parts: dict, s3: S3Config | None = None) -> str:
    """Write {name: rows} as <uri>/train/<name> with pyarrow's S3 filesystem; returns uri."""
    fs, base = resolve(uri, s3)
    for name, rows in parts.items():
        pq.write_table(pa.table(rows), f"{base}/train/{name}", filesystem=fs)
    return uri


def data_cfg(path, **kw):
    return make_config({"data": {"path": str(path), "image_size": 16, **kw}}).data


def test_prepare_reads_validates_and_counts_on_s3(s3_bucket):
    uri = write_s3_dataset(f"{s3_bucket}/ds", {"part-0.parquet": good_rows(6), "part-1.parquet": good_rows(4, start=6)})
    src = prepare(data_cfg(uri))  # endpoint and credentials from the environment only
    bucket = s3_bucket[len("s3://") :]
    assert src.files == (f"{bucket}/ds/train/part-0.parquet", f"{bucket}/ds/train/part-1.parquet")
    assert src.num_rows == 10 and src.path == uri and src.eval_dir is None
    assert "circle" in src.vocabulary
    assert prepare(data_cfg(uri + "/")).num_rows == 10  # a trailing slash is the same dataset


def test_schema_errors_name_the_s3_file(s3_bucket):
    rows = good_rows()
    del rows["caption"]
    uri = write_s3_dataset(f"{s3_bucket}/bad", {"part-0.parquet": good_rows(), "part-1.parquet": rows})
    with pytest.raises(SchemaError, match=rf"^{s3_bucket}/bad/train/part-1\.parquet: missing column 'caption'"):
        prepare(data_cfg(uri))
    fs, base = resolve(f"{s3_bucket}/junk")
    write_atomic(fs, f"{base}/train/x.parquet", b"not parquet")
    with pytest.raises(SchemaError, match=rf"{s3_bucket}/junk/train/x\.parquet: not a readable parquet file"):
        prepare(data_cfg(f"{s3_bucket}/junk"))


def test_no_parquet_on_s3(s3_bucket):
    with pytest.raises(
        StorageError, match=rf"no parquet files under {s3_bucket}/empty/train \(S3 endpoint http://127\.0\.0\.1:\d+\)"
    ):
        prepare(data_cfg(f"{s3_bucket}/empty"))
    with pytest.raises(StorageError, match=r"no parquet files under s3://no-such-bucket-x/ds/train"):
        prepare(data_cfg("s3://no-such-bucket-x/ds"))
    with pytest.raises(StorageError, match=r"no bucket"):
        resolve("s3://")


def test_train_dataset_streams_from_s3_with_bad_row_flags(s3_bucket, ray_local):
    rows = good_rows(8)
    rows["image"][2] = b"\x89PNG broken"
    rows["caption"][5] = ""
    uri = write_s3_dataset(f"{s3_bucket}/ds", {"part-0.parquet": rows, "part-1.parquet": good_rows(5, start=8)})
    cfg = data_cfg(uri)
    src = prepare(cfg)
    assert src.num_rows == 13
    batches = list(train_dataset(src, cfg, seed=0).iter_batches(batch_size=None, batch_format="numpy"))
    ids = np.concatenate([b["id"] for b in batches])
    bad = dict(zip(ids, np.concatenate([b["bad_image"] for b in batches])))
    empty = dict(zip(ids, np.concatenate([b["empty_caption"] for b in batches])))
    assert sorted(ids) == sorted(rows["id"] + [f"r{i}" for i in range(8, 13)])
    assert [i for i, f in bad.items() if f] == ["r2"] and [i for i, f in empty.items() if f] == ["r5"]
    assert batches[0]["pixels"].shape[1:] == (3, 16, 16)


# What these bounds guard against is the AWS SDK's defaults: many retries with long timeouts, minutes
# before an unreachable endpoint or a rejected key fails. Our settings (raytrain.data.sources) end it
# in about 10 s at worst; the bounds sit far above that, so a loaded or slow machine still passes.
FAILS_WITHIN_S = 60.0


def _fails_fast(fn, match: str, within: float = FAILS_WITHIN_S) -> float:
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=match):
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < within, f"took {elapsed:.1f} s"
    return elapsed


def test_unreachable_endpoint_fails_fast_naming_path_and_endpoint(monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    took = _fails_fast(
        lambda: prepare(data_cfg("s3://somebucket/ds")),
        rf"cannot list s3://somebucket/ds/train: S3 endpoint http://127\.0\.0\.1:{port} is unreachable",
    )
    print(f"connection refused -> StorageError in {took:.2f} s")
    fs, base = resolve("s3://somebucket/ds")
    _fails_fast(
        lambda: exists(fs, f"{base}/x"), rf"cannot check s3://somebucket/ds/x: S3 endpoint http://127\.0\.0\.1:{port}"
    )
    _fails_fast(
        lambda: write_atomic(fs, f"{base}/x", b"1"),
        rf"cannot write s3://somebucket/ds/x: S3 endpoint http://127\.0\.0\.1:{port}",
    )


def test_silent_endpoint_times_out_fast():
    """A server that accepts connections and never answers (hung, or a wrong port behind a
    firewall that does not refuse) must fail in seconds too, not hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # the kernel completes connections; nothing ever reads or answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        cfg = data_cfg("s3://somebucket/ds", s3={"endpoint_url": url, "access_key": "k", "secret_key": "s"})
        took = _fails_fast(
            lambda: prepare(cfg), rf"cannot list s3://somebucket/ds/train: S3 endpoint {url} is unreachable"
        )
    print(f"silent endpoint -> StorageError in {took:.2f} s")


def test_endpoint_and_partial_credentials_are_checked(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        StorageError, match=r"s3://b/ds: S3 endpoint '127\.0\.0\.1:9000' must be a URL like http://host:port"
    ):
        resolve("s3://b/ds", S3Config(endpoint_url="127.0.0.1:9000"))
    with pytest.raises(StorageError, match=r"an S3 access key is set but no secret key"):
        resolve("s3://b/ds", S3Config(endpoint_url="http://127.0.0.1:1", access_key="k"))
    fs, _ = resolve("s3://b/ds", S3Config(endpoint_url="https://storage.example:8443/"))
    assert endpoint(fs) == "https://storage.example:8443"  # the scheme comes from the URL


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_atomic_and_exists_round_trip(where, tmp_path, request):
    root = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/out"
    fs, base = resolve(root)
    path = f"{base}/sub/manifest.json"
    assert not exists(fs, path)
    write_atomic(fs, path, b'{"v": 1}')
    assert exists(fs, path) and read_bytes(fs, path) == b'{"v": 1}'
    big = os.urandom(12 << 20)  # over S3's multipart part size: still one object, whole or nothing
    write_atomic(fs, path, big)
    assert read_bytes(fs, path) == big and fs.get_file_info(path).size == len(big)
    write_atomic(fs, path, b'{"v": 2}')  # overwrite
    assert read_bytes(fs, path) == b'{"v": 2}'
    listing = [
        i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File
    ]
    assert listing == [path]  # no temporary files left behind
    with pytest.raises(FileNotFoundError):
        read_bytes(fs, f"{base}/missing")


def test_s3config_fields_override_the_environment(s3_bucket, monkeypatch):
    uri = write_s3_dataset(f"{s3_bucket}/ds", {"part-0.parquet": good_rows()})
    server = os.environ["AWS_ENDPOINT_URL"]
    # the environment points nowhere; the config's endpoint wins
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match="unreachable"):
        prepare(data_cfg(uri))
    assert prepare(data_cfg(uri, s3={"endpoint_url": server})).num_rows == 6
    # and the other way round: a configured endpoint beats a good environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", server)
    with pytest.raises(StorageError, match=rf"S3 endpoint {dead} is unreachable"):
        prepare(data_cfg(uri, s3={"endpoint_url": dead}))
    # credentials: config fields win over the environment's, field by field
    fs, _ = resolve(uri, S3Config(access_key="cfg-key", secret_key="cfg-secret"))
    opts = fs.__reduce__()[1][0]
    assert (opts["access_key"], opts["secret_key"]) == ("cfg-key", "cfg-secret")
    fs, _ = resolve(uri)
    assert (fs.__reduce__()[1][0]["access_key"], endpoint(fs)) == (TEST_KEY, server)


# ---- credentials checked: a moto server of its own with IAM authentication on --------------


@pytest.fixture(scope="module")
def auth_s3(moto_servers):
    """A moto server that checks credentials: an IAM user allowed s3:* and its key pair,
    and s3://authbucket/ds holding a valid dataset. (moto checks nothing until IAM auth is
    turned on: INITIAL_NO_AUTH_ACTION_COUNT, or POST /moto-api/reset-auth as here.)"""
    import boto3

    url = moto_servers.start()
    kw = dict(endpoint_url=url, region_name=TEST_REGION, aws_access_key_id=TEST_KEY, aws_secret_access_key=TEST_SECRET)
    iam = boto3.client("iam", **kw)
    iam.create_user(UserName="trainer")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    make_bucket(url, "authbucket")
    write_s3_dataset(
        "s3://authbucket/ds",
        {"part-0.parquet": good_rows()},
        S3Config(endpoint_url=url, access_key=TEST_KEY, secret_key=TEST_SECRET),
    )
    req = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req, timeout=5).read()  # from now on every request is authenticated
    return {"url": url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def test_bad_credentials_are_rejected_naming_the_path(auth_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3["url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_s3["secret"])
    assert prepare(data_cfg("s3://authbucket/ds")).num_rows == 6
    for key, secret in [
        (auth_s3["key"], "wrong-secret"),
        ("AKIAUNKNOWNKEY000000", auth_s3["secret"]),
        (TEST_KEY, TEST_SECRET),
    ]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        t0 = time.monotonic()
        with pytest.raises(
            StorageError, match=r"cannot list s3://authbucket/ds/train: S3 endpoint .* rejected the credentials"
        ) as e:
            prepare(data_cfg("s3://authbucket/ds"))
        assert time.monotonic() - t0 < FAILS_WITHIN_S
        assert secret not in str(e.value)  # a secret never lands in a message
        fs, base = resolve("s3://authbucket/ds")
        with pytest.raises(StorageError, match=r"cannot write s3://authbucket/ds/x: .*rejected the credentials"):
            write_atomic(fs, f"{base}/x", b"1")


def test_configured_credentials_override_environment_ones(auth_s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3["url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)  # not known to the server
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    with pytest.raises(StorageError, match="rejected the credentials"):
        prepare(data_cfg("s3://authbucket/ds"))
    good = {"access_key": auth_s3["key"], "secret_key": auth_s3["secret"]}
    assert prepare(data_cfg("s3://authbucket/ds", s3=good)).num_rows == 6
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_s3["key"])  # and good env, bad config: config wins
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_s3["secret"])
    with pytest.raises(StorageError, match="rejected the credentials"):
        prepare(data_cfg("s3://authbucket/ds", s3={"access_key": auth_s3["key"], "secret_key": "wrong"}))


# ---- the teacher cache on S3 ------------------------------------------------------------------

CACHE_TINY = ["teachers.dinov3.size=tiny", "teachers.dinov3.image_size=32", "data.image_size=32", "cache.batch_size=4"]


def test_teacher_cache_built_and_read_on_s3(s3_bucket, ray_local):
    """Dataset and cache both at s3:// paths: the build writes shards + manifest (no temp
    objects), a second build reuses it, and the training stream joins the cached outputs."""
    from raytrain.teachers.cache import CacheReader, build_cache

    uri = write_s3_dataset(f"{s3_bucket}/ds", {"part-0.parquet": good_rows(6), "part-1.parquet": good_rows(5, start=6)})
    cfg = make_config({}, CACHE_TINY + [f"data.path={uri}", f"cache.path={s3_bucket}/cache"])
    manifest = build_cache(cfg)
    assert manifest["rows"] == 11 and [s["rows"] for s in manifest["shards"]] == [6, 5]
    fs, base = resolve(f"{s3_bucket}/cache")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base)) if i.type == pafs.FileType.File)
    assert names == ["manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    assert build_cache(cfg) == manifest  # complete: reused
    src = prepare(cfg.data)
    reader = CacheReader.open(cfg, src)
    cls = {}
    for b in train_dataset(src, cfg.data, 0, reader).iter_batches(batch_size=None, batch_format="numpy"):
        cls.update(zip(b["id"], b["dinov3_cls"]))
    assert len(cls) == 11
    for i, v in cls.items():
        path = src.files[0] if int(i[1:]) < 6 else src.files[1]
        assert np.array_equal(v, reader.lookup(path, [i])["dinov3_cls"][0]) and np.abs(v).sum() > 0


def test_teacher_cache_on_unreachable_s3_fails_naming_the_path(tmp_path, monkeypatch):
    from raytrain.data.synthetic import make_dataset
    from raytrain.teachers.cache import build_cache

    make_dataset(data := tmp_path / "ds", n_train=8, n_eval=8, seed=0, image_size=32)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = make_config(
        {},
        CACHE_TINY
        + [
            f"data.path={data}",
            "cache.path=s3://somebucket/cache",
            f"data.s3.endpoint_url={dead}",
            "data.s3.access_key=k",
            "data.s3.secret_key=s",
        ],
    )
    with pytest.raises(
        StorageError, match=rf"cannot read s3://somebucket/cache/manifest\.json: S3 endpoint {dead} is unreachable"
    ):
        build_cache(cfg)
