"""Encode text from cached words, exactly, for a fraction of the tokenizer's cost.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2 and their kin) cut the text into
pre-tokens with a regex before BPE, and BPE never merges across pre-tokens. In those regexes no
pre-token runs from a non-whitespace character into a space after it: such a space always
starts a new pre-token. A text cut before each of those spaces therefore encodes as the
concatenation of its segments' encodings, and a segment (a word, with its leading space and
any punctuation or newlines up to the next word) needs encoding once for the whole process.

Why bother: the Rust tokenizer spends most of an encode in its pre-tokenizer (the test model,
8k characters of prose: 4.9 ms of 5.4), while `str.split(" ")`, one dictionary lookup per word
(`map`, in C) and one `bytes.join` cost ~0.3 ms. Only words never seen go to the tokenizer,
in one batch that releases the GIL.

`SegmentEncoder.for_tokenizer` checks the rule on probe texts and returns None where it fails
(a SentencePiece tokenizer that prepends "▁" to its input, a normalizer that joins across
spaces); the prompt tokenizer also compares a sample of encodings with the tokenizer's own
while serving, and stops using segments at the first difference.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

# A space after whitespace (a double space, an indented line) belongs to the whitespace run's
# pre-token: a text with one is cut at `_WORD_SPACE`s (slower), not by `str.split`.
_WORD_SPACE = re.compile(r"(?<=\S) ")
# The whitespace (`str.isspace`, regex `\s`) other than the space, that being rare in text: each
# is looked for alone (a C scan) and only where present with a space after it. A regex search
# for "\s " cost more than the split itself (~13 ns a character against ~2 here, measured).
_ASCII_SPACES = ("\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")
_SPACES = (*_ASCII_SPACES, "\x85", "\xa0", "\u1680", *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029",
           "\u202f", "\u205f", "\u3000")  # fmt: skip
# On the event loop, a long new text is encoded a slice at a time (`encode_async`), the loop
# serving other requests between slices.
SLICE_CHARS = 4096
# Off it (a worker thread, the idle-cycles warm-ups), the GIL is handed back between slices
# of this size: the loop, woken for a request, waits for the rest of one slice (~25 µs), not
# of a whole text (a cold 16k-token chat: ~3 ms). Measured, a loop sleeping 0.2 ms at a time
# beside a thread encoding 16k-token texts, on one core: lateness p90 105-120 µs at 512 chars
# against 190-200 at 4096 (70-130 with no thread); the thread encodes ~15 % fewer texts.
THREAD_SLICE_CHARS = 512

# Distinct words kept (each ~150 bytes with its ids); the table is emptied when full. Natural
# text and code draw most words from a few tens of thousands. A longer "word" (text without
# spaces: CJK, minified data) is encoded each time, not kept.
MAX_CACHED_WORDS = 200_000
MAX_WORD_CHARS = 256
# Words never seen in one slice that `encode_async` encodes in place (a few µs each); more go
# to a worker thread.
MAX_UNSEEN_IN_PLACE = 32

# Runs a function in a worker thread, for the event loop to await.
InThread = Callable[[Callable[[], object]], Awaitable[object]]


def split_words(text: str) -> list[str]:
    """`text` as words with `text == " ".join(words)`, where each joining space is one a
    pre-token starts at (a space after a non-whitespace character)."""
    words = text.split(" ")
    # A space after a space, or at the end: cut where the regex says. (One space at the start
    # gives an empty first word, which encodes as nothing: as good a cut.)
    if words.count("") > (words[0] == ""):
        return _WORD_SPACE.split(text)
    for space in _ASCII_SPACES if text.isascii() else _SPACES:
        if space in text and space + " " in text:
            return _WORD_SPACE.split(text)
    return words


def _slices(text: str, num_chars: int) -> Iterator[str]:
    """`text` in consecutive slices of about `num_chars`, each after the first starting at a
    word's space (so each slice encodes as it does within the text)."""
    start = 0
    while len(text) - start > num_chars:
        found = _WORD_SPACE.search(text, start + num_chars)
        if found is None:
            break
        yield text[start : found.start()]
        start = found.start()
    yield text[start:]


# Gives the GIL to a thread waiting for it (an event loop woken for a request): it is let go
# while the OS is asked to run another thread. Not `time.sleep(0)`: that sleeps, ~60 µs here
# (the timer's slack), at every slice.
_hand_over_the_gil: Callable[[], None] = getattr(os, "sched_yield", partial(time.sleep, 0))


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SegmentEncoder:
    def __init__(self, backend: Any, max_cached_words: int = MAX_CACHED_WORDS) -> None:
        self._backend = backend  # a `tokenizers.Tokenizer`
        # Without offsets, which the segments do not need (a quarter of an encode's cost).
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        # word -> the ids of " " + word, as native uint32 bytes (joined in one call); the first
        # word of a text has no space before it: its own table.
        self._spaced: dict[str, bytes] = {}
        self._first: dict[str, bytes] = {}
        self._max_cached_words = max_cached_words
        # What encoding with special tokens puts around a text (a BOS before, an EOS after),
        # where that is all it adds.
        self._affixes: tuple[list[int], list[int]] | None = None

    @classmethod
    def for_tokenizer(cls, backend: Any, probes: Iterable[str]) -> SegmentEncoder | None:
        """An encoder whose encodings equal the tokenizer's on every probe, or None. A tokenizer
        with an added token that holds a space (runs of spaces as tokens, in some code models)
        or strips the spaces beside it gets None: a cut could fall inside it, or the space it
        would strip start another word."""
        for token in backend.get_added_tokens_decoder().values():
            if " " in token.content or token.lstrip or token.rstrip or token.single_word:
                return None
        encoder = cls(backend)
        for text in probes:
            if encoder.encode(text).tolist() != backend.encode(text, add_special_tokens=False).ids:
                return None
        encoder._affixes = _affixes(backend)
        for text in probes:
            if encoder._affixes is None:
                break
            if encoder.encode(text, add_special_tokens=True).tolist() != backend.encode(text).ids:
                encoder._affixes = None
        encoder._spaced.clear()
        encoder._first.clear()
        return encoder

    def encode(self, text: str, add_special_tokens: bool = False) -> array[int]:
        """The ids `backend.encode(text, add_special_tokens=add_special_tokens)` gives."""
        if not add_special_tokens:
            return self._encode_text(text)
        if self._affixes is None:  # a post-processor that does more than add ids around the text
            return array("I", self._encode_batch([text], add_special_tokens=True)[0].ids)
        before, after = self._affixes
        ids = array("I", before)
        ids.extend(self._encode_text(text))
        ids.extend(after)
        return ids

    def _encode_text(self, text: str) -> array[int]:
        if len(text) <= THREAD_SLICE_CHARS or _on_event_loop():
            return self.encode_words(split_words(text))
        ids = array("I")
        for piece in _slices(text, THREAD_SLICE_CHARS):
            ids.extend(self.encode_words(split_words(piece)))
            _hand_over_the_gil()
        return ids

    async def encode_async(self, text: str, in_thread: InThread) -> array[int]:
        """As `encode` without special tokens, for the event loop: a slice of the text at a
        time, the loop serving other requests between slices (~0.1-0.2 ms each). The words
        looked up here; when a slice has many never seen, the tokenizer encodes them in a
        worker thread (it releases the GIL there). A worker thread for the whole text would
        hold the GIL for all but that, and wait for the loop to give it back at every slice
        (a 5 ms switch interval when the loop is busy)."""
        ids = array("I")
        for num_slices, piece in enumerate(_slices(text, SLICE_CHARS)):
            if num_slices:
                await asyncio.sleep(0)
            words = split_words(piece)
            encoded = self._encode_words(words, MAX_UNSEEN_IN_PLACE)
            if encoded is None:
                await in_thread(partial(self._fill_unseen, words))
                encoded = self.encode_words(words)
            ids.extend(encoded)
        return ids

    def encode_words(self, words: Sequence[str]) -> array[int]:
        ids = self._encode_words(words, None)
        assert ids is not None  # no bound on the words never seen
        return ids

    def _encode_words(self, words: Sequence[str], max_unseen: int | None) -> array[int] | None:
        """The words' ids; None, nothing encoded, when more than `max_unseen` were never seen."""
        rest = words[1:]
        found = list(map(self._spaced.get, rest))
        if None in found:
            unseen = [w for w, f in zip(rest, found) if f is None]
            if max_unseen is not None and len(unseen) > max_unseen:
                return None
            fresh = self._fill(self._spaced, unseen, " ")
            found = [f if f is not None else fresh[w] for w, f in zip(rest, found)]
        first = self._first.get(words[0])
        if first is None:
            first = self._fill(self._first, [words[0]], "")[words[0]]
        ids = array("I", first)
        ids.frombytes(b"".join(found))  # type: ignore[arg-type]  # every None was filled
        return ids

    def _fill_unseen(self, words: Sequence[str]) -> None:
        spaced = self._spaced
        self._fill(spaced, [w for w in words[1:] if w not in spaced], " ")

    def head(self, text: str, max_chars: int) -> tuple[array[int], int] | None:
        """The exact leading ids of `text` standing for at most `max_chars` characters of it,
        and how many characters they stand for; None when no word ends within them."""
        words = split_words(text[: max_chars + 1])[:-1]  # the last one may be cut short
        if not words:
            return None
        return self.encode_words(words), sum(map(len, words)) + len(words) - 1

    def _fill(self, table: dict[str, bytes], words: list[str], space: str) -> dict[str, bytes]:
        missing = list(dict.fromkeys(words))
        encodings = self._encode_batch([space + w for w in missing], add_special_tokens=False)
        fresh = {w: array("I", e.ids).tobytes() for w, e in zip(missing, encodings)}
        kept = {w: ids for w, ids in fresh.items() if len(w) <= MAX_WORD_CHARS}
        if len(table) + len(kept) > self._max_cached_words:
            table.clear()  # a dict's clear and update hold the GIL: no lock needed
        if len(kept) <= self._max_cached_words:
            table.update(kept)
        return fresh


_AFFIX_PROBE = "Hello world, and more."


def _affixes(backend: Any) -> tuple[list[int], list[int]] | None:
    """The ids encoding with special tokens adds before and after a text's own, or None
    where it does something else to them."""
    bare: list[int] = backend.encode(_AFFIX_PROBE, add_special_tokens=False).ids
    full: list[int] = backend.encode(_AFFIX_PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return None
