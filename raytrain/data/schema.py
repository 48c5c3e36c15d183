"""Columns of image-caption parquet and their validation, done before anything starts."""

from __future__ import annotations

import pyarrow as pa

# Column → accepted arrow types. `caption` is the configured caption column.
TRAIN_COLUMNS = {
    "id": (pa.string(), pa.large_string()),
    "image": (pa.binary(), pa.large_binary()),
    "caption": (pa.string(), pa.large_string()),
}
# Why a row is skipped; each reason is counted and reported with the run's metrics.
SKIP_REASONS = ("bad_image", "empty_caption")


class SchemaError(ValueError):
    """A dataset file whose columns cannot be trained on; the message names file and column."""


def validate_schema(schema: pa.Schema, where: str, caption_column: str = "caption", extra_captions=()) -> None:
    """Raise SchemaError naming `where` and the first missing or mistyped column."""
    columns = [(caption_column if n == "caption" else n, t) for n, t in TRAIN_COLUMNS.items()]
    columns += [(c, TRAIN_COLUMNS["caption"]) for c in extra_captions]
    for column, types in columns:
        if column not in schema.names:
            raise SchemaError(f"{where}: missing column {column!r} (columns present: {', '.join(schema.names)})")
        got = schema.field(column).type
        if got not in types:
            raise SchemaError(f"{where}: column {column!r} has type {got}, expected {types[0]}")
