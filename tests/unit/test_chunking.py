from __future__ import annotations

from array import array

import random

import pytest

from gateway.tokenization.chunking import RecentChains, chain_root, chunk_keys

ROOT = chain_root("m")


def test_only_full_chunks_get_keys() -> None:
    assert chunk_keys([], 4, ROOT) == []
    assert chunk_keys([1, 2, 3], 4, ROOT) == []
    assert len(chunk_keys([1, 2, 3, 4], 4, ROOT)) == 1
    assert len(chunk_keys(list(range(11)), 4, ROOT)) == 2
    assert len(chunk_keys(list(range(12)), 4, ROOT)) == 3


def test_trailing_partial_chunk_does_not_change_keys() -> None:
    tokens = list(range(8))
    assert chunk_keys(tokens + [99, 98], 4, ROOT) == chunk_keys(tokens, 4, ROOT)


def test_deterministic_and_accepts_any_sequence() -> None:
    tokens = list(range(1000, 1032))
    keys = chunk_keys(tokens, 8, ROOT)
    assert keys == chunk_keys(list(tokens), 8, chain_root("m"))
    assert keys == chunk_keys(tuple(tokens), 8, ROOT)
    assert keys == chunk_keys(array("I", tokens + [7]), 8, ROOT)  # the tokenizer's arrays: no copy
    assert len(set(keys)) == 4
    assert all(isinstance(k, int) and 0 <= k < 2**64 for k in keys)


def test_keys_are_chained() -> None:
    tokens = list(range(40))
    keys = chunk_keys(tokens, 4, ROOT)
    # Each key is the next chunk hashed from the previous key: continuing from key i gives
    # the remaining keys.
    for i in range(len(keys)):
        assert chunk_keys(tokens[(i + 1) * 4 :], 4, keys[i]) == keys[i + 1 :]


@pytest.mark.parametrize("position", [0, 5, 17])
def test_changing_a_token_changes_its_key_and_every_later_one(position: int) -> None:
    tokens = list(range(100, 124))  # 6 chunks of 4
    changed = list(tokens)
    changed[position] += 1
    a, b = chunk_keys(tokens, 4, ROOT), chunk_keys(changed, 4, ROOT)
    chunk = position // 4
    assert a[:chunk] == b[:chunk]
    assert all(x != y for x, y in zip(a[chunk:], b[chunk:]))


def test_same_chunk_content_at_different_positions_has_different_keys() -> None:
    keys = chunk_keys([7, 7, 7, 7] * 3, 4, ROOT)
    assert len(set(keys)) == 3


def test_chunk_boundaries_matter() -> None:
    tokens = list(range(16))
    assert chunk_keys(tokens, 4, ROOT)[-1] != chunk_keys(tokens, 8, ROOT)[-1]


def test_roots_separate_models_loras_and_salts() -> None:
    roots = {
        chain_root("m"),
        chain_root("m2"),
        chain_root("m", "lora-a"),
        chain_root("m", "lora-b"),
        chain_root("m", None, "salt"),
        chain_root("m", "lora-a", "salt"),
        chain_root("m", None, "other-salt"),
    }
    assert len(roots) == 7
    assert chain_root("m", None, None) == chain_root("m", "", "") == chain_root("m")
    tokens = list(range(8))
    firsts = {chunk_keys(tokens, 4, root)[0] for root in roots}
    assert len(firsts) == 7


def test_root_fields_do_not_run_together() -> None:
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert chain_root("ab", "c") != chain_root("a", "bc")
    assert chain_root("m", "x") != chain_root("m", None, "x")


def test_large_token_ids() -> None:
    keys = chunk_keys([151_643, 2**31, 2**32 - 1, 0], 4, ROOT)
    assert len(keys) == 1
    assert keys != chunk_keys([151_643, 2**31, 2**32 - 2, 0], 4, ROOT)


def test_recent_chains_give_the_keys_chunk_keys_gives_on_random_conversations() -> None:
    """Prompts that extend, cut short, branch from or share only a start with earlier ones (the
    chunks a prompt shares with an earlier one come from its keys), at two block sizes."""
    rng = random.Random(3)
    chains = RecentChains(max_bytes=20_000)  # small: prompts also fall out
    root = chain_root("m")
    prompts: list[list[int]] = [[rng.randrange(50_000) for _ in range(rng.randrange(1, 400))] for _ in range(8)]
    for _ in range(600):
        tokens = list(rng.choice(prompts))
        change = rng.random()
        if change < 0.4:
            tokens += [rng.randrange(50_000) for _ in range(rng.randrange(0, 80))]  # the next turn
        elif change < 0.6:
            del tokens[rng.randrange(len(tokens)) :]  # cut short
        elif change < 0.8 and tokens:
            tokens[rng.randrange(len(tokens))] = rng.randrange(50_000)  # a branch at any token
        prompts[rng.randrange(len(prompts))] = tokens
        block = rng.choice((4, 16))
        ids = array("I", tokens) if rng.random() < 0.5 else tokens
        assert chains.chunk_keys(ids, block, root) == chunk_keys(tokens, block, root)
        assert chains.num_bytes <= 20_000
