"""Training-data formats behind one adapter, used by every consumer (`prepare`'s checks and
vocabulary, the Ray Data stream, the teacher cache): which files make up a dataset's training
set, what each must hold, and each file read as the normalized table

    id (string), image (bytes; null when missing), <data.caption_column> (string; null when
    missing), data.extra_captions (strings)

on which bad rows are flagged and counted the same way for every format (`bad_image`: no image,
or bytes that do not decode; `empty_caption`). `data.format` names the layout of `data.path`
(local directory or s3:// prefix):

raytrain     train/*.parquet (any depth) with columns id, image, <caption_column> (+ extra
             captions), and eval/ with the evaluation splits: the embedded default's layout.
img2dataset  img2dataset's output_format="parquet": 00000.parquet ... with its columns key,
             caption (its name for --caption_col's column), url, status, error_message, width,
             height, original_width, original_height (+ exif, sha256, --save_additional_columns),
             and the image bytes in the column named after --encode_format (`data.image_column`,
             "jpg" by default). Every input row is a row: one whose status is not "success" (a
             failed download or resize) or whose image is null is a bad image.
webdataset   tar shards 00000.tar ... (e.g. img2dataset's output_format="webdataset"): members
             <key>.jpg / .jpeg / .png / .webp (the image), <key>.txt (the caption) and, optional,
             <key>.json, whose fields of those names give the extra captions. A sample's members
             must be adjacent (WebDataset's rule); the key is the member name up to the first dot
             of its file name. A sample without an image member is a bad image, one without .txt an
             empty caption. Only *.tar is read: img2dataset's sidecar <shard>.parquet (metadata,
             no images) and <shard>_stats.json beside the tars are not training data.

For img2dataset and webdataset the shards sit directly under `data.path` (subdirectories, such
as a teacher cache written beside the data, are not read) and there is no eval/: runs on them
are evaluated on separate evaluation datasets.

A tar that is truncated (cut inside a member, or missing tar's end-of-archive blocks, as a
download or write that died leaves it) or not a tar is an error naming the file, raised by
`check_files` before anything starts: every tar is walked there, reading only the headers on
local disk and the whole file once, sequentially, on S3 (counts are remembered per file size
and modification time, so a second `prepare` in the same process does not read it again).

Ids are strings or integers (read as their decimal strings everywhere) and unique within a file,
since the teacher cache joins its outputs to a file's rows by id: a null or repeated id is an
error naming the file, the id and both row numbers, raised by `check_files` too (of a parquet
file only the id column is read).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from raytrain.config import DataConfig
from raytrain.data.schema import BINARY, ID, STRING, SchemaError, train_columns, validate_schema
from raytrain.data.sources import StorageError, endpoint, is_s3, list_parquet, storage_error, uri

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in this order when a sample has several
# a tar member's sample key and extension (WebDataset's split: the key ends at the first dot
# of the file name); names without an extension belong to no sample
MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
TAR_END = 1024  # the two zero blocks that end every complete tar archive
READ_BUFFER = 8 << 20  # sequential reads in large requests (S3: few GETs per tar)
CHUNK_ROWS = 256  # rows per table a tar is read in
CHECK_THREADS = 8  # files checked at once: reading metadata and tars waits on storage, not CPU
# (uri, size, mtime, id column) → (rows, id digest) of the files checked (tars: walked) so far
_checked: dict[tuple[str, int, int, str], tuple[int, str]] = {}


def train_root(cfg: DataConfig, base: str) -> str:
    """Where the training files are: train/ for the raytrain format, else the dataset root."""
    return f"{base}/train" if cfg.format == "raytrain" else base


def list_files(fs: pafs.FileSystem, base: str, cfg: DataConfig) -> list[str]:
    """The dataset's training files, sorted; StorageError naming the directory when none."""
    root = train_root(cfg, base)
    if cfg.format == "raytrain":
        return list_parquet(fs, root, uri(fs, root))
    suffix = ".tar" if cfg.format == "webdataset" else ".parquet"
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise storage_error(fs, "list", uri(fs, root), e) from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
    if not files:
        where = f" (S3 endpoint {endpoint(fs) or 'AWS'})" if is_s3(fs) else ""
        raise StorageError(f"no {suffix} files directly under {uri(fs, root)}{where} (data.format={cfg.format})")
    return files


def parquet_columns(cfg: DataConfig) -> dict[str, tuple]:
    """Source column → accepted arrow types, for the parquet formats."""
    if cfg.format == "raytrain":
        return train_columns(cfg.caption_column, cfg.extra_captions)
    extra = {c: STRING for c in cfg.extra_captions}
    return {"key": ID, cfg.image_column: BINARY, cfg.caption_column: STRING, "status": STRING, **extra}


def _hints(cfg: DataConfig) -> dict[str, str]:
    """What a missing column of an img2dataset parquet file most likely means."""
    if cfg.format != "img2dataset":
        return {}
    return {
        cfg.image_column: "the metadata file of an output_format=webdataset download (then data.format=webdataset)? "
        "or images encoded with another --encode_format (set data.image_column)",
        cfg.caption_column: "img2dataset writes captions only when run with --caption_col",
    }


def check_files(fs: pafs.FileSystem, files, cfg: DataConfig) -> list[tuple[int, str]]:
    """Check every training file (schema and ids of parquet files; tars walked whole) and return
    each one's (row count, id digest: `check_ids`); SchemaError naming the first bad file, in
    file order."""
    pool = ThreadPoolExecutor(CHECK_THREADS)
    try:
        checked = pool.map(lambda f: _check(fs, f, cfg), files)
        return list(tqdm(checked, total=len(files), desc="raytrain: checking training files", unit="file", delay=2))
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, do not go on reading the rest


def check_ids(ids: list, shown: str) -> str:
    """A training file's ids in row order, as the readers give them (strings): SchemaError naming
    the file `shown` for a null id, or for an id that repeats, with both row numbers; else a
    digest of them, which a teacher cache shard records to refuse a file that changed since."""
    first: dict[str, int] = {}
    for j, i in enumerate(ids):
        if i is None:
            raise SchemaError(f"{shown}: row {j} (counted from 0) has no id; every row needs a unique one")
        if first.setdefault(i, j) != j:
            raise SchemaError(
                f"{shown}: id {i!r} appears twice, at rows {first[i]} and {j} (counted from 0): ids must be "
                "unique within a file (the teacher cache joins its outputs to the rows by id)"
            )
    return hashlib.blake2b("\0".join(ids).encode(), digest_size=8).hexdigest()


def _check(fs: pafs.FileSystem, path: str, cfg: DataConfig) -> tuple[int, str]:
    shown, info = uri(fs, path), _info(fs, path)
    if cfg.format == "webdataset":
        key = (shown, info.size, info.mtime_ns, "")
        if key not in _checked:
            keys = [k for k, _ in _tar_samples(fs, path, info.size)]  # repeated ids: raised there
            _checked[key] = len(keys), check_ids(keys, shown)
        return _checked[key]
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            validate_schema(parquet.schema_arrow, shown, parquet_columns(cfg), _hints(cfg))
            key = (shown, info.size, info.mtime_ns, read_columns(cfg, ["id"])[0])
            if key not in _checked:
                ids = pc.cast(parquet.read(columns=[key[3]]).column(0), pa.string()).to_pylist()
                _checked[key] = len(ids), check_ids(ids, shown)
    except (OSError, pa.ArrowInvalid) as e:
        raise SchemaError(f"{shown}: not a readable parquet file ({e})") from None
    return _checked[key]


def read_columns(cfg: DataConfig, columns) -> list[str]:
    """The source columns a parquet file is read with, for these normalized `columns`."""
    if cfg.format == "raytrain":
        return list(columns)
    names = {"id": "key", "image": cfg.image_column}
    return [names.get(c, c) for c in columns] + (["status"] if "image" in columns else [])


def normalize(table: pa.Table, cfg: DataConfig) -> pa.Table:
    """A parquet table read with `read_columns` → normalized columns (others, e.g. Ray's
    `path`, kept): integer ids as their decimal strings; img2dataset: a row whose status is not
    "success" loses its image."""
    if cfg.format != "img2dataset":
        return _string_ids(table)
    if "status" in table.column_names:
        image = table[cfg.image_column]
        ok = pc.equal(table["status"], "success")  # null status: null, so no image either
        table = table.set_column(
            table.column_names.index(cfg.image_column),
            cfg.image_column,
            pc.if_else(ok, image, pa.scalar(None, image.type)),
        )
        table = table.drop_columns(["status"])
    names = {"key": "id", cfg.image_column: "image"}
    return _string_ids(table.rename_columns([names.get(n, n) for n in table.column_names]))


def _string_ids(table: pa.Table) -> pa.Table:
    if "id" not in table.column_names or not pa.types.is_integer(table.schema.field("id").type):
        return table
    return table.set_column(table.column_names.index("id"), "id", pc.cast(table["id"], pa.string()))


def read_file(fs: pafs.FileSystem, path: str, cfg: DataConfig, columns=None) -> pa.Table:
    """One training file as the normalized table, with `columns` of it (default: all)."""
    columns = list(columns or _schema(cfg).names)
    tables = list(iter_file(fs, path, cfg, columns))
    return pa.concat_tables(tables) if tables else _schema(cfg).empty_table().select(columns)


def iter_file(
    fs: pafs.FileSystem, path: str, cfg: DataConfig, columns=None, rows: int = CHUNK_ROWS
) -> Iterator[pa.Table]:
    """One training file as normalized tables of up to `rows` rows, with `columns` of it (default:
    all): streamed, so a large shard is never held whole (parquet row groups, tar samples)."""
    columns = list(columns or _schema(cfg).names)
    if cfg.format == "webdataset":
        for table in iter_tar(fs, path, cfg, images="image" in columns, rows=rows):
            yield table.select(columns)
        return
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=read_columns(cfg, columns)):
            yield normalize(pa.Table.from_batches([batch]), cfg)


def iter_tar(
    fs: pafs.FileSystem, path: str, cfg: DataConfig, images: bool = True, rows: int = CHUNK_ROWS
) -> Iterator[pa.Table]:
    """A tar's samples as normalized tables of up to `rows` rows (image bytes read only with
    `images`); SchemaError naming the file when it is truncated or not a tar."""
    schema = _schema(cfg)
    read = {"txt", *(IMAGE_EXTENSIONS if images else ()), *(("json",) if cfg.extra_captions else ())}
    batch: dict[str, list] = {n: [] for n in schema.names}
    for key, members in _tar_samples(fs, path, _info(fs, path).size, read):
        meta = _json(members.get("json")) if cfg.extra_captions else {}
        batch["id"].append(key)
        batch["image"].append(next((members[e] for e in IMAGE_EXTENSIONS if members.get(e) is not None), None))
        batch[cfg.caption_column].append(
            None if members.get("txt") is None else members["txt"].decode("utf-8", "replace")
        )
        for c in cfg.extra_captions:
            batch[c].append(None if meta.get(c) is None else str(meta[c]))
        if len(batch["id"]) == rows:
            yield pa.table(batch, schema=schema)
            batch = {n: [] for n in schema.names}
    if batch["id"]:
        yield pa.table(batch, schema=schema)


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise storage_error(fs, "check", uri(fs, path), e) from None


def _schema(cfg: DataConfig) -> pa.Schema:
    return pa.schema([(n, types[0]) for n, types in train_columns(cfg.caption_column, cfg.extra_captions).items()])


def _json(data: bytes | None) -> dict:
    """A sample's .json member; an unreadable one gives no fields (its extra captions are empty)."""
    try:
        meta = json.loads(data) if data else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _tar_samples(fs: pafs.FileSystem, path: str, size: int, read=frozenset()) -> Iterator[tuple[str, dict]]:
    """(key, {extension: bytes or None}) per sample of a tar, extensions lower-cased, the bytes
    of the extensions in `read` only. SchemaError naming the file for a truncated archive, one
    that is not a tar, or a sample whose members are not adjacent."""
    shown = uri(fs, path)
    seek = not read and not is_s3(fs)  # headers only: seek over the data on local disk
    key, members, seen = None, {}, {}  # seen: key → its sample number
    try:
        f = fs.open_input_file(path) if seek else fs.open_input_stream(path, compression=None, buffer_size=READ_BUFFER)
        with f, tarfile.open(fileobj=f, mode="r:" if seek else "r|") as tar:
            for info in tar:
                match = MEMBER.match(info.name) if info.isreg() else None
                if match is None:
                    continue
                name, extension = match.group(1), match.group(2).lower()
                if name != key:
                    if key is not None:
                        yield key, members
                        seen[key] = len(seen)
                    if name in seen:
                        raise SchemaError(
                            f"{shown}: id {name!r} appears twice, at samples {seen[name]} and {len(seen)} (counted "
                            "from 0): ids must be unique within a file; or the members of sample "
                            f"{name!r} are not adjacent (WebDataset needs each sample's files together: "
                            "re-create the tar sorted by name)"
                        )
                    key, members = name, {}
                if extension in members:  # the same id again, right after itself
                    raise SchemaError(
                        f"{shown}: id {name!r} appears twice, at samples {len(seen)} and {len(seen) + 1} (counted "
                        f"from 0; its .{extension} member repeats): ids must be unique within a file"
                    )
                members[extension] = tar.extractfile(info).read() if extension in read else None
            end = tar.offset  # where the last member ends
    except tarfile.TarError as e:
        raise SchemaError(f"{shown}: truncated or not a tar file ({e})") from None
    except OSError as e:
        raise storage_error(fs, "read", shown, e) from None
    if size < end + TAR_END:
        after = f" after sample {key!r}" if key is not None else ""
        raise SchemaError(
            f"{shown}: truncated tar: it ends at byte {size}{after} without tar's end-of-archive blocks "
            "(an interrupted download or write? fetch or write the shard again, or remove it)"
        )
    if key is not None:
        yield key, members
