"""The Arrow token-shard format both halves agree on: one ``tokens: list<uint32>`` column, one row per document.

``prepare.shards`` writes shard files in this schema (IPC *file* format, several record batches each);
``stream.source`` and ``verify`` read them. A reader accepts any schema with this column (``list`` or
``large_list`` of ``uint32``) and ignores other columns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TOKENS_COLUMN = "tokens"
TOKEN_DTYPE = np.uint32
SCHEMA = pa.schema([pa.field(TOKENS_COLUMN, pa.list_(pa.uint32()), nullable=False)])


def has_token_column(schema: pa.Schema) -> bool:
    """Whether ``schema`` has the ``tokens: list<uint32>`` column (other columns are ignored)."""
    if TOKENS_COLUMN not in schema.names:
        return False
    kind = schema.field(TOKENS_COLUMN).type
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and kind.value_type == pa.uint32()
