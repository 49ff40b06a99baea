"""The prompts routed lately, with their token ids: what a joining engine is warmed with and a
drained engine hands over (gateway.elastic.warmup).

The index knows which engines hold a chunk, by key; moving KV needs the prefix's token ids,
which only the request had. So the prefix service notes each fully tokenized prompt here: its
whole chunks (the part an engine caches and can give away), keyed by its last chunk key, with
a use count that halves every `half_life_s` (recent use weighs most); `hottest` ranks them by
their chunks' uses. Bounded: the
`max_prefixes` most recently used prompts, each by its first `max_tokens` tokens.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.types import RequestChunkKey


@dataclass(slots=True)
class HotPrefix:
    model: str
    # Whole chunks only: len(token_ids) == len(chunk_keys) * block size.
    token_ids: array[int]
    chunk_keys: tuple[RequestChunkKey, ...]
    uses: float  # decayed use count, as of `last_used`
    last_used: float

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class HotPrefixes:
    def __init__(self, *, max_prefixes: int, max_tokens: int, half_life_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._max_prefixes = max_prefixes
        self._max_tokens = max_tokens
        self._half_life_s = half_life_s
        self._clock = clock
        # Least recently used first: eviction pops from the front.
        self._prefixes: OrderedDict[tuple[str, RequestChunkKey], HotPrefix] = OrderedDict()

    def configure(self, *, max_prefixes: int, max_tokens: int, half_life_s: float) -> None:
        """A reload: new bounds apply from the next note (what is kept stays, but no more)."""
        self._max_prefixes, self._max_tokens, self._half_life_s = max_prefixes, max_tokens, half_life_s
        self._trim()

    def __len__(self) -> int:
        return len(self._prefixes)

    def note(self, model: str, token_ids: Sequence[int], chunk_keys: Sequence[RequestChunkKey], block_size: int) -> None:
        """One use of a prompt. `token_ids` must be the whole prompt (a head tokenized alone is
        no prefix of anything known) and `chunk_keys` its chained keys, one per `block_size`."""
        num_chunks = min(len(chunk_keys), self._max_tokens // block_size, len(token_ids) // block_size)
        if num_chunks == 0:
            return
        now = self._clock()
        key = (model, chunk_keys[num_chunks - 1])
        hot = self._prefixes.get(key)
        if hot is None:
            ids = token_ids[: num_chunks * block_size]
            hot = HotPrefix(model, ids if isinstance(ids, array) else array("I", ids),
                            tuple(chunk_keys[:num_chunks]), 0.0, now)  # fmt: skip
            self._prefixes[key] = hot
        else:
            self._prefixes.move_to_end(key)
        hot.uses = self._decayed(hot, now) + 1.0
        hot.last_used = now
        self._trim()

    def hottest(self, model: str | None = None, limit: int | None = None) -> list[HotPrefix]:
        """The remembered prompts (of `model`, or all), hottest first: by the recent uses of
        each of their chunks, summed. A chunk is used by every prompt that contains it, so a
        system prompt shared by many requests (each its own prompt here, used once) outranks
        a prompt sent twice. O(chunks remembered): for joins and drains, not per request."""
        now = self._clock()
        found = [h for h in self._prefixes.values() if model is None or h.model == model]
        chunk_uses: dict[tuple[str, RequestChunkKey], float] = {}
        for hot in found:
            uses = self._decayed(hot, now)
            for key in hot.chunk_keys:
                chunk_uses[hot.model, key] = chunk_uses.get((hot.model, key), 0.0) + uses
        heat = {id(h): sum(chunk_uses[h.model, key] for key in h.chunk_keys) for h in found}
        found.sort(key=lambda h: heat[id(h)], reverse=True)
        return found if limit is None else found[:limit]

    def hotness(self, prefix: HotPrefix) -> float:
        return self._decayed(prefix, self._clock())

    def _decayed(self, hot: HotPrefix, now: float) -> float:
        return hot.uses * math.exp2(-(now - hot.last_used) / self._half_life_s)

    def _trim(self) -> None:
        while len(self._prefixes) > self._max_prefixes:
            self._prefixes.popitem(last=False)
