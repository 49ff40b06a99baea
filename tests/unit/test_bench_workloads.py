"""The replay benchmark's oracle and workload bookkeeping (bench/workloads.py)."""

from __future__ import annotations

from bench.workloads import multi_turn, oracle_hit_rate, shared_prefix


def test_oracle_counts_whole_leading_blocks_and_never_the_last_token() -> None:
    a = list(range(100, 164))  # two blocks of 32
    # The second time, both blocks are cached but the last token is always computed: one block hits.
    assert oracle_hit_rate([a, a], block_size=32, capacity_blocks=10) == 32 / 128
    longer = a + [7] * 16
    assert oracle_hit_rate([a, longer], block_size=32, capacity_blocks=10) == 64 / 144


def test_oracle_evicts_least_recently_used_at_capacity() -> None:
    a, b = list(range(100, 165)), list(range(200, 265))  # 2 full blocks + 1 token each
    assert oracle_hit_rate([a, b, a], block_size=32, capacity_blocks=4) == 64 / 195
    assert oracle_hit_rate([a, b, a], block_size=32, capacity_blocks=2) == 0.0


def test_first_uses_are_the_first_arrival_of_each_group() -> None:
    workload = shared_prefix("m", num_groups=3, prompts_per_group=4, prefix_tokens=64, question_tokens=8,
                             max_tokens=1, seed=1, rate_per_s=10.0)  # fmt: skip
    firsts = workload.first_uses()
    requests = sorted((r for s in workload.sessions for r in s), key=lambda r: r.at_s or 0.0)
    seen: set[str] = set()
    for request in requests:
        assert (id(request) in firsts) == (request.group not in seen)
        seen.add(request.group)
    assert len(firsts) == 3


def test_first_use_of_a_chat_is_its_first_turn() -> None:
    workload = multi_turn("m", num_sessions=3, turns=4, system_words=5, user_words=2, reply_words=2,
                          max_tokens=1, seed=1, session_rate_per_s=1.0, think_s=0.0)  # fmt: skip
    assert workload.first_uses() == {id(session[0]) for session in workload.sessions}
