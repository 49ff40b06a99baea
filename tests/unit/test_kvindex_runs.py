"""RecentRuns (gateway/kvindex/runs.py): which leading keys of a prompt an owner wrote already."""

from __future__ import annotations

from gateway.kvindex.runs import RecentRuns
from gateway.tokenization.chunking import chain_root, chunk_keys
from gateway.types import RequestChunkKey


def keys_of(tokens: list[int]) -> list[RequestChunkKey]:
    return chunk_keys(tokens, 4, chain_root("m"))


TURN_1 = list(range(40))  # 10 chunks
TURN_2 = TURN_1 + list(range(100, 120))  # the next turn: 15 chunks
BRANCH = TURN_1[:20] + list(range(200, 240))  # the same first 5 chunks, then others


def test_a_prompt_that_extends_a_run_is_covered_as_far_as_the_run_goes() -> None:
    runs: RecentRuns[str] = RecentRuns()
    assert runs.covered("a", keys_of(TURN_2)) == (0, 0.0)
    runs.note("a", keys_of(TURN_1), 7.0)
    assert runs.covered("a", keys_of(TURN_2)) == (10, 7.0)
    assert runs.covered("a", keys_of(TURN_1)) == (10, 7.0)
    assert runs.covered("a", keys_of(TURN_1[:36])) == (0, 0.0)  # shorter than the run
    assert runs.covered("a", keys_of(BRANCH)) == (0, 0.0)  # same start, other chunks at its end
    assert runs.covered("b", keys_of(TURN_2)) == (0, 0.0)  # owners apart
    runs.note("a", keys_of(TURN_2), 7.0)
    assert runs.covered("a", keys_of(TURN_2 + [1] * 8)) == (15, 7.0)


def test_forgetting_and_the_bound() -> None:
    runs: RecentRuns[tuple[int, int]] = RecentRuns(max_runs=2)
    runs.note((1, 1), keys_of(TURN_1), 1.0)
    runs.note((1, 2), keys_of(TURN_1), 1.0)
    runs.note((1, 2), keys_of(TURN_2), 1.0)  # the same first key: replaces, no new run
    assert runs.covered((1, 1), keys_of(TURN_1)) == (10, 1.0)
    runs.note((2, 1), keys_of(BRANCH[4:]), 2.0)  # a third run: past the bound, all forgotten
    assert runs.covered((1, 1), keys_of(TURN_1)) == (0, 0.0)
    assert runs.covered((2, 1), keys_of(BRANCH[4:])) == (14, 2.0)
    runs.note((2, 2), keys_of(TURN_1), 3.0)
    runs.forget_where(lambda owner: owner[0] == 2)
    assert runs.covered((2, 1), keys_of(BRANCH[4:])) == (0, 0.0)
    assert runs.covered((2, 2), keys_of(TURN_1)) == (0, 0.0)
    runs.note((3, 1), keys_of(TURN_1), 4.0)
    runs.note((3, 2), keys_of(TURN_1), 4.0)  # two runs again, within the bound
    runs.forget((3, 1))
    assert runs.covered((3, 1), keys_of(TURN_1)) == (0, 0.0)
    assert runs.covered((3, 2), keys_of(TURN_1)) == (10, 4.0)
    runs.note((3, 3), keys_of(TURN_1), 5.0)  # in the room the forgotten run left
    assert runs.covered((3, 2), keys_of(TURN_1)) == (10, 4.0)
