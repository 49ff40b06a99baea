"""Encode rendered prompts from cached pieces, exactly.

A chat template puts special tokens between messages (`<|start_header_id|>`, `<|eot_id|>`,
`<|im_start|>`, ...), and a Hugging Face tokenizer splits its input on added tokens before
anything else: the text between two special tokens is normalized, pre-tokenized and
BPE-encoded on its own. So the token ids of a rendered chat are the concatenation, piece by
piece, of the ids of each special token and of each text between them, and the pieces a
conversation repeats (the system prompt, the tools, every earlier turn) need encoding once.

That equality has conditions: no special token strips the whitespace around it (`lstrip`,
`rstrip`, `single_word`) or is matched after normalization, and the tokenizer treats every
piece as it treats the whole (a SentencePiece "prepend ▁ to the first piece only" does not).
`PieceEncoder.for_tokenizer` checks the flags and compares both encodings on probe texts; where
either fails it returns None and the caller encodes whole prompts.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, cast

from gateway.tokenization.head import HeadEncoder
from gateway.tokenization.segments import InThread, SegmentEncoder

# Pieces shorter than this are kept apart, in a small table that is emptied when full: most
# are a template's own text between its special tokens ("user", "assistant", "\n\n"), the
# same in every request (~3 µs each to encode, six a turn), and the others short messages
# that would crowd the long pieces out of their cache.
MIN_CACHED_CHARS = 64
MAX_SHORT_PIECES = 4096


class PieceEncoder:
    def __init__(
        self, backend: Any, specials: dict[str, int], *, max_cached_tokens: int = 4_000_000,
        segments: SegmentEncoder | None = None,
    ) -> None:  # fmt: skip
        self._backend = backend  # a `tokenizers.Tokenizer`
        # Where exact (gateway.tokenization.segments), a piece's text is encoded from cached words.
        self._segments = segments
        self._specials = specials
        # Longest first, so a special token that contains another one wins.
        names = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")").split
        self._cache: OrderedDict[str, array[int]] = OrderedDict()
        self._short: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._cached_tokens = 0
        self._max_cached_tokens = max_cached_tokens
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_tokenizer(cls, hf_tokenizer: Any, probes: Iterable[str], **kwargs: Any) -> PieceEncoder | None:
        """An encoder for this tokenizer, or None where piecewise encoding is not exact."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer: no pieces, no Rust backend
            return None
        specials: dict[str, int] = {}
        for token_id, token in backend.get_added_tokens_decoder().items():
            if not token.special:
                continue
            if token.lstrip or token.rstrip or token.single_word or token.normalized:
                return None
            specials[token.content] = token_id
        if not specials:
            return None
        encoder = cls(backend, specials, **kwargs)
        for text in probes:
            if encoder.encode(text) != backend.encode(text, add_special_tokens=False).ids:
                return None
        encoder._cache.clear()
        encoder._short.clear()
        encoder._cached_tokens = encoder.hits = encoder.misses = 0
        return encoder

    def encode(self, text: str) -> list[int]:
        """The ids `backend.encode(text, add_special_tokens=False)` gives."""
        return self.encode_pieces(self.split(text)).tolist()

    def split(self, text: str) -> list[str]:
        """The special tokens of `text` and the texts between them, in order."""
        return [piece for piece in self._split(text) if piece]

    def uncached_chars(self, pieces: list[str]) -> int:
        """How much text encoding `pieces` would have to encode: the caller's estimate of
        whether that is worth a worker thread."""
        cache = self._cache
        return sum(len(p) for p in pieces if len(p) >= MIN_CACHED_CHARS and p not in cache)

    def encode_pieces(self, pieces: list[str]) -> array[int]:
        """An array, not a list: a long conversation is mostly cached pieces, which an array
        joins by copying memory (a list makes an object per token: 0.2 ms for 21k tokens),
        and chunk hashing reads its bytes as they are."""
        return self._join(pieces, self._encode_missing(pieces))

    async def encode_pieces_async(self, pieces: list[str], in_thread: InThread) -> array[int]:
        """As `encode_pieces`, for the event loop, when much of the text is new: the new
        pieces encoded from cached words a slice at a time (`SegmentEncoder.encode_async`),
        or, where words are not exact, by the tokenizer in a worker thread."""
        segments = self._segments
        if segments is None:
            return cast("array[int]", await in_thread(partial(self.encode_pieces, pieces)))
        fresh = {piece: await segments.encode_async(piece, in_thread) for piece in self._missing(pieces)}
        self._keep(fresh)
        return self._join(pieces, fresh)

    def _join(self, pieces: list[str], fresh: dict[str, array[int]]) -> array[int]:
        specials = self._specials
        ids = array("I")
        for piece in pieces:
            special = specials.get(piece)
            if special is not None:
                ids.append(special)
            elif len(piece) < MIN_CACHED_CHARS:
                ids.extend(self._short_ids(piece))
            else:
                found = fresh.get(piece)
                ids.extend(found if found is not None else self._cached(piece))
        return ids

    def encode_head(self, pieces: list[str], head: HeadEncoder) -> tuple[list[int], int] | None:
        """The exact leading ids of `pieces` up to about `head.head_chars` of text not cached
        yet (the head of a long new piece, or short new pieces whole), and about how many
        characters they stand for. None when the prompt has less new text than that: encoding
        it all costs little."""
        if self.uncached_chars(pieces) < head.head_chars:
            return None  # checked first: a conversation's next short turn must cost nothing here
        specials = self._specials
        ids: list[int] = []
        num_chars = new_chars = 0
        for piece in pieces:
            special = specials.get(piece)
            if special is not None:
                ids.append(special)
            elif len(piece) < MIN_CACHED_CHARS:
                ids.extend(self._short_ids(piece))
            else:
                with self._lock:
                    found = self._cache.get(piece)
                if found is not None:
                    ids.extend(found)
                else:
                    head_ids = head.head_ids(piece, add_special_tokens=False)
                    if head_ids is not None:
                        ids.extend(head_ids)
                        return ids, num_chars + head.head_chars
                    ids.extend(self._encode_one(piece))
                    new_chars += len(piece)
                    if new_chars >= head.head_chars:
                        return ids, num_chars + len(piece)
            num_chars += len(piece)
        return None

    def _encode_missing(self, pieces: list[str]) -> dict[str, array[int]]:
        """Encode the long pieces not cached yet: from cached words where that is exact (the
        words never seen go to the tokenizer in one batch), else in one `encode_batch` call.
        Either way the tokenizer runs in `encode_batch`, which releases the GIL (plain `encode`
        does not, measured: a worker thread running it stalled the event loop for whole
        encodes)."""
        missing = self._missing(pieces)
        if not missing:
            return {}
        segments = self._segments
        if segments is not None:
            fresh = {piece: segments.encode(piece) for piece in missing}
        else:
            encodings = self._backend.encode_batch(missing, add_special_tokens=False)
            fresh = {piece: array("I", encoding.ids) for piece, encoding in zip(missing, encodings)}
        self._keep(fresh)
        return fresh

    def _missing(self, pieces: list[str]) -> list[str]:
        """The long pieces not cached, each once."""
        with self._lock:
            return list(dict.fromkeys(
                p for p in pieces if len(p) >= MIN_CACHED_CHARS and p not in self._specials and p not in self._cache
            ))  # fmt: skip

    def _keep(self, fresh: dict[str, array[int]]) -> None:
        if not fresh:
            return
        with self._lock:
            self.misses += len(fresh)
            for piece, encoded in fresh.items():
                if piece not in self._cache:
                    self._cache[piece] = encoded
                    self._cached_tokens += len(encoded)
            while self._cached_tokens > self._max_cached_tokens and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_tokens -= len(evicted)

    def _short_ids(self, piece: str) -> list[int]:
        found = self._short.get(piece)
        if found is None:
            found = list(self._encode_one(piece))
            if len(self._short) >= MAX_SHORT_PIECES:
                self._short.clear()  # a dict's get and set hold the GIL: no lock needed
            self._short[piece] = found
        return found

    def _cached(self, piece: str) -> array[int]:
        with self._lock:
            found = self._cache.get(piece)
            if found is not None:
                self._cache.move_to_end(piece)
                self.hits += 1
                return found
        # Evicted since `_encode_missing` looked (a cache smaller than one prompt): encode again.
        return array("I", self._encode_one(piece))

    def _encode_one(self, piece: str) -> Sequence[int]:
        if self._segments is not None:
            return self._segments.encode(piece)
        ids: list[int] = self._backend.encode(piece, add_special_tokens=False).ids
        return ids
