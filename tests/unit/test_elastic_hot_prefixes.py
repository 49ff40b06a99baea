"""The prompts remembered for warming: whole chunks only, hottest = most used lately, bounded."""

from __future__ import annotations

from array import array

from gateway.elastic.hot_prefixes import HotPrefixes
from gateway.types import RequestChunkKey

BLOCK = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys(*values: int) -> list[RequestChunkKey]:
    return [RequestChunkKey(v) for v in values]


def test_keeps_whole_chunks_with_their_token_ids() -> None:
    hot = HotPrefixes(max_prefixes=10, max_tokens=100, half_life_s=60)
    hot.note("m", list(range(10)), keys(1, 2), BLOCK)  # 10 tokens: two whole chunks and 2 over
    [prefix] = hot.hottest()
    assert prefix.token_ids == array("I", range(8)) and prefix.chunk_keys == tuple(keys(1, 2))
    assert prefix.num_tokens == 8 and prefix.model == "m"


def test_a_long_prompt_is_remembered_by_its_head() -> None:
    hot = HotPrefixes(max_prefixes=10, max_tokens=9, half_life_s=60)
    hot.note("m", array("I", range(16)), keys(1, 2, 3, 4), BLOCK)
    [prefix] = hot.hottest()
    assert prefix.num_tokens == 8 and prefix.chunk_keys == tuple(keys(1, 2))


def test_less_than_a_chunk_is_not_remembered() -> None:
    hot = HotPrefixes(max_prefixes=10, max_tokens=100, half_life_s=60)
    hot.note("m", [1, 2, 3], [], BLOCK)
    assert len(hot) == 0


def test_hottest_is_most_used_lately() -> None:
    clock = Clock()
    hot = HotPrefixes(max_prefixes=10, max_tokens=100, half_life_s=10, clock=clock)
    for _ in range(4):
        hot.note("m", range(4), keys(1), BLOCK)  # used often, long ago
    clock.now = 30.0  # three half-lives: 4 uses weigh 0.5
    hot.note("m", range(4, 8), keys(2), BLOCK)
    assert [p.chunk_keys for p in hot.hottest()] == [tuple(keys(2)), tuple(keys(1))]
    assert hot.hotness(hot.hottest()[1]) == 0.5
    hot.note("m", range(4), keys(1), BLOCK)  # 0.5 + 1 > 1
    assert [p.chunk_keys for p in hot.hottest()] == [tuple(keys(1)), tuple(keys(2))]


def test_a_prefix_shared_by_many_prompts_is_hotter_than_a_prompt_sent_twice() -> None:
    hot = HotPrefixes(max_prefixes=10, max_tokens=100, half_life_s=60)
    for _ in range(2):
        hot.note("m", range(12), keys(5, 6, 7), BLOCK)
    for question in (3, 4, 8):  # one system prompt (chunks 1, 2), three questions
        hot.note("m", range(12), keys(1, 2, question), BLOCK)
    assert hot.hottest()[0].chunk_keys[:2] == tuple(keys(1, 2))
    assert hot.hottest()[-1].chunk_keys == tuple(keys(5, 6, 7))


def test_by_model_and_limit() -> None:
    hot = HotPrefixes(max_prefixes=10, max_tokens=100, half_life_s=60)
    hot.note("a", range(4), keys(1), BLOCK)
    hot.note("b", range(4), keys(1), BLOCK)  # the same key, another model: another prompt
    hot.note("b", range(8), keys(1, 2), BLOCK)
    assert len(hot) == 3
    assert [p.model for p in hot.hottest("a")] == ["a"]
    assert len(hot.hottest("b", limit=1)) == 1


def test_bounded_by_the_least_recently_used() -> None:
    hot = HotPrefixes(max_prefixes=2, max_tokens=100, half_life_s=60)
    hot.note("m", range(4), keys(1), BLOCK)
    hot.note("m", range(4), keys(2), BLOCK)
    hot.note("m", range(4), keys(1), BLOCK)
    hot.note("m", range(4), keys(3), BLOCK)  # 2 was used least recently
    assert sorted(p.chunk_keys[0] for p in hot.hottest()) == keys(1, 3)
    hot.configure(max_prefixes=1, max_tokens=100, half_life_s=60)
    assert [p.chunk_keys[0] for p in hot.hottest()] == keys(3)
