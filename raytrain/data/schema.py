"""Columns of the training data and their validation, done before anything starts."""

from __future__ import annotations

import pyarrow as pa

# Accepted arrow types, the first one named in errors and used where tables are built.
STRING = (pa.string(), pa.large_string())
BINARY = (pa.binary(), pa.large_binary())
# sample ids: strings, or integers, which every reader turns into their decimal strings
# (raytrain.data.formats.normalize), so the stream, the teacher cache and its join see one id
INTEGER = tuple(getattr(pa, f"{s}int{b}")() for s in ("", "u") for b in (8, 16, 32, 64))
ID = STRING + INTEGER
# Why a row is skipped; each reason is counted and reported with the run's metrics.
SKIP_REASONS = ("bad_image", "empty_caption")


class SchemaError(ValueError):
    """A dataset file whose columns cannot be trained on; the message names file and column."""


def train_columns(caption_column: str = "caption", extra_captions=()) -> dict[str, tuple]:
    """The normalized training columns every format is read into (the raytrain format's own):
    id (unique within a file), image bytes (null when missing), the caption and the extra
    captions (null when missing)."""
    return {"id": ID, "image": BINARY, caption_column: STRING, **{c: STRING for c in extra_captions}}


def validate_schema(
    schema: pa.Schema, where: str, columns: dict[str, tuple], hints: dict[str, str] | None = None
) -> None:
    """Raise SchemaError naming `where` and the first of `columns` (name → accepted types) that
    is missing or mistyped; `hints` adds a sentence for a missing column."""
    for column, types in columns.items():
        if column not in schema.names:
            hint = f"; {hints[column]}" if hints and column in hints else ""
            raise SchemaError(f"{where}: missing column {column!r} (columns present: {', '.join(schema.names)}){hint}")
        got = schema.field(column).type
        if got not in types:
            expected = "string or integer" if types == ID else types[0]
            raise SchemaError(f"{where}: column {column!r} has type {got}, expected {expected}")
