"""The teacher cache: frozen-teacher outputs computed once per sample, reused by every trial.

Layout (local directory or s3:// prefix):

    <cache>/shard-00000.parquet ...   one per training file, rows keyed by sample `id`;
                                      each output a float16 column, flattened; its footer
                                      records the rows and id digest of the file it was
                                      built from
    <cache>/manifest.json             written last: fingerprint, shapes, per-shard counts

Shard i holds the outputs for training file i, so a build is a set of independent units:
each shard is written atomically (temp + rename locally, one PUT on S3), an interrupted
build started again skips the shards that exist, and because a shard depends only on its
input file and the teachers, the result equals an uninterrupted build. Training joins a
batch to its file's shard by id (no shuffle join), and refuses a cache whose fingerprint
does not match its config, naming what differs, and a shard built from another version of its
training file (other row count or ids: at open from the manifest, and again when a worker reads
the shard), naming the file. A file with a null or repeated id is refused by the build too.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytrain.config import ConfigError
from raytrain.data.formats import check_ids, read_file
from raytrain.data.pipeline import DataSource, prepare
from raytrain.data.sources import StorageError, exists, read_bytes, resolve, uri, write_atomic
from raytrain.data.transforms import decode_image, normalize
from raytrain.log import log
from raytrain.teachers import build_dinov3, build_text, build_yolo

SCHEMA_VERSION = 2  # 2: shards record the rows and id digest of their training file
MANIFEST = "manifest.json"


# cache outputs computed by another output's teacher (cache.teachers name → teachers.* section)
TEACHER_OF = {"text_tokens": "text"}


class CacheMismatch(ConfigError):
    """A cache built for another config; the message lists the differing fields."""


class TeacherSet:
    """The configured frozen teachers, run together on a batch of decoded samples."""

    def __init__(self, cfg, names, device="cpu"):
        self.names, self.device = tuple(names), device
        data = cfg.data
        needs_dinov3 = "dinov3" in names or "yolo" in names  # YOLO region crops use DINOv3 features
        self.dinov3 = build_dinov3(cfg.teachers.dinov3, data.mean, data.std).to(device) if needs_dinov3 else None
        self.text = build_text(cfg.teachers.text) if {"text", "text_tokens"} & set(names) else None
        self.yolo = build_yolo(cfg.teachers.yolo) if "yolo" in names else None
        self.max_tokens = cfg.teachers.text.max_tokens

    def fingerprints(self) -> dict[str, str]:
        return {n: getattr(self, TEACHER_OF.get(n, n)).fingerprint() for n in self.names}

    @torch.no_grad()
    def __call__(self, images: np.ndarray, pixels: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
        """uint8 images [n, H, W, 3], their normalized pixels, captions → outputs by name."""
        out = {}
        if self.dinov3 is not None and "dinov3" in self.names:
            o = self.dinov3(pixels.to(self.device))
            out["dinov3_cls"], out["dinov3_multiscale"] = o.cls, o.multiscale
        if "text" in self.names:
            out["text"] = self.text.encode(captions)
        if "text_tokens" in self.names:
            out["text_tokens"], out["text_mask"] = self.text.encode_tokens(captions, self.max_tokens)
        if self.yolo is not None:
            from raytrain.teachers.yolo import crop_features, stack

            regions = stack(self.yolo.detect(images))
            out.update({f"yolo_{k}": v for k, v in regions.items()})
            out["yolo_crops"] = crop_features(pixels, regions["boxes"], self.dinov3, self.dinov3.image_size)
        return {k: torch.as_tensor(v).float().cpu().numpy() for k, v in out.items()}


def cache_dir(cfg, src: DataSource) -> str:
    """cache.path, or a directory beside the dataset named by a hash of the cache's inputs
    (so caches for different teacher configs never collide)."""
    if cfg.cache.path:
        return cfg.cache.path
    key = hashlib.sha256(json.dumps(_declared(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return posixpath.join(src.path, "teacher_cache", key)


def _declared(cfg) -> dict:
    """The config fields a cache depends on (everything but the weights' hash)."""
    return {
        "teachers": {
            n: getattr(cfg.teachers, TEACHER_OF.get(n, n)).model_dump(mode="json") for n in sorted(cfg.cache.teachers)
        },
        "preprocessing": {k: getattr(cfg.data, k) for k in ("image_size", "mean", "std", "caption_column")},
        "dtype": "float16",
        "schema_version": SCHEMA_VERSION,
    }


def fingerprint(cfg, src: DataSource, teachers: TeacherSet) -> dict:
    """What a cache must match: declared config, weight hashes and the dataset's files."""
    fp = _declared(cfg)
    fp["weights"] = teachers.fingerprints()
    fp["dataset"] = {"files": [posixpath.basename(f) for f in src.files], "rows": src.num_rows}
    return json.loads(json.dumps(fp))  # the form it has when read back from the manifest


def differences(built: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ, with both values."""
    out = []
    for key in sorted(set(built) | set(wanted)):
        a, b = built.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cache has {a!r}, config wants {b!r}")
    return out


def read_manifest(fs, root: str) -> dict | None:
    try:
        return json.loads(read_bytes(fs, posixpath.join(root, MANIFEST)))
    except FileNotFoundError:
        return None


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


class _ShardBuilder:
    """Ray Data actor: builds the teachers once, then writes one cache shard per input file."""

    def __init__(self, cfg_tree: dict, src: dict, fs, out_fs, out_root: str):
        # filesystems resolved on the driver: S3 endpoint and credentials from its config or
        # environment travel with them (the workers' environment may not have them)
        from raytrain.config import make_config

        self.cfg, self.src = make_config(cfg_tree), DataSource(**src)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teachers = TeacherSet(self.cfg, self.cfg.cache.teachers, device)
        self.fs, self.out_fs, self.out_root = fs, out_fs, out_root

    def __call__(self, batch: dict) -> dict:
        stats = [self.build(int(i)) for i in batch["index"]]
        return {k: np.array([s[k] for s in stats]) for k in stats[0]}

    def build(self, i: int) -> dict:
        t0, data = time.perf_counter(), self.cfg.data
        table = read_file(self.fs, self.src.files[i], data, ["id", "image", data.caption_column])  # any data.format
        ids, blobs, captions = (table.column(c).to_pylist() for c in ("id", "image", data.caption_column))
        source = {"rows": len(ids), "ids": check_ids(ids, uri(self.fs, self.src.files[i]))}
        decoded = [decode_image(b, data.image_size) for b in blobs]
        empty = [c is None or not str(c).strip() for c in captions]
        keep = [j for j, d in enumerate(decoded) if d is not None and not empty[j]]
        columns: dict[str, list] = {}
        for lo in range(0, len(keep), self.cfg.cache.batch_size):
            rows = keep[lo : lo + self.cfg.cache.batch_size]
            images = np.stack([decoded[j] for j in rows])
            pixels = torch.from_numpy(normalize(images, data.mean, data.std))
            for name, value in self.teachers(images, pixels, [captions[j] for j in rows]).items():
                columns.setdefault(name, []).append(value)
        arrays = {"id": pa.array([ids[j] for j in keep], pa.string())}
        shapes = {}
        for name, parts in columns.items():
            value = np.concatenate(parts).astype(np.float16)
            shapes[name] = list(value.shape[1:])
            flat = value.reshape(len(value), -1)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        skipped = {
            "bad_image": sum(d is None for d in decoded),
            "empty_caption": sum(e and d is not None for e, d in zip(empty, decoded)),
        }
        # shapes and skip counts travel in the shard, so a resumed build's manifest is whole
        meta = {
            "raytrain.shapes": json.dumps(shapes),
            "raytrain.skipped": json.dumps(skipped),
            "raytrain.source": json.dumps(source),
        }
        buf = io.BytesIO()
        pq.write_table(pa.table(arrays).replace_schema_metadata(meta), buf)
        write_atomic(self.out_fs, posixpath.join(self.out_root, shard_name(i)), buf.getvalue())
        return {"index": i, "rows": len(keep), "seconds": time.perf_counter() - t0}


def build_cache(config) -> dict:
    """Build (or resume, or reuse) the teacher cache for `config`; returns its manifest."""
    import ray

    src = prepare(config.data)
    root = cache_dir(config, src)
    fs, base = resolve(root, config.data.s3)
    wanted = fingerprint(config, src, TeacherSet(config, config.cache.teachers))
    manifest = read_manifest(fs, base)
    if manifest is not None:
        diff = differences(manifest["fingerprint"], wanted)
        if diff:
            raise CacheMismatch(f"cache at {root} was built for another config:\n  " + "\n  ".join(diff))
        check_shards(manifest["shards"], src, root)
        log.info(f"teacher cache at {root} is complete ({manifest['rows']} rows); reusing it")
        return manifest
    todo = []
    for i, file in enumerate(src.files):
        path = posixpath.join(base, shard_name(i))
        if not exists(fs, path):
            todo.append(i)
        elif _source(pq.read_schema(path, filesystem=fs).metadata) != _wanted(src, i):  # an earlier build's
            log.info(f"{shard_name(i)} was built from another version of {file}: building it again")
            todo.append(i)
    log.info(
        f"building teacher cache at {root}: {len(todo)} of {len(src.files)} shards to do "
        f"({', '.join(config.cache.teachers)})"
    )
    if not ray.is_initialized():
        ray.init()
    t0 = time.perf_counter()
    cache = config.cache
    gpus = cache.num_gpus if ray.cluster_resources().get("GPU", 0) else 0
    results = []
    if todo:
        ds = ray.data.from_items([{"index": i} for i in todo]).map_batches(
            _ShardBuilder,
            fn_constructor_kwargs={
                "cfg_tree": config.model_dump(mode="json"),
                "src": _plain(src),
                "fs": resolve(src.path, config.data.s3)[0],
                "out_fs": fs,
                "out_root": base,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cache.actors),
            num_cpus=cache.num_cpus,
            num_gpus=gpus,
        )
        results = ds.take_all()
    elapsed = time.perf_counter() - t0
    shards, shapes = zip(*(_shard_stats(fs, base, i) for i in range(len(src.files))))
    manifest = {
        "fingerprint": wanted,
        "teachers": list(cache.teachers),
        "shards": list(shards),
        "shapes": shapes[0],
        "rows": sum(s["rows"] for s in shards),
        "skipped": {r: sum(s[f"skipped_{r}"] for s in shards) for r in ("bad_image", "empty_caption")},
        "bytes": sum(s["bytes"] for s in shards),
    }
    write_atomic(fs, posixpath.join(base, MANIFEST), json.dumps(manifest, indent=1).encode())
    built = sum(int(r["rows"]) for r in results)
    log.info(
        f"teacher cache complete: {manifest['rows']} rows in {len(shards)} shards, "
        f"{manifest['bytes'] / 1e6:.1f} MB; built {built} rows in {elapsed:.1f} s "
        f"({built / max(elapsed, 1e-9):.0f} rows/s); "
        f"skipped {manifest['skipped']['bad_image']} undecodable images, "
        f"{manifest['skipped']['empty_caption']} empty captions"
    )
    return manifest


def _plain(src: DataSource) -> dict:
    from dataclasses import asdict

    return asdict(src)


def _shard_stats(fs, base: str, i: int) -> tuple[dict, dict]:
    """(rows, bytes, skip counts) and output shapes of shard i, from its own footer."""
    path = posixpath.join(base, shard_name(i))
    meta = pq.read_schema(path, filesystem=fs).metadata
    skipped = json.loads(meta[b"raytrain.skipped"])
    source_rows, source_ids = _source(meta)
    stats = {
        "file": shard_name(i),
        "rows": pq.read_metadata(path, filesystem=fs).num_rows,
        "bytes": fs.get_file_info(path).size,
        **{f"skipped_{k}": v for k, v in skipped.items()},
        "source_rows": source_rows,
        "source_ids": source_ids,
    }
    return stats, json.loads(meta[b"raytrain.shapes"])


def _source(meta: dict | None) -> tuple:
    """(rows, id digest) of the training file a shard was built from, from its footer."""
    source = json.loads((meta or {}).get(b"raytrain.source", b"{}"))
    return source.get("rows"), source.get("ids")


def _wanted(src: DataSource, i: int) -> tuple:
    """(rows, id digest) of training file i as `prepare` found it."""
    return src.file_rows[i], src.file_ids[i]


def _same_source(root: str, i: int, file: str, built: tuple, wanted: tuple) -> None:
    if tuple(built) != tuple(wanted):
        raise CacheMismatch(
            f"teacher cache {root}: {shard_name(i)} holds the outputs of {file} as it was when built ({built[0]} "
            f"rows, ids {built[1]}), but the file now has {wanted[0]} rows (ids {wanted[1]}): it changed since; "
            f"build the cache again (remove {root}, or set cache.path elsewhere)"
        )


def check_shards(shards: list[dict], src: DataSource, root: str) -> None:
    """CacheMismatch naming the first training file whose shard, as the manifest lists it, was
    built from another version of it (other row count or ids)."""
    for i, (shard, file) in enumerate(zip(shards, src.files)):
        _same_source(root, i, file, (shard.get("source_rows"), shard.get("source_ids")), _wanted(src, i))


@dataclass(frozen=True)
class CacheReader:
    """Looks up cached teacher outputs for sample ids of one training file (per-shard join)."""

    root: str
    files: tuple[str, ...]  # training files, in shard order
    shapes: dict
    fs: object  # the cache's pyarrow filesystem, resolved on the driver (it pickles to workers)
    base: str
    sources: tuple[tuple[int, str], ...]  # per training file: (rows, id digest) as `prepare` found it

    @classmethod
    def open(cls, config, src: DataSource, manifest: dict | None = None) -> CacheReader:
        """The verified cache for this config; CacheMismatch names what differs. `manifest`:
        the one `build_cache` just returned (its fingerprint checked there)."""
        root = cache_dir(config, src)
        fs, base = resolve(root, config.data.s3)
        if manifest is None:
            manifest = read_manifest(fs, base)
            if manifest is None:
                raise StorageError(
                    f"no teacher cache at {root}: build it with `python jobs/build_cache.py` "
                    "(or cache.use=true in a sweep)"
                )
            wanted = fingerprint(config, src, TeacherSet(config, config.cache.teachers))
            diff = differences(manifest["fingerprint"], wanted)
            if diff:
                raise CacheMismatch(f"cache at {root} does not match this config:\n  " + "\n  ".join(diff))
        check_shards(manifest["shards"], src, root)
        sources = tuple(_wanted(src, i) for i in range(len(src.files)))
        return cls(root, src.files, manifest["shapes"], fs, base, sources)

    def lookup(self, path: str, ids) -> dict[str, np.ndarray]:
        """Outputs [n, *shape] float32 for `ids` of training file `path`."""
        index, table = _load_shard(self, self.files.index(path))
        try:
            rows = [index[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"teacher cache {self.root} has no outputs for sample id {e.args[0]!r} of {path}") from None
        return {
            name: table[name][rows].reshape(len(rows), *shape).astype(np.float32) for name, shape in self.shapes.items()
        }


_shards: dict[tuple[str, int], tuple] = {}  # per worker process: the last two shards read


def _load_shard(reader: CacheReader, i: int):
    key = (reader.base, i)
    if key not in _shards:
        if len(_shards) >= 2:  # a batch's file is usually the last one's
            _shards.pop(next(iter(_shards)))
        _shards[key] = _read_shard(reader, i)
    return _shards[key]


def _read_shard(reader: CacheReader, i: int):
    """(id → row, outputs) of shard i; CacheMismatch naming its training file when the shard was
    built from another version of that file, or holds an id twice."""
    table = pq.read_table(posixpath.join(reader.base, shard_name(i)), filesystem=reader.fs)
    _same_source(reader.root, i, reader.files[i], _source(table.schema.metadata), reader.sources[i])
    ids = table.column("id").to_pylist()
    index: dict[str, int] = {}
    for j, v in enumerate(ids):
        if index.setdefault(v, j) != j:
            raise CacheMismatch(
                f"teacher cache {reader.root}: {shard_name(i)} (of {reader.files[i]}) holds id {v!r} twice, at rows "
                f"{index[v]} and {j}: build the cache again (remove {reader.root})"
            )
    arrays = {}
    for name in table.column_names:
        if name != "id":
            col = table.column(name).combine_chunks()
            arrays[name] = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return index, arrays
