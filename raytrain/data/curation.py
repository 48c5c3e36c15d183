"""Concept-balanced curation (freeze-align; docs/data.md#concept-balanced-curation), as a Ray Data job.

The paper collects ~3000 concepts (class names of curated datasets), scores every caption of an
uncurated pool against every concept, then takes the concepts from the least common to the most
common and lets each retrieve its 2,000 best captions that no earlier concept took. A caption so
belongs to at most one concept, the rarest that reached it, and common concepts cannot crowd out
rare ones (the head/tail balancing of MetaCLIP, done greedily). Here, with no embedding model:

- a caption reaches a concept when it holds the concept's words consecutively, as whole words,
  case-insensitively: "red circle" matches "a Red circle" and "red-circle", not "reddish circle"
  or "red circles" (words are runs of letters and digits, `\\w+`);
- a concept's commonality is the number of captions it reaches (MetaCLIP's entry count; the
  paper's proxy is the mean similarity of its 25,000 closest captions); ties go by name;
- with no similarity to rank by, a concept takes up to `cap` captions in a seeded random order:
  a hash of (seed, row id), so the result depends on the seed and the rows, never on how Ray Data
  splits or orders the reads. Rows that reach no concept are not collected, as in the paper.

    report = curate(cfg.data, "/data/curated", load_concepts("concepts.txt"), cap=2000, seed=0)

The output is a dataset in raytrain's layout, trainable with data.path=<out>: train/part-NNNNN.parquet
(the selected rows of source file NNNNN, same schema, each file written atomically), eval/ copied
from the source (a local one), manifest.json with the source's word vocabulary (so evaluation
captions keep their token ids), and curation.json, written last, with the counts per concept
before and after (also printed).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from raytrain.config import DataConfig
from raytrain.data.sources import exists, resolve, write_atomic
from raytrain.log import log

WORD = re.compile(r"\w+")
REPORT = "curation.json"


class CurationError(ValueError):
    """A concept list or a curation request that cannot run; the message names the file or key."""


def words(text) -> list[str]:
    return WORD.findall(str(text).casefold()) if text is not None else []


def load_concepts(path: str | Path) -> list[str]:
    """Concepts from a YAML list (.yaml/.yml) or a text file (one per line; blank lines and
    lines starting with # skipped)."""
    path = Path(path)
    if not path.is_file():
        raise CurationError(f"concept file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        items = yaml.safe_load(path.read_text())
        if not isinstance(items, list):
            raise CurationError(f"{path}: expected a YAML list of concepts, got {type(items).__name__}")
        where = [f"{path}: item {i + 1}" for i in range(len(items))]
    else:
        lines = [(n + 1, x.strip()) for n, x in enumerate(path.read_text().splitlines())]
        lines = [(n, x) for n, x in lines if x and not x.startswith("#")]
        items, where = [x for _, x in lines], [f"{path}:{n}" for n, _ in lines]
    for item, at in zip(items, where):
        if not isinstance(item, str) or not words(item):
            raise CurationError(f"{at}: {item!r} is not a concept (a string with at least one word)")
    check_concepts(items, where)
    return items


def check_concepts(concepts: Sequence[str], where: Sequence[str] | None = None) -> None:
    """No empty list, no two concepts with the same words (they would split one concept's rows)."""
    if not concepts:
        raise CurationError("the concept list is empty")
    where = where or [f"concept {i + 1}" for i in range(len(concepts))]
    first: dict[str, str] = {}
    for concept, at in zip(concepts, where):
        key = " ".join(words(concept))
        if not key:
            raise CurationError(f"{at}: {concept!r} has no words")
        if key in first:
            raise CurationError(f"{at}: {concept!r} repeats the concept of {first[key]}")
        first[key] = at


def default_concepts(data: DataConfig) -> list[str]:
    """The embedded default's concepts, from the vocabulary of its grammar: colours, shapes,
    sizes, textures, backgrounds and the colour-shape classes (its "class names")."""
    if data.path != "embedded":
        raise CurationError(
            f"data.path={data.path}: give the concept list (--concepts FILE); "
            "only the embedded default has one built in"
        )
    from raytrain.data.synthetic import BACKGROUNDS, CLASSES, COLORS, SHAPES, SIZES, TEXTURES

    return [*COLORS, *SHAPES, *SIZES, *TEXTURES, *BACKGROUNDS, *CLASSES]


class ConceptMatcher:
    """The concepts (indices into the list) a caption holds as consecutive whole words."""

    def __init__(self, concepts: Sequence[str]):
        check_concepts(concepts)
        self.index = {" ".join(words(c)): i for i, c in enumerate(concepts)}
        self.lengths = sorted({k.count(" ") + 1 for k in self.index})

    def __call__(self, caption) -> list[int]:
        w = words(caption)
        found = {self.index.get(" ".join(w[i : i + n])) for n in self.lengths for i in range(len(w) - n + 1)}
        return sorted(found - {None})


def _match(batch: pa.Table, matcher: ConceptMatcher, caption: str) -> pa.Table:
    """map_batches: id, path and the concepts each caption reaches (empty list: none)."""
    concepts = [matcher(c) for c in batch.column(caption).to_pylist()]
    return pa.table(
        {
            "id": batch.column("id").cast(pa.string()),
            "path": batch.column("path"),
            "concepts": pa.array(concepts, pa.list_(pa.int32())),
        }
    )


def priority(seed: int, row_id: str) -> int:
    """A row's place in every concept's random order: a hash of (seed, id)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest(), "big")


def select(
    matches: dict[str, Iterable[int]], concepts: Sequence[str], cap: int, seed: int
) -> tuple[dict[str, int], list[int]]:
    """The paper's balancing: concepts from the fewest matching rows to the most (ties by words),
    each taking up to `cap` of its rows that no earlier concept took, in the seeded random order.
    `matches`: row id → indices of the concepts its caption reaches. Returns (row id → index of
    the concept that took it, the concepts' order)."""
    if cap < 1:
        raise CurationError(f"cap {cap} must be at least 1")
    candidates: list[list[str]] = [[] for _ in concepts]
    for row, found in matches.items():
        for c in found:
            candidates[c].append(row)
    order = sorted(range(len(concepts)), key=lambda c: (len(candidates[c]), words(concepts[c])))
    taken: dict[str, int] = {}
    for c in tqdm(order, desc="concepts", unit="concept", disable=len(order) < 100):
        free = sorted((r for r in candidates[c] if r not in taken), key=lambda r: (priority(seed, r), r))
        taken.update((r, c) for r in free[:cap])
    return taken, order


def counts(
    matches: dict[str, Iterable[int]], taken: dict[str, int], concepts: Sequence[str], order: Sequence[int]
) -> list[dict]:
    """Per concept, in `order`: rows reaching it before curation, rows it took, rows reaching it after."""
    before, after, took = (np.zeros(len(concepts), np.int64) for _ in range(3))
    for row, found in matches.items():
        found = list(found)
        before[found] += 1
        if row in taken:
            after[found] += 1
            took[taken[row]] += 1
    return [
        {"concept": concepts[c], "before": int(before[c]), "selected": int(took[c]), "after": int(after[c])}
        for c in order
    ]


def _write_shards(batch: dict, files: Sequence[str], fs, out_fs, out_root: str) -> dict:
    """map_batches: source file i's selected rows (all columns, its schema) → train/part-i.parquet."""
    rows = []
    for i, ids in zip(batch["index"], batch["ids"]):
        table = pq.read_table(files[int(i)], filesystem=fs)
        part = table.filter(pc.is_in(table.column("id").cast(pa.string()), value_set=pa.array(list(ids), pa.string())))
        buf = io.BytesIO()
        pq.write_table(part, buf)
        write_atomic(out_fs, posixpath.join(out_root, "train", f"part-{int(i):05d}.parquet"), buf.getvalue())
        rows.append(part.num_rows)
    return {"index": batch["index"], "rows": np.array(rows)}


def curate(data: DataConfig, out: str, concepts: Sequence[str], cap: int = 2000, seed: int = 0) -> dict:
    """Curate `data` (raytrain layout, local or s3://) into `out`; returns the report that
    curation.json holds. `out` must not hold a dataset yet."""
    import ray

    from raytrain.data.pipeline import prepare

    if data.format != "raytrain":
        raise CurationError(f"data.format={data.format}: curation reads and writes raytrain's layout (train/*.parquet)")
    matcher = ConceptMatcher(concepts)
    out_fs, root = resolve(out, data.s3)
    for name in (REPORT, "train"):
        if exists(out_fs, posixpath.join(root, name)):
            raise CurationError(
                f"{out} already holds a dataset ({name}); curation writes a new one: choose another directory"
            )
    src = prepare(data)
    fs, _ = resolve(src.path, data.s3)
    if not ray.is_initialized():
        ray.init()

    ds = ray.data.read_parquet(
        list(src.files), filesystem=fs, columns=["id", data.caption_column], include_paths=True, num_cpus=data.num_cpus
    )
    ds = ds.map_batches(
        _match,
        fn_kwargs={"matcher": matcher, "caption": data.caption_column},
        batch_format="pyarrow",
        num_cpus=data.num_cpus,
    )
    matches: dict[str, list[int]] = {}
    file_of: dict[str, str] = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        for row, path, found in zip(*(batch.column(c).to_pylist() for c in ("id", "path", "concepts"))):
            if row is None:
                raise CurationError(f"{path}: a row has no id (column 'id' is null); ids must be unique strings")
            if row in file_of:
                raise CurationError(f"row id {row!r} appears twice ({file_of[row]} and {path}): ids must be unique")
            file_of[row] = path
            if found:
                matches[row] = found

    taken, order = select(matches, concepts, cap, seed)
    per_file: dict[int, list[str]] = {}
    index = {f: i for i, f in enumerate(src.files)}
    for row in taken:
        per_file.setdefault(index[file_of[row]], []).append(row)
    if per_file:
        items = [{"index": i, "ids": sorted(ids)} for i, ids in sorted(per_file.items())]
        ray.data.from_items(items).map_batches(
            _write_shards,
            fn_kwargs={"files": src.files, "fs": fs, "out_fs": out_fs, "out_root": root},
            batch_size=1,
            num_cpus=data.num_cpus,
        ).materialize()
    if src.eval_dir:  # the evaluation splits, as they are
        for p in sorted(Path(src.eval_dir).rglob("*")):
            if p.is_file():
                write_atomic(
                    out_fs, posixpath.join(root, "eval", p.relative_to(src.eval_dir).as_posix()), p.read_bytes()
                )
    if src.vocabulary is not None:
        write_atomic(
            out_fs, posixpath.join(root, "manifest.json"), json.dumps({"vocabulary": list(src.vocabulary)}).encode()
        )

    table = counts(matches, taken, concepts, order)
    report = {
        "source": src.path,
        "cap": cap,
        "seed": seed,
        "rows_before": src.num_rows,
        "rows_matched": len(matches),
        "rows_after": len(taken),
        "files": len(per_file),
        "concepts": table,
    }
    write_atomic(out_fs, posixpath.join(root, REPORT), json.dumps(report, indent=1).encode())
    width = max(len(r["concept"]) for r in table)
    print(f"| {'concept':<{width}} | before | selected | after |\n|{'-' * (width + 2)}|-------:|---------:|------:|")
    for r in table:
        print(f"| {r['concept']:<{width}} | {r['before']:>6} | {r['selected']:>8} | {r['after']:>5} |")
    log.info(
        f"curated {len(taken)} of {src.num_rows} rows "
        f"({len(matches)} reach a concept; at most {cap} per concept, "
        f"rarest first, seed {seed}) into {out}; counts in {posixpath.join(out, REPORT)}"
    )
    return report
