"""The exact first token ids of a long text, without encoding all of it.

Chunk keys are chained: once one chunk of a prompt is held by no engine, none after it can be,
so the index lookup never needs the rest. A prompt whose start is new (a fresh system prompt,
a new document after a known one) therefore needs only its head tokenized to be routed; the
tail, often most of a long prompt, is left to the engine.

A head is exact where the tokenizer is local: it pre-tokenizes on whitespace-delimited
boundaries (byte-level or Metaspace BPE, regex splits), so the tokens of a text cut at a word
boundary equal the full text's tokens up to a word before the cut. `HeadEncoder.for_tokenizer`
checks that on probe texts at every cut; a tokenizer where it fails gets no head encoder, and
its prompts are encoded whole. (The prompt service also compares some heads with the full
encoding while serving, and turns heads off at the first difference.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.tokenization.segments import SegmentEncoder

_WHITESPACE = frozenset(" \t\n\r\f\v")


class HeadEncoder:
    def __init__(self, backend: Any, head_chars: int, segments: SegmentEncoder | None = None) -> None:
        self._backend = backend  # a `tokenizers.Tokenizer`
        self.head_chars = head_chars
        # Where exact, a head is the first whole words' cached ids (no encode, no offsets).
        self._segments = segments

    @classmethod
    def for_tokenizer(
        cls, backend: Any, probes: Iterable[str], head_chars: int, segments: SegmentEncoder | None = None
    ) -> HeadEncoder | None:
        """An encoder whose heads equal the full encoding on every probe, cut anywhere."""
        encoder = cls(backend, head_chars, segments)
        for text in probes:
            for special in (False, True):
                whole = backend.encode(text, add_special_tokens=special).ids
                for cut in range(8, len(text), 7):
                    head = encoder._head(text, cut, special)
                    if head is not None and whole[: len(head)] != head:
                        return None
        return encoder

    def head_ids(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """The first token ids of `text` (at least a few hundred tokens' worth of text, up to
        `head_chars`), exactly as encoding all of `text` starts; None when `text` is short
        enough to encode whole, or offers no word boundary to cut at."""
        if len(text) < 2 * self.head_chars:
            return None
        if self._segments is not None and not add_special_tokens:
            found = self._segments.head(text, self.head_chars)
            if found is not None:
                return found[0].tolist()
        return self._head(text, self.head_chars, add_special_tokens)

    def _head(self, text: str, limit: int, add_special_tokens: bool) -> list[int] | None:
        # Cut at the last word end before `limit`, then keep only the tokens that end by the
        # word end before it. A cut inside a run of whitespace would change how the run splits
        # (GPT-2's `\s+(?!\S)` looks ahead), and punctuation may take the newlines after it
        # (Llama 3's `[^\s\p{L}\p{N}]+[\r\n]*`): the last word before the cut is not trusted.
        cut = _word_end_before(text, limit)
        safe = _word_end_before(text, cut)
        if safe <= 0:
            return None
        encoding = self._backend.encode(text[:cut], add_special_tokens=add_special_tokens)
        ids: list[int] = encoding.ids
        specials: list[int] = encoding.special_tokens_mask
        offsets: list[tuple[int, int]] = encoding.offsets
        kept = 0
        # Leading special tokens (BOS) are the whole text's too; a trailing one (EOS) is not.
        while kept < len(ids) and specials[kept]:
            kept += 1
        while kept < len(ids) and not specials[kept] and offsets[kept][1] <= safe:
            kept += 1
        return ids[:kept]


def _word_end_before(text: str, position: int) -> int:
    """The last index before `position` where whitespace follows a non-whitespace character;
    -1 when there is none."""
    i = min(position, len(text)) - 1
    while i > 0:
        if text[i] in _WHITESPACE and text[i - 1] not in _WHITESPACE:
            return i
        i -= 1
    return -1
