"""Local and S3 storage behind one pyarrow filesystem, with errors that name the path."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raytrain.config import S3Config


class StorageError(OSError):
    """Storage that cannot be read or written; the message names the path."""


def resolve(path: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI.

    S3 endpoint and credentials come from `s3` or else the environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from code.
    """
    if not path.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    s3 = s3 or S3Config()
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        access_key=s3.access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=s3.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region=s3.region,
    )
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs), path[len("s3://") :]


def list_parquet(fs: pafs.FileSystem, root: str, shown: str) -> list[str]:
    """Sorted parquet files under root; StorageError naming `shown` when unreadable or empty."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {shown}: {e}") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise StorageError(f"no parquet files under {shown}")
    return files
