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
    data = _chunk_bytes(token_ids, block_size)
    return _chain(data, block_size * 4, parent, [])


def _chunk_bytes(token_ids: Sequence[int], block_size: int) -> bytes:
    """The full chunks' token ids as bytes: one conversion for the whole prompt (none for an
    array of ids), then slices, and no per-token Python work."""
    num_tokens = len(token_ids) // block_size * block_size
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return token_ids[:num_tokens].tobytes()
    return array("I", token_ids[:num_tokens]).tobytes()


def _chain(data: bytes, step: int, parent: int, keys: list[RequestChunkKey]) -> list[RequestChunkKey]:
    """`keys` extended with the keys of `data`'s chunks of `step` bytes, chained from `parent`."""
    append, digest = cast(list[int], keys).append, xxhash.xxh3_64_intdigest  # 16k tokens: 1,024 steps
    for offset in range(0, len(data), step):
        parent = digest(data[offset : offset + step], parent)
        append(parent)  # no call per key: `RequestChunkKey(x)` is one
    return keys


class RecentChains:
    """`chunk_keys` for prompts that extend a recent one: a conversation's next turn, an agent's
    next step, a shared system prompt. The keys of the chunks a prompt shares with the last one
    that began with the same chunk are taken from it (one `memcmp` of their token bytes), and
    only the rest is hashed. Holds the token bytes and keys of the most recently keyed prompts,
    `max_bytes` of them (at block 16, a key and its int take ~40 B for 64 B of tokens). The list
    of keys it returns is the one it holds: read only."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self._max_bytes = max_bytes
        self._num_bytes = 0
        # (first key, block size) -> (token bytes, keys), least recently keyed first.
        self._recent: dict[tuple[int, int], tuple[bytes, list[RequestChunkKey]]] = {}

    @property
    def num_bytes(self) -> int:
        """What the prompts held take, as counted against `max_bytes`."""
        return self._num_bytes

    def chunk_keys(self, token_ids: Sequence[int], block_size: int, parent: int) -> list[RequestChunkKey]:
        data = _chunk_bytes(token_ids, block_size)
        step = block_size * 4
        if not data:
            return []
        first = xxhash.xxh3_64_intdigest(data[:step], parent)
        name = (first, block_size)
        earlier = self._recent.pop(name, None)
        if earlier is None:
            keys = _chain(data, step, parent, [])
        else:
            self._num_bytes -= _cost(earlier[0])
            num_shared = _num_shared_chunks(earlier[0], data, step)
            keys = _chain(data[num_shared * step :], step, earlier[1][num_shared - 1], earlier[1][:num_shared])
        self._recent[name] = (data, keys)
        self._num_bytes += _cost(data)
        while self._num_bytes > self._max_bytes and self._recent:
            oldest = next(iter(self._recent))
            self._num_bytes -= _cost(self._recent.pop(oldest)[0])
        return keys


def _cost(data: bytes) -> int:
    return 2 * len(data)  # the token bytes and their keys


def _num_shared_chunks(earlier: bytes, data: bytes, step: int) -> int:
    """How many leading chunks of `step` bytes `earlier` and `data` have in common (both share
    their first): all of `earlier`'s in the usual case, else found by halving (C compares)."""
    if data.startswith(earlier):
        return len(earlier) // step
    low, high = 1, min(len(earlier), len(data)) // step  # low chunks are shared; high may be
    while low < high:
        middle = (low + high + 1) // 2
        end = middle * step
        if data[:end] == earlier[:end]:
            low = middle
        else:
            high = middle - 1
    return low
