"""Ray Data datasets for training: read a dataset of any format (local or S3; see
raytrain.data.formats), validate, decode, tokenize."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial

import pyarrow as pa

from raytrain.config import DataConfig
from raytrain.data.formats import check_files, iter_tar, list_files, normalize, read_columns, read_file
from raytrain.data.sources import resolve
from raytrain.data.transforms import HFTokenizer, Preprocess, WordTokenizer


@dataclass(frozen=True)
class DataSource:
    """A training set whose every file was checked: where it is and how to tokenize it."""

    path: str  # dataset root as the user gave it (embedded: the generated directory)
    files: tuple[str, ...]  # training files (of data.format) inside the filesystem
    num_rows: int
    eval_dir: str | None  # local directory with the evaluation splits, if any
    vocabulary: tuple[str, ...] | None  # word tokenizer vocabulary; None for a HF tokenizer
    # per training file: its rows and the digest of its ids (formats.check_ids), which the
    # teacher cache compares with what each shard was built from; () in sources saved before
    file_rows: tuple[int, ...] = ()
    file_ids: tuple[str, ...] = ()

    def tokenizer(self, cfg: DataConfig):
        return WordTokenizer(list(self.vocabulary)) if self.vocabulary is not None else HFTokenizer(cfg.tokenizer)


def prepare(cfg: DataConfig) -> DataSource:
    """Resolve (and for the embedded default, generate once) the dataset and check every
    training file up front (columns of parquet files, tars walked whole: raytrain.data.formats);
    errors name the file and column. Only the raytrain format has an eval/ directory."""
    path = cfg.path
    if path == "embedded":
        from raytrain.data.synthetic import ensure_dataset

        root = os.path.expanduser(cfg.root)
        path = str(ensure_dataset(root, cfg.n_train, cfg.n_eval, cfg.seed, cfg.image_size))
    fs, base = resolve(path, cfg.s3)
    files = list_files(fs, base, cfg)
    checked = check_files(fs, files, cfg)
    vocabulary = None
    if cfg.tokenizer == "word":
        vocabulary = _vocabulary(fs, base, files, cfg)
    local_eval = cfg.format == "raytrain" and not path.startswith("s3://") and os.path.isdir(f"{base}/eval")
    rows, ids = (tuple(x) for x in zip(*checked))
    return DataSource(path, tuple(files), sum(rows), f"{base}/eval" if local_eval else None, vocabulary, rows, ids)


def _vocabulary(fs, base: str, files, cfg: DataConfig) -> tuple[str, ...]:
    """The corpus vocabulary: from the dataset manifest when it lists one, else scanned from
    the captions (a whole pass over tars: real data normally uses a Hugging Face tokenizer)."""
    try:
        with fs.open_input_stream(f"{base}/manifest.json") as f:
            return tuple(json.loads(f.read())["vocabulary"])
    except (FileNotFoundError, KeyError, OSError):
        captions = (c for f in files for c in read_file(fs, f, cfg, [cfg.caption_column]).column(0).to_pylist())
        return tuple(WordTokenizer.from_corpus(c for c in captions if c is not None).words)


def train_dataset(src: DataSource, cfg: DataConfig, seed: int, cache=None):
    """Streaming Ray Dataset of {id, pixels, tokens, bad_image, empty_caption} rows, plus
    the cached teacher outputs of each row when a `CacheReader` is given."""
    import ray.data

    fs, _ = resolve(src.path, cfg.s3)
    with_path = cache is not None  # the file names the cache shard to join against
    if cfg.format == "webdataset":
        # one read task per tar, through the reader prepare() and the cache use, so checks and
        # bad-row accounting are the same (Ray's read_webdataset gives each extension its own
        # column, .jpg/.png/.webp apart, and by default decodes images itself)
        ds = ray.data.from_items([{"path": f} for f in src.files], override_num_blocks=len(src.files))
        ds = ds.randomize_block_order(seed=seed).map_batches(
            partial(_read_tars, fs=fs, cfg=cfg, with_path=with_path),
            batch_format="pyarrow",
            batch_size=1,
            num_cpus=cfg.num_cpus,
        )
    else:
        columns = read_columns(cfg, ["id", "image", cfg.caption_column, *cfg.extra_captions])
        ds = ray.data.read_parquet(
            list(src.files), filesystem=fs, columns=columns, num_cpus=cfg.num_cpus, include_paths=with_path
        )
        ds = ds.randomize_block_order(seed=seed)
        if cfg.format == "img2dataset":
            ds = ds.map_batches(partial(normalize, cfg=cfg), batch_format="pyarrow", num_cpus=cfg.num_cpus)
    fn = Preprocess(src.tokenizer(cfg), cfg, cache)
    ds = ds.map_batches(fn, batch_format="numpy", batch_size=256, num_cpus=cfg.num_cpus)
    # a deterministic order, so a run resumed from a checkpoint skips exactly the batches it
    # saw (Ray Train replaces these options with its own: see tune.sweep.ingest_config)
    ds.context.execution_options.preserve_order = True
    return ds


def _read_tars(batch: pa.Table, fs, cfg: DataConfig, with_path: bool):
    """map_batches generator: the tars named in `batch` as normalized tables (+ their path)."""
    for path in batch.column("path").to_pylist():
        for table in iter_tar(fs, path, cfg):
            yield table.append_column("path", pa.array([path] * len(table), pa.string())) if with_path else table
