"""Ray Data datasets for training: read a dataset of any format (local or S3; see
raytrain.data.formats), validate, decode, tokenize."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from raytrain.config import DataConfig
from raytrain.data.formats import check_files, iter_file, list_files, read_file
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
    columns = ["id", "image", cfg.caption_column, *cfg.extra_captions]
    # The paths of the files prepare() checked, a block each, read through the reader that the checks
    # and the cache build use, so every format reads, counts bad rows and joins the same way. Not
    # Ray's read_parquet: it lists files in a task that needs a whole free CPU, which a 2-core
    # machine running two trials does not have (the stream waited forever), and it packed a few
    # small files into one block, so randomize_block_order left them in file order whatever the seed.
    ds = ray.data.from_items([{"path": f} for f in src.files], override_num_blocks=len(src.files))
    # Read and decode in one step, CHUNK_ROWS rows at a time, in data.decode_tasks tasks that each
    # take an equal share of the files in turn (null: a task per file, as many at once as CPUs
    # allow). As two map_batches steps Ray Data fused them into tasks that took as many paths as
    # the decode's batch size asked for rows: up to 256 files on one core whatever the CPUs. One
    # task per file on 2 cores cost the sweep's step time (docs/paper-study.md section 9).
    per_task = 1 if cfg.decode_tasks is None else math.ceil(len(src.files) / cfg.decode_tasks)
    fn = Preprocess(src.tokenizer(cfg), cfg, cache)
    ds = ds.randomize_block_order(seed=seed).map_batches(
        partial(_read, fs=fs, cfg=cfg, columns=columns, fn=fn),
        batch_format="pyarrow",
        batch_size=per_task,
        num_cpus=cfg.num_cpus,
    )
    # a deterministic order, so a run resumed from a checkpoint skips exactly the batches it
    # saw (Ray Train replaces these options with its own: see tune.sweep.ingest_config)
    ds.context.execution_options.preserve_order = True
    # a trial's data stream is followed by its reports; per-operator bars would only fill its logs
    ds.context.enable_progress_bars = False
    return ds


def _read(batch: pa.Table, fs, cfg: DataConfig, columns: list[str], fn: Preprocess):
    """map_batches generator: the files named in `batch`, each read as normalized tables of at
    most CHUNK_ROWS rows (memory bounded whatever a file's size) and decoded by `fn`; with a
    teacher cache, each row's file path goes along (cache shard i holds training file i's rows)."""
    for path in batch.column("path").to_pylist():
        for table in iter_file(fs, path, cfg, columns):
            rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
            if fn.cache is not None:
                rows["path"] = np.full(len(table), path, dtype=object)
            yield fn(rows)
