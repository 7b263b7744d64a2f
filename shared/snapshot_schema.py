"""The Arrow schema of a shard's Parquet file: one row per distinct question text."""

from __future__ import annotations

import pyarrow as pa


def schema(dim: int) -> pa.Schema:
    """id: the primary (smallest) id; ids: every id with this text; metadata: the other columns as
    a JSON object (corpora differ in their columns, so a JSON column keeps shards uniform)."""
    return pa.schema([
        ("id", pa.string()),
        ("ids", pa.list_(pa.string())),
        ("text", pa.string()),
        ("text_key", pa.string()),
        ("metadata", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])
