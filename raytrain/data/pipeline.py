"""Ray Data datasets for training: read parquet (local or S3), validate, decode, tokenize."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from raytrain.config import DataConfig
from raytrain.data.schema import SchemaError, validate_schema
from raytrain.data.sources import list_parquet, resolve
from raytrain.data.transforms import HFTokenizer, Preprocess, WordTokenizer


@dataclass(frozen=True)
class DataSource:
    """A training set whose every file was checked: where it is and how to tokenize it."""

    path: str  # dataset root as the user gave it (embedded: the generated directory)
    files: tuple[str, ...]  # train parquet files inside the filesystem
    num_rows: int
    eval_dir: str | None  # local directory with the evaluation splits, if any
    vocabulary: tuple[str, ...] | None  # word tokenizer vocabulary; None for a HF tokenizer

    def tokenizer(self, cfg: DataConfig):
        return WordTokenizer(list(self.vocabulary)) if self.vocabulary is not None else HFTokenizer(cfg.tokenizer)


def prepare(cfg: DataConfig) -> DataSource:
    """Resolve (and for the embedded default, generate once) the dataset and validate every
    train file's schema up front; errors name the file and column."""
    path = cfg.path
    if path == "embedded":
        from raytrain.data.synthetic import ensure_dataset

        root = os.path.expanduser(cfg.root)
        path = str(ensure_dataset(root, cfg.n_train, cfg.n_eval, cfg.seed, cfg.image_size))
    fs, base = resolve(path, cfg.s3)
    shown = lambda p: p if not path.startswith("s3://") else "s3://" + p  # noqa: E731
    files = list_parquet(fs, f"{base}/train", shown(f"{base}/train"))
    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            raise SchemaError(f"{shown(f)}: not a readable parquet file ({e})") from None
        validate_schema(meta.schema.to_arrow_schema(), shown(f), cfg.caption_column, cfg.extra_captions)
        rows += meta.num_rows
    vocabulary = None
    if cfg.tokenizer == "word":
        vocabulary = _vocabulary(fs, base, files, cfg.caption_column)
    eval_dir = f"{base}/eval" if not path.startswith("s3://") and os.path.isdir(f"{base}/eval") else None
    return DataSource(path, tuple(files), rows, eval_dir, vocabulary)


def _vocabulary(fs, base: str, files, caption_column: str) -> tuple[str, ...]:
    """The corpus vocabulary: from the dataset manifest when it lists one, else scanned."""
    try:
        with fs.open_input_stream(f"{base}/manifest.json") as f:
            return tuple(json.loads(f.read())["vocabulary"])
    except (FileNotFoundError, KeyError, OSError):
        captions = (c for f in files for c in pq.read_table(f, columns=[caption_column], filesystem=fs).column(0).to_pylist())
        return tuple(WordTokenizer.from_corpus(captions).words)


def train_dataset(src: DataSource, cfg: DataConfig, seed: int, cache=None):
    """Streaming Ray Dataset of {id, pixels, tokens, bad_image, empty_caption} rows, plus
    the cached teacher outputs of each row when a `CacheReader` is given."""
    import ray.data

    fs, _ = resolve(src.path, cfg.s3)
    ds = ray.data.read_parquet(
        list(src.files), filesystem=fs, columns=["id", "image", cfg.caption_column, *cfg.extra_captions], num_cpus=cfg.num_cpus,
        include_paths=cache is not None,  # the file names the cache shard to join against
    ).randomize_block_order(seed=seed)  # fmt: skip
    fn = Preprocess(src.tokenizer(cfg), cfg, cache)
    ds = ds.map_batches(fn, batch_format="numpy", batch_size=256, num_cpus=cfg.num_cpus)
    # a deterministic order, so a run resumed from a checkpoint skips exactly the batches it
    # saw (Ray Train replaces these options with its own: see tune.sweep.ingest_config)
    ds.context.execution_options.preserve_order = True
    return ds
