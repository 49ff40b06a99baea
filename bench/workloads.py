"""Workloads for the replay benchmark. Each is a list of sessions; a session is a list of
requests sent one after another (a multi-turn chat), sessions run concurrently.

Every request body is built up front and every prompt is given as token ids for completions,
or as chat messages, so the oracle can be computed from the exact same token sequences.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Token ids the filler uses: above the tiny tokenizer's special tokens, below its vocab size.
_FIRST_ID, _LAST_ID = 16, 4000


@dataclass
class BenchRequest:
    api_path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]
    at_s: float | None = None  # open-loop arrival time from the start; None: as soon as possible
    think_s: float = 0.0  # pause after the previous request of the session finished
    group: str = ""
    # Token ids of the prompt when known up front (completions); chat prompts are rendered
    # with the model's tokenizer by the runner for the oracle.
    prompt_ids: list[int] | None = None


@dataclass
class Workload:
    name: str
    sessions: list[list[BenchRequest]] = field(default_factory=list)
    concurrency: int = 4  # sessions in flight at most (open-loop workloads set it high)
    description: str = ""

    @property
    def num_requests(self) -> int:
        return sum(len(s) for s in self.sessions)

    def first_uses(self) -> set[int]:
        """id() of the first request of each group in arrival order: nothing to hit yet."""
        def arrival(request: BenchRequest) -> float:
            return request.at_s if request.at_s is not None else float("inf")

        firsts: dict[str, BenchRequest] = {}
        for request in sorted((r for s in self.sessions for r in s), key=arrival):
            firsts.setdefault(request.group, request)
        return {id(r) for r in firsts.values()}


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(_FIRST_ID, _LAST_ID) for _ in range(n)]


def _words(rng: random.Random, n: int) -> str:
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di", "fa", "gu"]
    return " ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n))


def shared_prefix(model: str, *, num_groups: int, prompts_per_group: int, prefix_tokens: int,
                  question_tokens: int, max_tokens: int, seed: int, rate_per_s: float,
                  content_seed: int | None = None) -> Workload:  # fmt: skip
    """Groups of requests sharing a long prefix (a system prompt, a document), each with its
    own question; requests of all groups interleaved at random, arriving as a Poisson process
    of `rate_per_s` (open loop: arrivals do not wait for answers).

    `seed` fixes the shape (order, arrival times), `content_seed` the token ids: runs that
    compare policies share the shape and differ in content, so no run hits another's cache."""
    rng = random.Random(seed)
    content = random.Random(seed if content_seed is None else content_seed)
    prefixes = [_ids(content, prefix_tokens) for _ in range(num_groups)]
    requests = []
    for g, prefix in enumerate(prefixes):
        for _ in range(prompts_per_group):
            ids = prefix + _ids(content, question_tokens)
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "ignore_eos": True}
            requests.append(BenchRequest("/v1/completions", body, group=f"g{g}", prompt_ids=ids))
    rng.shuffle(requests)
    clock = 0.0
    for request in requests:
        clock += rng.expovariate(rate_per_s)
        request.at_s = clock
    name = f"shared-prefix {num_groups}x{prompts_per_group} ({prefix_tokens}+{question_tokens} tok)"
    return Workload(name, [[r] for r in requests], 64,
                    f"{num_groups} groups × {prompts_per_group} prompts, {prefix_tokens}-token shared prefix, "
                    f"{question_tokens}-token question, {max_tokens} output tokens, Poisson arrivals "
                    f"at {rate_per_s}/s")  # fmt: skip


def multi_turn(model: str, *, num_sessions: int, turns: int, system_words: int, user_words: int,
               reply_words: int, max_tokens: int, seed: int, session_rate_per_s: float,
               think_s: float, content_seed: int | None = None) -> Workload:  # fmt: skip
    """Chats whose history grows each turn: turn t sends the whole conversation so far.
    Chat i starts at a random moment of the i-th interval of 1/`session_rate_per_s` (a steady
    number of chats in progress; with Poisson starts the peak history of a 16-chat run went
    from 33k to 46k tokens depending on the seed); each turn follows the previous answer after
    `think_s`. Seeds as in shared_prefix."""
    rng = random.Random(seed)
    content = random.Random(seed if content_seed is None else content_seed)
    sessions = []
    for s in range(num_sessions):
        start = (s + rng.random()) / session_rate_per_s
        messages: list[dict[str, str]] = [{"role": "system", "content": _words(content, system_words)}]
        session = []
        for t in range(turns):
            messages = messages + [{"role": "user", "content": f"Turn {t}. " + _words(content, user_words)}]
            body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "ignore_eos": True}
            session.append(BenchRequest("/v1/chat/completions", body, group=f"s{s}",
                                        at_s=start if t == 0 else None, think_s=0.0 if t == 0 else think_s))  # fmt: skip
            # A fixed reply keeps the history identical whatever the engine generated.
            messages = messages + [{"role": "assistant", "content": _words(content, reply_words)}]
        sessions.append(session)
    return Workload(f"multi-turn {num_sessions}x{turns}", sessions, num_sessions,
                    f"{num_sessions} chats × {turns} turns, system {system_words} words, "
                    f"+{user_words} user and {reply_words} reply words per turn, sessions start at "
                    f"{session_rate_per_s}/s, {think_s}s between turns")  # fmt: skip


def mooncake_trace(model: str, path: Path, *, max_requests: int, max_blocks: int, block_tokens: int,
                   time_scale: float, max_tokens: int, seed: int) -> Workload:  # fmt: skip
    """Mooncake's trace: each hash id is one block of `block_tokens` token ids (the same id,
    the same tokens), so equal ids mean an equal prefix. Requests are cut to their first
    `max_blocks` blocks and arrival times multiplied by `time_scale` so 2 CPU cores keep up."""
    rng = random.Random(seed)
    blocks: dict[int, list[int]] = {}
    requests = []
    with open(path) as handle:
        for line in handle:
            if len(requests) >= max_requests:
                break
            record = json.loads(line)
            hash_ids = record["hash_ids"][:max_blocks]
            ids: list[int] = []
            for hash_id in hash_ids:
                if hash_id not in blocks:
                    blocks[hash_id] = _ids(rng, block_tokens)
                ids += blocks[hash_id]
            # The trace's last block is partial: keep its real length when not cut.
            if len(record["hash_ids"]) <= max_blocks:
                ids = ids[: max(1, record["input_length"] - block_tokens * (len(hash_ids) - 1))
                          + block_tokens * (len(hash_ids) - 1)]  # fmt: skip
            out = max(1, min(max_tokens, record["output_length"]))
            body = {"model": model, "prompt": ids, "max_tokens": out, "ignore_eos": True}
            requests.append(BenchRequest("/v1/completions", body, at_s=record["timestamp"] / 1000 * time_scale,
                                         group=f"h{hash_ids[0] if hash_ids else -1}", prompt_ids=ids))  # fmt: skip
    return Workload(f"mooncake trace ({len(requests)} req)", [[r] for r in requests], concurrency=64,
                    description=f"first {len(requests)} requests of {path.name}, ≤{max_blocks} blocks of "
                    f"{block_tokens} tokens each, arrival times × {time_scale}")  # fmt: skip


def oracle_hit_rate(prompts: list[list[int]], block_size: int, capacity_blocks: int) -> float:
    """Hit rate of one pooled LRU cache of `capacity_blocks` (the whole fleet's), requests in
    order: the best any placement could do at that capacity. Hits are counted like vLLM:
    whole leading blocks, never the last prompt token."""
    from collections import OrderedDict

    import xxhash

    cache: OrderedDict[int, None] = OrderedDict()
    hit_tokens = total_tokens = 0
    for ids in prompts:
        total_tokens += len(ids)
        keys = []
        parent = 0
        for i in range(len(ids) // block_size):
            parent = xxhash.xxh3_64_intdigest(str(ids[i * block_size:(i + 1) * block_size]).encode(), seed=parent)
            keys.append(parent)
        usable = (len(ids) - 1) // block_size
        hits = 0
        for key in keys[:usable]:
            if key not in cache:
                break
            hits += 1
        hit_tokens += hits * block_size
        for key in keys:
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hit_tokens / total_tokens if total_tokens else 0.0
