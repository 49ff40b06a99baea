"""Chats encoded from cached pieces give exactly the ids of encoding the whole text, and the
encoder refuses tokenizers for which that would not hold."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from gateway.tokenization.pieces import MAX_SHORT_PIECES, PieceEncoder
from gateway.tokenization.prompt import ChatPrompt
from gateway.tokenization.tokenizer import HFPromptTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> HFPromptTokenizer:
    return HFPromptTokenizer(tiny_model_dir)


def words(rng: random.Random, n: int) -> str:
    parts = ["ka", "lo", " ", "\n", "\n\n", "\t", "  ", "漢", "🚀", "é", "42", ".", ",", "<|", "|>", "eot"]
    return "".join(rng.choice(parts) for _ in range(n))


def test_growing_conversations_equal_whole_text_encoding(tokenizer: HFPromptTokenizer) -> None:
    pieces = tokenizer.piece_cache
    assert pieces is not None  # the tiny model's Llama-3-style template splits on special tokens
    rng = random.Random(7)
    system = words(rng, 600)
    for conversation in range(5):
        messages = [{"role": "system", "content": system}]
        for turn in range(6):
            messages.append({"role": "user", "content": words(rng, rng.randint(0, 200))})
            prompt = ChatPrompt(messages=list(messages), add_generation_prompt=rng.random() < 0.8)
            whole = tokenizer._tokenizer.encode(tokenizer._render(prompt), add_special_tokens=False)
            assert tokenizer.encode(prompt) == whole
            messages.append({"role": "assistant", "content": words(rng, rng.randint(0, 120))})
    assert pieces.hits > 50  # the system prompt and every earlier turn came from the cache


def test_chats_encoded_on_the_event_loop_equal_whole_text_encoding(tiny_model_dir: Path) -> None:
    """`encode_pieces_async`: new pieces from cached words a slice at a time on the loop, the
    words never seen in a worker thread when a slice has many; the ids are the same."""
    tokenizer = HFPromptTokenizer(tiny_model_dir)
    pieces = tokenizer.piece_cache
    assert pieces is not None
    rng = random.Random(8)
    num_in_thread = 0

    async def in_thread(work: Callable[[], object]) -> object:
        nonlocal num_in_thread
        num_in_thread += 1
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def scenario() -> None:
        for conversation in range(4):
            # Long (several slices), and of words mostly never seen: some go to the thread.
            system = " ".join(f"w{rng.randrange(10**6)}{words(rng, 3)}" for _ in range(rng.randint(100, 2500)))
            messages = [{"role": "system", "content": system}]
            for turn in range(3):
                messages.append({"role": "user", "content": words(rng, rng.randint(0, 300))})
                prompt = ChatPrompt(messages=list(messages), add_generation_prompt=True)
                text = tokenizer._render(prompt)
                whole = tokenizer._tokenizer.encode(text, add_special_tokens=False)
                assert (await pieces.encode_pieces_async(pieces.split(text), in_thread)).tolist() == whole
                messages.append({"role": "assistant", "content": words(rng, rng.randint(0, 120))})

    asyncio.run(scenario())
    assert num_in_thread > 0
    tokenizer.close()


def test_the_cache_is_bounded_by_tokens(tokenizer: HFPromptTokenizer) -> None:
    encoder = PieceEncoder(tokenizer._tokenizer.backend_tokenizer, {"<|eot_id|>": 4}, max_cached_tokens=500)
    rng = random.Random(1)
    texts = [words(rng, 300) for _ in range(20)]
    for text in texts:
        assert encoder.encode(text + "<|eot_id|>" + text) == tokenizer._tokenizer.encode(
            text + "<|eot_id|>" + text, add_special_tokens=False)  # fmt: skip
    assert encoder._cached_tokens <= 500 or len(encoder._cache) == 1


def test_short_pieces_are_kept_in_a_bounded_table(tokenizer: HFPromptTokenizer) -> None:
    encoder = PieceEncoder(tokenizer._tokenizer.backend_tokenizer, {"<|eot_id|>": 4})
    rng = random.Random(3)
    for _ in range(3 * MAX_SHORT_PIECES // 2):
        text = words(rng, rng.randint(1, 20)) + "<|eot_id|>user<|eot_id|>"  # the pieces all short
        assert encoder.encode(text) == tokenizer._tokenizer.encode(text, add_special_tokens=False)
        assert len(encoder._short) <= MAX_SHORT_PIECES
    assert "user" in encoder._short and not encoder._cache


def toy(special: AddedToken, metaspace: bool = False) -> Tokenizer:
    vocab = {c: i for i, c in enumerate("abcdefghij ▁")}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first") if metaspace else pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens([special])
    return tok


class Wrapped:
    def __init__(self, backend: Tokenizer) -> None:
        self.backend_tokenizer = backend


@pytest.mark.parametrize(
    ("special", "metaspace"),
    [
        (AddedToken("<s>", special=True, lstrip=True, normalized=False), False),  # eats the space before it
        (AddedToken("<s>", special=True, rstrip=True, normalized=False), False),
        (AddedToken("<s>", special=True, normalized=False), True),  # "▁" before the first piece only
    ],
)
def test_tokenizers_where_pieces_are_not_exact_are_refused(special: AddedToken, metaspace: bool) -> None:
    backend = toy(special, metaspace)
    assert PieceEncoder.for_tokenizer(Wrapped(backend), ["ab <s> cd<s>e f"]) is None


def test_a_plain_special_token_splits_exactly() -> None:
    backend = toy(AddedToken("<s>", special=True, normalized=False))
    encoder = PieceEncoder.for_tokenizer(Wrapped(backend), ["ab <s> cd<s>e f"])
    assert encoder is not None
    text = "abc de<s>" * 30 + "j" * 70
    assert encoder.encode(text) == backend.encode(text, add_special_tokens=False).ids
