"""Prompt → token ids, exactly as the engine will compute them, with the model's own files.

`HFPromptTokenizer` loads the model's Hugging Face tokenizer and chat template (a local
directory or a Hugging Face model id) and mirrors vLLM's preprocessing: chat requests are
rendered with the template (tools, generation prompt, template kwargs) to text and encoded
without adding special tokens (the template has them); completion prompts are encoded with
special tokens. Long prompts are tokenized in a worker thread so the event loop keeps serving
other requests (measured in bench/tokenize_latency.py). The gateway checks its output against
the engines' own `/tokenize` before trusting it (gateway.tokenization.models).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.tokenization.head import HeadEncoder
from gateway.tokenization.pieces import PieceEncoder
from gateway.tokenization.prompt import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    ChatPrompt,
    Prompt,
    TextPrompt,
    TokenPrompt,
    prompt_of,
)
from gateway.tokenization.segments import SegmentEncoder

logger = logging.getLogger(__name__)

__all__ = ["CHAT_PATH", "COMPLETIONS_PATH", "HFPromptTokenizer", "PromptTokenizer", "TokenizationFailed"]


class TokenizationFailed(Exception):
    """A prompt the tokenizer could not turn into token ids (the message says why)."""


# Given the exact head of a long prompt: whether it is enough (the prompt's chunk keys broke in
# the index within it, so the rest cannot match anywhere).
HeadIsEnough = Callable[[Sequence[int]], bool]


@dataclass(frozen=True, slots=True)
class PromptTokens:
    ids: Sequence[int]
    # The whole prompt's length in tokens: len(ids), or, when `ids` is only the prompt's exact
    # head (`complete` False), an estimate from the head's tokens per character.
    num_tokens: int
    complete: bool = True


class PromptTokenizer(Protocol):
    async def token_ids(self, model: str, api_path: str, body: dict[str, Any]) -> list[int] | None:
        """Token ids of the prompt; None when the request has no routable prompt.
        Raises TokenizationFailed when it has one that could not be tokenized."""
        ...

    async def prompt_tokens(
        self, model: str, api_path: str, body: dict[str, Any], enough: HeadIsEnough | None = None
    ) -> PromptTokens | None:
        """As `token_ids`; a tokenizer that can cut exact heads (gateway.tokenization.head)
        encodes only the head of a long prompt whose start is new when `enough` says so."""
        ...


_LOAD_LOCK = threading.Lock()


class HFPromptTokenizer:
    def __init__(
        self,
        source: str | Path,
        *,
        local_files_only: bool = False,
        executor: Executor | None = None,
        offload_min_chars: int = 2048,
        head_chars: int = 256,
    ) -> None:
        self.source = str(source)
        # transformers imports its modules lazily, and two threads doing it at once can fail
        # ("cannot import name 'AutoTokenizer'"): models load in threads, one at a time.
        _encode_in_the_calling_thread()
        with _LOAD_LOCK:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.source, local_files_only=local_files_only)
        self._executor = executor or ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        # Work no request waits for (whole encodings behind heads) runs at the lowest CPU
        # priority: on idle cycles, never in the way of requests.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-idle", initializer=_lowest_priority)
        self._offload_min_chars = offload_min_chars
        # The Rust tokenizer called directly where it gives what transformers' wrapper gives
        # (it costs a third to a half as much), and chats encoded from cached pieces, their
        # texts from cached words, where that is exact (gateway.tokenization.pieces, .segments).
        self._backend = _same_as_wrapper(self._tokenizer)
        segments = SegmentEncoder.for_tokenizer(self._backend, _SEGMENT_PROBES) if self._backend else None
        self._segments = segments
        self._pieces = (
            PieceEncoder.for_tokenizer(self._tokenizer, self._probe_texts(), segments=segments)
            if self._backend else None
        )  # fmt: skip
        self._heads = (
            HeadEncoder.for_tokenizer(self._backend, [_PROBE_TEXT * 4, _PROBE_CODE], head_chars, segments)
            if self._backend is not None and head_chars > 0 else None
        )  # fmt: skip
        self._num_heads = 0
        self._num_sampled = 0
        self._backlog_lock = threading.Lock()
        self._backlog_chars = 0  # text submitted to `_background`, not encoded yet

    def _probe_texts(self) -> list[str]:
        texts = [_PROBE_TEXT]
        try:
            texts.append(self._render(_PROBE_CHAT))
        except Exception:  # a template that needs more than plain messages: text probes only
            pass
        return texts

    async def token_ids(self, model: str, api_path: str, body: dict[str, Any]) -> list[int] | None:
        tokens = await self.prompt_tokens(model, api_path, body)
        return None if tokens is None else list(tokens.ids)

    async def prompt_tokens(
        self, model: str, api_path: str, body: dict[str, Any], enough: HeadIsEnough | None = None
    ) -> PromptTokens | None:
        """Encoded on the event loop when little is new (a cached conversation costs well under
        a millisecond), in a worker thread when much is: the Rust tokenizer's batch encode
        releases the GIL, so the loop keeps serving meanwhile. With `enough`, a long prompt
        whose new text `enough` finds unknown to the index is encoded only as far as its head."""
        prompt = prompt_of(api_path, body)
        if prompt is None:
            return None
        pieces = self._pieces
        heads = self._heads if enough is not None else None
        if isinstance(prompt, ChatPrompt) and pieces is not None and not prompt.add_special_tokens:
            try:
                split = pieces.split(self._render(prompt))
            except Exception as exc:
                raise TokenizationFailed(f"{type(exc).__name__}: {exc}") from None
            if heads is not None and enough is not None:
                found = pieces.encode_head(split, heads)
                if found is not None and enough(found[0]):
                    return self._head(found[0], found[1], split, False, lambda: pieces.encode_pieces(split))
            if pieces.uncached_chars(split) < self._offload_min_chars:
                ids = pieces.encode_pieces(split)
            else:
                ids = await pieces.encode_pieces_async(split, self._in_worker_thread)
            self._sample(split, False, ids)
            return _whole(ids)
        if isinstance(prompt, TextPrompt) and heads is not None and enough is not None:
            text = prompt.text
            head_ids = heads.head_ids(text, add_special_tokens=True)
            if head_ids is not None and enough(head_ids):
                return self._head(head_ids, heads.head_chars, [text], True, None)
        if _prompt_chars(prompt) < self._offload_min_chars:
            whole = self.encode(prompt)
        else:
            whole = await asyncio.get_running_loop().run_in_executor(self._executor, self.encode, prompt)
        if isinstance(prompt, TextPrompt) and self._segments is not None:
            self._sample([prompt.text], True, whole)
        return _whole(whole)

    def _head(
        self, head_ids: list[int], head_chars: int, parts: list[str], add_special_tokens: bool,
        warm_up: Callable[[], object] | None,
    ) -> PromptTokens:  # fmt: skip
        """`head_ids` stands for the prompt, the text `parts` joined. A chat's `warm_up`
        (encoding all its pieces, which caches them for the conversation's next turn: it will
        match beyond this head) runs on idle cycles; one head in `_CHECK_EVERY` is checked
        against the tokenizer's own encoding."""
        self._num_heads += 1
        num_chars = sum(map(len, parts))
        if warm_up is not None and self._reserve_backlog(num_chars):
            self._in_background(num_chars, warm_up)
        if self._num_heads % _CHECK_EVERY == 1:
            self._check_later(parts, add_special_tokens, head_ids, complete=False)
        estimate = max(len(head_ids) + 1, round(len(head_ids) * num_chars / max(head_chars, 1)))
        return PromptTokens(head_ids, estimate, complete=False)

    def _reserve_backlog(self, num_chars: int) -> bool:
        """Room for `num_chars` more of background encoding. Warm-ups run on idle cycles: when
        more new text arrives than those encode (cold 16k-token chats back to back), they are
        skipped rather than queued without end."""
        with self._backlog_lock:
            if self._backlog_chars + num_chars > _MAX_BACKLOG_CHARS:
                return False
            self._backlog_chars += num_chars
            return True

    async def _in_worker_thread(self, work: Callable[[], object]) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _in_background(self, num_chars: int, work: Callable[[], object]) -> None:
        def release(_: object) -> None:
            with self._backlog_lock:
                self._backlog_chars -= num_chars

        self._background.submit(work).add_done_callback(release)

    def _sample(self, parts: list[str], add_special_tokens: bool, ids: Sequence[int]) -> None:
        """One encoding in `_CHECK_EVERY` made from cached pieces or words is checked."""
        self._num_sampled += 1
        if self._num_sampled % _CHECK_EVERY == 1:
            self._check_later(parts, add_special_tokens, ids, complete=True)

    def _check_later(self, parts: list[str], add_special_tokens: bool, ids: Sequence[int], *, complete: bool) -> None:
        """Compare `ids` (all of the encoding of the text `parts` joined, or its start) with the
        tokenizer's own encoding of that text, on idle cycles (joined only then)."""
        text = "".join(parts)
        if self._reserve_backlog(len(text)):
            self._in_background(len(text), lambda: self._verify(ids, self._encode_plain(text, add_special_tokens),
                                                                complete))  # fmt: skip

    def _verify(self, ids: Sequence[int], whole: Sequence[int], complete: bool) -> None:
        """At a difference, pieces, words and heads are turned off: prompts are encoded whole."""
        if list(whole[: len(ids)]) == list(ids) and (not complete or len(whole) == len(ids)):
            return
        self._pieces = None
        self._heads = None
        self._segments = None
        logger.warning("tokenizer %s: a prompt encoded from cached pieces, words or its head differs from its "
                       "encoding whole; prompts are encoded whole from now on", self.source)  # fmt: skip

    def token_ids_sync(self, api_path: str, body: dict[str, Any]) -> list[int] | None:
        prompt = prompt_of(api_path, body)
        return None if prompt is None else self.encode(prompt)

    def encode(self, prompt: Prompt) -> list[int]:
        try:
            if isinstance(prompt, ChatPrompt):
                text = self._render(prompt)
                if self._pieces is not None and not prompt.add_special_tokens:
                    return self._pieces.encode(text)
                return self._encode(text, prompt.add_special_tokens)
            if isinstance(prompt, TextPrompt):
                return self._encode(prompt.text, True)
            return list(prompt.token_ids)
        except Exception as exc:  # a prompt the template or tokenizer rejects
            raise TokenizationFailed(f"{type(exc).__name__}: {exc}") from None

    def _render(self, prompt: ChatPrompt) -> str:
        text = self._tokenizer.apply_chat_template(
            prompt.messages,
            tools=prompt.tools,
            add_generation_prompt=prompt.add_generation_prompt,
            continue_final_message=prompt.continue_final_message,
            tokenize=False,
            **prompt.chat_template_kwargs,
        )
        return str(text)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        segments = self._segments
        if segments is not None:
            return segments.encode(text, add_special_tokens).tolist()
        return self._encode_plain(text, add_special_tokens)

    def _encode_plain(self, text: str, add_special_tokens: bool) -> list[int]:
        """The tokenizer's own encoding, nothing cached."""
        if self._backend is not None:
            # encode_batch, not encode: it releases the GIL when this runs in a worker thread.
            return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    @property
    def piece_cache(self) -> PieceEncoder | None:
        return self._pieces

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)


# One prompt in this many encoded from pieces, and one head in this many, is checked against
# the tokenizer's own encoding (on idle cycles).
_CHECK_EVERY = 64
# Text waiting for a background encode, at most (~70 16k-token chats; ~1 s of encoding for
# the test model's tokenizer at ~0.24 µs per character). The thread takes idle cycles only
# (SCHED_IDLE), so a longer queue costs no request time; a conversation whose first turn was
# skipped pays a whole encode at its next turn instead. At 256 KiB, bench.overhead's 16k
# follow-ups (25 conversations' first turns sent back to back) had p99 14-15 ms added, at
# 4 MiB 1.9-2.6 ms; p50s and the open loop unchanged (two runs each, alternated).
_MAX_BACKLOG_CHARS = 4 * 1024 * 1024


def _encode_in_the_calling_thread() -> None:
    """The Rust tokenizer's batch encode runs in its own thread pool unless told not to
    (TOKENIZERS_PARALLELISM, read at each call). Those threads run at normal priority, so a
    background encode (`_head`'s warm-up, meant for idle cycles) took the core from the
    request it ran beside: +1.0 ms added latency on a cold 2k-token chat, measured with
    bench.overhead on one core. Encoding in the calling thread keeps its priority; the
    gateway uses more cores with more workers (server.workers), not with a pool per encode.
    A value the user set is kept."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _lowest_priority() -> None:
    """The calling thread on idle cycles only: Linux's SCHED_IDLE, which any other thread that
    wakes preempts at once. At nice 19 (the fallback) the event loop, which wakes for every
    request, still waited behind it (the scheduler lets a running thread use up its slice):
    bench.overhead --quick, 2k chats at 200 req/s on one core, p99 9.5-10.3 ms at nice 19
    against 5.5-6.3 ms with SCHED_IDLE (two runs each, alternated). Linux schedules threads
    apart; elsewhere a no-op."""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, thread, 19)
    except (AttributeError, OSError):
        pass


def _whole(ids: Sequence[int]) -> PromptTokens:
    return PromptTokens(ids, len(ids))


_PROBE_CODE = (
    "def main(argv):\n    for i in range(10):\n        print(f'{i:>4}  {argv!r}')  # done\n\n\n"
    "    return {'a': [1, 2, 3], \"b\": None}\r\n\t\tend   of   line   \n" * 3
)
_PROBE_TEXT = " Hello, world!\n\n\tTabs,  double  spaces, Ünïcödé 漢字 🚀 and 1234567 digits. "
_PROBE_CHAT = ChatPrompt(messages=[
    {"role": "system", "content": "You are terse." + _PROBE_TEXT * 2},
    {"role": "user", "content": "  Why?\n"},
    {"role": "assistant", "content": "Because.\n\n"},
    {"role": "user", "content": _PROBE_TEXT},
])  # fmt: skip
# Where a pre-tokenizer could join a word to the space before it: after punctuation, digits,
# contractions, other scripts and other whitespace, and spaces at either end.
_SEGMENT_PROBES = [
    _PROBE_TEXT * 3,
    _PROBE_CODE,
    " x  y   z \t w\n v \r\n u\u00a0t \u3000s ½ 2 3.5 -1 'll 's don't I'M   you've  ?!  …  ",
    "a.b, c; d: (e) [f] {g} \"h\" 'i' <j> k/l m\\n o|p q_r s-t u+v 12 345 6789 x 漢字 かな 🚀🚀 é ß ",
]


def _same_as_wrapper(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend, if it encodes the probes as transformers' wrapper does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    for text in (_PROBE_TEXT, "x", " <|fake|> text\n"):
        for special in (False, True):
            if backend.encode(text, add_special_tokens=special).ids != tokenizer.encode(text, add_special_tokens=special):
                return None
    return backend


def _prompt_chars(prompt: Prompt) -> int:
    """A cheap size estimate that decides inline vs worker-thread tokenization."""
    if isinstance(prompt, TextPrompt):
        return len(prompt.text)
    if isinstance(prompt, TokenPrompt):
        return 0
    total = 0
    for message in prompt.messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total
