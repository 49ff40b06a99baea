"""Long prompts whose start is new are tokenized only as far as their head: the head is exactly
the start of the whole encoding, the index lookup is the one the whole prompt would get, and a
tokenizer where heads would not be exact gets none."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.kvindex.base import TIER_GPU, TIER_SPECULATIVE
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.tokenization.head import HeadEncoder
from gateway.tokenization.prompt import ChatPrompt
from gateway.tokenization.tokenizer import COMPLETIONS_PATH, CHAT_PATH, HFPromptTokenizer, PromptTokenizer
from gateway.types import EngineId, RoutingRequest

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> HFPromptTokenizer:
    return HFPromptTokenizer(tiny_model_dir, head_chars=512)


def text_of(rng: random.Random, num_words: int) -> str:
    words = ["ka", "lomi", "Ünï", "漢字", "1234567", "\n\n", "\t", "  ", "foo.bar", "(x)", "!!\n", "'s", "\r\n", "🚀"]
    return " ".join(rng.choice(words) for _ in range(num_words))


def test_heads_are_the_start_of_the_whole_encoding(tokenizer: HFPromptTokenizer) -> None:
    heads = tokenizer._heads
    assert heads is not None  # the tiny model's byte-level BPE splits locally
    backend = tokenizer._backend
    rng = random.Random(3)
    for _ in range(100):
        text = text_of(rng, rng.randint(300, 1200))
        for special in (False, True):
            head = heads.head_ids(text, add_special_tokens=special)
            whole = backend.encode(text, add_special_tokens=special).ids
            assert head is not None and len(head) > BLOCK_SIZE
            assert whole[: len(head)] == head
            assert len(head) < len(whole)


def toy(normalizer: normalizers.Normalizer | None) -> Tokenizer:
    backend = Tokenizer(models.WordLevel({"ab": 0, "bb": 1, "z": 2, "?": 3}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if normalizer is not None:
        backend.normalizer = normalizer
    return backend


def test_a_tokenizer_whose_heads_are_not_exact_gets_none() -> None:
    probe = "ab ab ab ab ab ab ab ab ab ab z"
    # Every "a" becomes "b" when a "z" comes later in the text: the head's tokens depend on
    # text past the cut.
    far_sighted = toy(normalizers.Replace(Regex(r"a(?=[^z]*z)"), "b"))
    assert far_sighted.encode(probe).ids[:2] == [1, 1] and far_sighted.encode(probe[:8]).ids == [0, 0, 0]
    assert HeadEncoder.for_tokenizer(far_sighted, [probe], head_chars=8) is None
    assert HeadEncoder.for_tokenizer(toy(None), [probe], head_chars=8) is not None


def test_prompt_tokens_stops_at_the_head_only_when_told_it_is_enough(tokenizer: HFPromptTokenizer) -> None:
    rng = random.Random(5)
    body = {"model": "m", "prompt": text_of(rng, 2000)}
    whole = tokenizer.token_ids_sync(COMPLETIONS_PATH, body)
    assert whole is not None
    full = asyncio.run(tokenizer.prompt_tokens("m", COMPLETIONS_PATH, body, lambda head: False))
    assert full is not None and full.complete and full.ids == whole
    head = asyncio.run(tokenizer.prompt_tokens("m", COMPLETIONS_PATH, body, lambda head: True))
    assert head is not None and not head.complete
    assert head.ids == whole[: len(head.ids)] and len(head.ids) < len(whole) / 4
    # The length is an estimate from the head's tokens per character: these texts mix
    # one-token words with many-token ones (emoji, CJK): within 8 % over seeds 0-9 (measured).
    assert abs(head.num_tokens - len(whole)) < 0.25 * len(whole)


def test_a_chat_with_a_known_system_prompt_and_a_new_document(tokenizer: HFPromptTokenizer) -> None:
    rng = random.Random(9)
    system = text_of(rng, 300)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text_of(rng, 3000)}]
    body = {"model": "m", "messages": messages}
    # Encoded whole without the tokenizer's piece cache (which would then hold the document).
    whole = tokenizer._tokenizer.encode(tokenizer._render(ChatPrompt(messages=messages)), add_special_tokens=False)
    # The system prompt is cached (an earlier conversation), the document is new.
    asyncio.run(tokenizer.prompt_tokens("m", CHAT_PATH, {"model": "m", "messages": messages[:1]}))
    seen: list[int] = []

    def enough(head: object) -> bool:
        seen.append(len(head))  # type: ignore[arg-type]
        return True

    tokens = asyncio.run(tokenizer.prompt_tokens("m", CHAT_PATH, body, enough))
    assert tokens is not None and not tokens.complete
    assert tokens.ids == whole[: len(tokens.ids)] and seen == [len(tokens.ids)]
    assert len(tokens.ids) < len(whole) / 3


class OneTokenizer:
    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer

    def for_model(self, model: str) -> PromptTokenizer:
        return self.tokenizer


def service(tokenizer: HFPromptTokenizer) -> tuple[PrefixService, InMemoryIndex]:
    index = InMemoryIndex()
    registry = EndpointRegistry([Endpoint(id=EngineId("a"), url="http://a"), Endpoint(id=EngineId("b"), url="http://b")])
    prefix = PrefixService(
        index, OneTokenizer(tokenizer), registry, WorkingSetTracker(), KVLayout(BLOCK_SIZE),
        speculative_ttl_s=10, approximate_ttl_s=10,
    )  # fmt: skip
    return prefix, index


def test_a_new_prompt_is_routed_on_its_head_and_a_known_one_on_all_of_it(tokenizer: HFPromptTokenizer) -> None:
    prefix, index = service(tokenizer)
    rng = random.Random(11)
    body = {"model": "m", "prompt": text_of(rng, 2500)}
    whole = tokenizer.token_ids_sync(COMPLETIONS_PATH, body)
    assert whole is not None
    all_keys = chunk_keys(whole, BLOCK_SIZE, chain_root("m", None, None))

    cold = RoutingRequest(model="m", api_path=COMPLETIONS_PATH, body=body, headers={}, request_id="1")
    asyncio.run(prefix.annotate(cold))
    assert cold.num_prompt_tokens_estimated and cold.prefix_matches == {}
    assert cold.chunk_keys == all_keys[: len(cold.chunk_keys)] and len(cold.chunk_keys) < len(all_keys) / 4
    assert abs(len(cold.chunk_keys) + cold.num_unread_chunks - len(all_keys)) < 0.25 * len(all_keys)

    # Engine a holds every chunk of the head: the prompt may match further, so all of it is read.
    index.add(EngineId("a"), all_keys[: len(all_keys) // 2], TIER_GPU)
    warm = RoutingRequest(model="m", api_path=COMPLETIONS_PATH, body=body, headers={}, request_id="2")
    asyncio.run(prefix.annotate(warm))
    assert not warm.num_prompt_tokens_estimated and warm.num_unread_chunks == 0
    assert warm.chunk_keys == all_keys and warm.num_prompt_tokens == len(whole)
    assert warm.prefix_matches[EngineId("a")].num_chunks == len(all_keys) // 2


def test_an_encoding_found_to_differ_while_serving_turns_the_shortcuts_off(tiny_model_dir: Path) -> None:
    tokenizer = HFPromptTokenizer(tiny_model_dir)
    assert tokenizer._heads is not None and tokenizer._pieces is not None
    tokenizer._verify([1, 2, 3], [1, 2, 3, 4], complete=False)  # a head: the start is enough
    tokenizer._verify([1, 2, 3], [1, 2, 3], complete=True)
    assert tokenizer._heads is not None and tokenizer._pieces is not None
    tokenizer._verify([1, 2, 3], [1, 2, 3, 4], complete=True)  # a whole prompt short of a token
    assert tokenizer._heads is None and tokenizer._pieces is None
    chat = {"messages": [{"role": "system", "content": "x " * 3000}]}
    whole = tokenizer._tokenizer.encode(tokenizer._render(ChatPrompt(chat["messages"])), add_special_tokens=False)
    assert asyncio.run(tokenizer.token_ids("m", CHAT_PATH, chat)) == whole  # encoded whole, still right
    tokenizer.close()


def test_an_engine_reporting_more_than_the_head_teaches_the_whole_prefix(tokenizer: HFPromptTokenizer) -> None:
    """A gateway that restarted routes a prompt on its head; the engine reports it had most of
    it cached: the index learns all of that prefix, not just the head."""
    prefix, index = service(tokenizer)
    rng = random.Random(13)
    body = {"model": "m", "prompt": text_of(rng, 2500)}
    whole = tokenizer.token_ids_sync(COMPLETIONS_PATH, body)
    assert whole is not None
    all_keys = chunk_keys(whole, BLOCK_SIZE, chain_root("m", None, None))

    async def scenario() -> int:
        request = RoutingRequest(model="m", api_path=COMPLETIONS_PATH, body=body, headers={}, request_id="1")
        await prefix.annotate(request)
        assert request.num_prompt_tokens_estimated
        prefix.learn_reported(request, EngineId("a"), cached_tokens=(len(all_keys) - 2) * BLOCK_SIZE)
        await asyncio.gather(*prefix._tasks)
        return index.lookup(all_keys)[EngineId("a")].num_chunks

    assert asyncio.run(scenario()) == len(all_keys) - 2


def test_warm_ups_wait_on_idle_cycles_within_a_bound(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold chats faster than the background thread encodes them: the warm-ups beyond the
    backlog bound are skipped, not queued without end, and the backlog empties."""
    monkeypatch.setattr("gateway.tokenization.tokenizer._MAX_BACKLOG_CHARS", 40_000)
    tokenizer = HFPromptTokenizer(tiny_model_dir, head_chars=256)
    release = threading.Event()
    tokenizer._background.submit(release.wait)  # the thread is busy: nothing it is given runs
    rng = random.Random(5)
    total_chars = 0
    for _ in range(20):
        system = text_of(rng, 2000)
        total_chars += len(system)
        body = {"model": "m", "messages": [{"role": "system", "content": system}]}
        tokens = asyncio.run(tokenizer.prompt_tokens("m", CHAT_PATH, body, lambda head: True))
        assert tokens is not None and not tokens.complete
        # At most the bound, plus one head verification (one head in 64 is checked whatever).
        assert tokenizer._backlog_chars <= 40_000 + 2 * len(system)
    assert total_chars > 3 * 40_000 and tokenizer._backlog_chars > 0
    release.set()
    deadline = time.monotonic() + 30
    while tokenizer._backlog_chars:
        assert time.monotonic() < deadline, "the backlog never emptied"
        time.sleep(0.01)
    tokenizer.close()


def test_routing_a_request_records_the_chunks_its_engine_did_not_hold(tokenizer: HFPromptTokenizer) -> None:
    """A speculative entry stands in for what the engine will store: a conversation's next
    turn adds its new chunks, not every chunk again (the matched ones are indexed already)."""
    prefix, index = service(tokenizer)
    engine = Endpoint(id=EngineId("a"), url="http://a", kv_events_endpoint="tcp://a:5557")
    keys = chunk_keys(list(range(64 * BLOCK_SIZE)), BLOCK_SIZE, chain_root("m"))
    index.add(engine.id, keys[:48], TIER_GPU)
    request = RoutingRequest(model="m", api_path=COMPLETIONS_PATH, body={}, headers={}, request_id="1")
    request.chunk_keys, request.prefix_matches = keys, index.lookup(keys)
    prefix.record_routed(request, engine)
    assert index.num_chunks(engine.id, TIER_SPECULATIVE) == 16
    assert index.lookup(keys)[engine.id].num_chunks == 64
