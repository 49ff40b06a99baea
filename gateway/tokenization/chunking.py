"""Token ids → chained chunk keys.

    key_0 = xxh3_64(tokens[0:B],  seed = root(model, lora, cache_salt))
    key_i = xxh3_64(tokens[iB:(i+1)B], seed = key_{i-1})

B is the engine's KV block size, so each key names the same tokens as one engine block and,
through the chain, everything before them. Only full chunks get keys: engines announce only
full blocks. The root seed separates models, LoRA adapters and cache salts.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
from typing import cast

import xxhash

from gateway.types import RequestChunkKey


@functools.lru_cache(maxsize=4096)  # every request, and every event that starts a chain
def chain_root(model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
    return xxhash.xxh3_64_intdigest(f"{model}\x00{lora_name or ''}\x00{cache_salt or ''}".encode())


def chunk_keys(token_ids: Sequence[int], block_size: int, parent: int) -> list[RequestChunkKey]:
    """Keys of every full chunk of `token_ids`, chained from `parent` (a root or a key)."""
    num_chunks = len(token_ids) // block_size
    if num_chunks == 0:
        return []
    # One conversion for the whole prompt (none for an array of ids), then slices: no
    # per-token Python work.
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        data = token_ids[: num_chunks * block_size].tobytes()
    else:
        data = array("I", token_ids[: num_chunks * block_size]).tobytes()
    step = block_size * 4
    keys: list[int] = []
    append, digest = keys.append, xxhash.xxh3_64_intdigest  # a 16k-token prompt: 1,024 steps
    for offset in range(0, len(data), step):
        parent = digest(data[offset : offset + step], parent)
        append(parent)
    return cast(list[RequestChunkKey], keys)  # no call per key: `RequestChunkKey(x)` is one
