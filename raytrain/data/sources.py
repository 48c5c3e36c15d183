"""Local and S3 storage behind one pyarrow filesystem, with errors that name the path.

S3 (AWS or any S3-compatible server: MinIO, Ceph, moto) is configured by `S3Config`
(`data.s3.*`) or else the standard environment variables, never by code:

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   e.g. http://127.0.0.1:9000 (scheme taken from it)
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN)

Each S3Config field that is set wins over its environment variable. With neither, the AWS
SDK's own chain applies (~/.aws, instance metadata). Timeouts and retries are bounded, so an
unreachable endpoint fails in seconds with a `StorageError` that names the s3:// path and the
endpoint, not after minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raytrain.config import S3Config

# Bounded so an unreachable or silent endpoint fails fast: connect_timeout is the TCP connect
# limit; request_timeout is the AWS SDK's stall limit (it aborts a request after that many
# seconds with no byte moving, so large transfers are not cut short); attempts include the
# first try. Ray Data retries its own reads on top of these for transient network errors.
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 3.0
MAX_ATTEMPTS = 2

_CREDENTIAL_ERRORS = (
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "ACCESS_DENIED",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "EXPIRED_TOKEN",
    "InvalidToken",
    "HTTP status 403",
)


class StorageError(OSError):
    """Storage that cannot be read or written; the message names the path."""


def resolve(path: str, s3: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3://bucket/key URI.

    S3 endpoint and credentials come from `s3` or else the environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from code. No network I/O happens here.
    """
    if not path.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    key = path[len("s3://") :].strip("/")
    if not key:
        raise StorageError(f"{path}: no bucket in the S3 URI (expected s3://bucket/prefix)")
    return s3_filesystem(s3, path), key


def s3_filesystem(s3: S3Config | None = None, shown: str = "s3://", **extra) -> pafs.S3FileSystem:
    """The pyarrow S3 filesystem for `s3` (or the environment); `extra` goes to S3FileSystem."""
    s3 = s3 or S3Config()
    access_key = s3.access_key or os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret_key = s3.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if (access_key is None) != (secret_key is None):
        have, missing = ("access key", "secret key") if access_key else ("secret key", "access key")
        raise StorageError(
            f"{shown}: an S3 {have} is set but no {missing} (data.s3.access_key/secret_key "
            "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    kwargs = dict(
        access_key=access_key,
        secret_key=secret_key,
        region=s3.region,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    )
    # a session token belongs to the environment's key pair only, never to a configured one
    token = os.environ.get("AWS_SESSION_TOKEN")
    if token and not s3.access_key and not s3.secret_key and access_key:
        kwargs["session_token"] = token
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"{shown}: S3 endpoint {endpoint!r} must be a URL like http://host:port or https://host")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    kwargs.update(extra)
    return pafs.S3FileSystem(**kwargs)


def is_s3(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "s3"


def uri(fs: pafs.FileSystem, path: str) -> str:
    """How a path inside `fs` is shown to users: s3://bucket/key on S3, else the path."""
    return "s3://" + path if is_s3(fs) and not path.startswith("s3://") else path


def endpoint(fs: pafs.FileSystem) -> str | None:
    """The endpoint URL an S3 filesystem talks to (None: AWS's own, or not S3)."""
    if not is_s3(fs):
        return None
    try:
        opts = fs.__reduce__()[1][0]  # the constructor options, as pickling carries them
        return f"{opts['scheme'] or 'https'}://{opts['endpoint_override']}" if opts.get("endpoint_override") else None
    except Exception:  # noqa: BLE001 - only for messages
        return None


def storage_error(fs: pafs.FileSystem, what: str, shown: str, e: BaseException) -> StorageError:
    """A StorageError for failing to `what` `shown`, that says why in words and names the
    endpoint (S3): unreachable server, rejected credentials, or the storage's own message."""
    if not is_s3(fs):
        return StorageError(f"cannot {what} {shown}: {e}")
    where = endpoint(fs) or f"AWS S3 ({fs.region})"
    text = str(e)
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return StorageError(
            f"cannot {what} {shown}: S3 endpoint {where} is unreachable "
            f"(check data.s3.endpoint_url / AWS_ENDPOINT_URL and that the server is up): {text}"
        )
    if any(code in text for code in _CREDENTIAL_ERRORS):
        return StorageError(
            f"cannot {what} {shown}: S3 endpoint {where} rejected the credentials or denied access "
            f"(check data.s3.access_key/secret_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {text}"
        )
    return StorageError(f"cannot {what} {shown} (S3 endpoint {where}): {text}")


def list_parquet(fs: pafs.FileSystem, root: str, shown: str) -> list[str]:
    """Sorted parquet files under root; StorageError naming `shown` when unreadable or empty."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage_error(fs, "list", shown, e) from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        where = f" (S3 endpoint {endpoint(fs) or 'AWS'})" if is_s3(fs) else ""
        raise StorageError(f"no parquet files under {shown}{where}")
    return files


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file (or directory/prefix) exists; StorageError naming the path when the
    storage cannot answer (an unreachable server is an error, never "missing")."""
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise storage_error(fs, "check", uri(fs, path), e) from None


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so readers see the old object or the whole new one, never a part.

    S3: one upload of the complete bytes (an object, also a multipart one, becomes visible only
    when complete); an upload that fails is not completed. Local disk: a temporary file in the
    same directory, fsynced, then os.replace. Other filesystems: temporary file + move.
    """
    shown = uri(fs, path)
    try:
        if is_s3(fs):
            _write(fs, path, data)
        elif isinstance(fs, pafs.LocalFileSystem):
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            parent, name = posixpath.split(path)
            tmp = posixpath.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            fs.create_dir(parent, recursive=True)
            _write(fs, tmp, data)
            fs.move(tmp, path)
    except OSError as e:
        raise storage_error(fs, "write", shown, e) from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A local directory that appears whole or not at all: yields a private sibling to fill,
    renamed to `path` when the block ends without error, removed when it raises. OSError from the
    rename when `path` exists by then (e.g. another process made it first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from everyone else on shared storage
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    # All bytes in one write, then close: on S3 the close completes the upload, and Arrow does
    # not complete one whose part uploads failed, so a failed write leaves no object behind.
    out = fs.open_output_stream(path)
    out.write(data)
    out.close()


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole object/file; FileNotFoundError when missing, StorageError otherwise.

    (Uses a random-access file: on S3 a plain unbuffered input stream reads in many small
    ranged GETs, which is very slow against some servers.)"""
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise storage_error(fs, "read", uri(fs, path), e) from None
