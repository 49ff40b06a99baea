"""Warming a joining engine and handing over a drained engine's prefixes.

*Join*: before the engine enters rotation, the hottest recent prompts (gateway.elastic.
hot_prefixes) it lacks are pulled into it from the peer holding most of each (NIXL, the
flow of engine_adapter.transfer.nixl). A prompt the engine's shared KV store holds needs no
pull: the engine loads it from the store on first use.

*Drain*: the hot prompts the drained engine holds and no other engine serves (its own cache
or its store) are pulled into the least loaded peer that can take KV, the one holding most of
the prompt first, before the drain's next requests for them arrive elsewhere.

Both stay within a budget (`elastic.max_prefixes`, `max_tokens`, `max_s`). Planning is a pure
function of the index and the fleet (`plan_join`, `plan_drain`); `Warmer` runs a plan. A pull
that fails is counted and skipped: warming is an optimisation, the engine recomputes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine_adapter.transfer.nixl import EngineAddress, KVTransferError, NixlPullTransfer
from gateway.config import ElasticConfig
from gateway.elastic.hot_prefixes import HotPrefix
from gateway.endpoints.registry import Endpoint
from gateway.metrics import GatewayMetrics
from gateway.types import TIER_CPU, TIER_GPU, TIER_SPECULATIVE, TIER_STORAGE, EngineId, PrefixMatch, RequestChunkKey

logger = logging.getLogger(__name__)

Lookup = Callable[[Sequence[RequestChunkKey]], dict[EngineId, PrefixMatch]]


@dataclass(frozen=True, slots=True)
class Pull:
    prefix: HotPrefix
    source: EngineId
    target: EngineId
    num_tokens: int  # the prompt's leading tokens the target holds afterwards
    moved_tokens: int  # of those, the ones it lacked


@dataclass(slots=True)
class Plan:
    pulls: list[Pull] = field(default_factory=list)
    num_in_store: int = 0  # the target loads these from its shared store: warm already
    num_held: int = 0  # the target (join) or a peer (drain) holds them already
    num_unheld: int = 0  # no peer that can give KV holds enough of them
    num_too_small: int = 0  # a pull would move fewer than `min_prefix_tokens`: not worth one
    num_over_budget: int = 0

    def admit(self, pull: Pull, min_prefix_tokens: int, config: ElasticConfig) -> bool:
        """Add `pull` unless it moves too little to be worth a transfer or exceeds the
        budget (`config.max_prefixes`, `config.max_tokens` over the plan); counts why not."""
        if pull.moved_tokens < min_prefix_tokens:
            self.num_too_small += 1
            return False
        moved = sum(p.moved_tokens for p in self.pulls)
        if len(self.pulls) >= config.max_prefixes or moved + pull.moved_tokens > config.max_tokens:
            self.num_over_budget += 1
            return False
        self.pulls.append(pull)
        return True


def own_chunks(match: PrefixMatch | None) -> int:
    """Leading chunks the engine holds in its own cache, as its events announced them."""
    if match is None:
        return 0
    return max(match.by_tier.get(TIER_GPU, 0), match.by_tier.get(TIER_CPU, 0))


def _covered(keys: Sequence[RequestChunkKey], planned: set[RequestChunkKey]) -> int:
    run = 0
    while run < len(keys) and keys[run] in planned:
        run += 1
    return run


def plan_join(
    target: Endpoint,
    hot: Sequence[HotPrefix],
    lookup: Lookup,
    sources: Callable[[str], Sequence[Endpoint]],
    *,
    block_size: int,
    min_prefix_tokens: int,
    config: ElasticConfig,
) -> Plan:
    """Pulls that give `target` the hot prompts (hottest first) of the models it serves.
    `sources(model)`: the engines that can give KV for the model."""
    plan = Plan()
    planned: set[RequestChunkKey] = set()  # chunks earlier pulls give the target
    for prefix in hot:
        if prefix.model not in target.models:
            continue
        matches = lookup(prefix.chunk_keys)
        mine = matches.get(target.id)
        if mine is not None and mine.by_tier.get(TIER_STORAGE, 0) >= len(prefix.chunk_keys):
            plan.num_in_store += 1
            continue
        held = max(own_chunks(mine), _covered(prefix.chunk_keys, planned))
        best = max(
            ((own_chunks(matches.get(s.id)), s.id) for s in sources(prefix.model) if s.id != target.id),
            default=(0, EngineId("")),
        )
        if best[0] <= held:
            if held >= len(prefix.chunk_keys):
                plan.num_held += 1
            else:
                plan.num_unheld += 1
            continue
        pull = Pull(prefix, best[1], target.id, best[0] * block_size, (best[0] - held) * block_size)
        if plan.admit(pull, min_prefix_tokens, config):
            planned.update(prefix.chunk_keys[: best[0]])
    return plan


def plan_drain(
    drained: Endpoint,
    hot: Sequence[HotPrefix],
    lookup: Lookup,
    peers: Callable[[str], Sequence[Endpoint]],
    *,
    block_size: int,
    min_prefix_tokens: int,
    config: ElasticConfig,
) -> Plan:
    """Pulls that move the hot prompts only `drained` holds to a peer. `peers(model)`: the
    engines in rotation for the model that can take KV (the drained one left out)."""
    plan = Plan()
    planned: dict[EngineId, set[RequestChunkKey]] = {}
    # The tokens each peer takes in this plan, as load: the prompts spread over the peers.
    taken: dict[EngineId, int] = {}
    for prefix in hot:
        matches = lookup(prefix.chunk_keys)
        have = own_chunks(matches.get(drained.id))
        if have == 0:
            continue
        candidates = peers(prefix.model)
        if not candidates:
            plan.num_unheld += 1
            continue

        def held_by(peer: Endpoint) -> int:
            # A store's run counts: the peer loads it from there.
            match = matches.get(peer.id)
            return max(match.num_chunks if match is not None else 0,
                       _covered(prefix.chunk_keys, planned.get(peer.id, set())))  # fmt: skip

        if max(held_by(p) for p in candidates) >= have:
            plan.num_held += 1
            continue
        peer = min(candidates, key=lambda p: (-held_by(p), p.load, taken.get(p.id, 0), p.id))
        held = held_by(peer)
        pull = Pull(prefix, drained.id, peer.id, have * block_size, (have - held) * block_size)
        if plan.admit(pull, min_prefix_tokens, config):
            taken[peer.id] = taken.get(peer.id, 0) + pull.moved_tokens
            planned.setdefault(peer.id, set()).update(prefix.chunk_keys[:have])
    return plan


@dataclass(frozen=True, slots=True)
class Outcome:
    num_pulled: int
    num_failed: int
    num_over_budget: int  # left out by the plan's budget, or not tried: its seconds ran out
    moved_tokens: int
    duration_s: float
    # From the plan: nothing to move for these.
    num_in_store: int = 0
    num_held: int = 0
    num_unheld: int = 0
    num_too_small: int = 0


class Warmer:
    """Runs plans: one pull after another, within `max_s`."""

    def __init__(self, transfer: NixlPullTransfer, metrics: GatewayMetrics) -> None:
        self._transfer = transfer
        self._metrics = metrics

    async def run(
        self,
        event: str,
        plan: Plan,
        endpoint_of: Callable[[EngineId], Endpoint | None],
        on_pulled: Callable[[Pull], None],
        *,
        max_s: float,
    ) -> Outcome:
        """`event`: join or drain (metrics, logs). `on_pulled`: a pull succeeded (the caller
        records the target's new chunks in the index). A pull may take what is left of `max_s`:
        no client waits on it, and a joining engine's first requests (these) are its slowest."""
        m = self._metrics
        started = time.monotonic()
        deadline = started + max_s
        pulled = failed = timed_out = moved = 0
        for pull in plan.pulls:
            left_s = deadline - time.monotonic()
            source, target = endpoint_of(pull.source), endpoint_of(pull.target)
            if left_s <= 0:
                timed_out += 1
                continue
            if source is None or target is None:
                failed += 1
                continue
            try:
                await self._transfer.transfer(
                    EngineAddress(source.url, source.api_key), EngineAddress(target.url, target.api_key),
                    pull.prefix.model, list(pull.prefix.token_ids[: pull.num_tokens]),
                    timeout_s=left_s, request_id=f"{event}-warm-{uuid.uuid4().hex[:12]}",
                )  # fmt: skip
            except KVTransferError as exc:
                failed += 1
                logger.warning("%s of %s: pulling %d tokens from %s failed at %s (%s)",
                               event, target.id, pull.num_tokens, source.id, exc.stage, exc)  # fmt: skip
                continue
            pulled += 1
            moved += pull.moved_tokens
            m.kv_transfer_tokens.labels(source.id, target.id).inc(pull.moved_tokens)
            on_pulled(pull)
        outcome = Outcome(pulled, failed, timed_out + plan.num_over_budget, moved, time.monotonic() - started,
                          plan.num_in_store, plan.num_held, plan.num_unheld, plan.num_too_small)  # fmt: skip
        for name, count in (("pulled", pulled), ("failed", failed), ("over_budget", outcome.num_over_budget),
                            ("in_store", plan.num_in_store), ("held", plan.num_held), ("unheld", plan.num_unheld),
                            ("too_small", plan.num_too_small)):  # fmt: skip
            if count:
                m.elastic_prefixes.labels(event, name).inc(count)
        m.elastic_duration.labels(event).observe(outcome.duration_s)
        return outcome


def speculative_entry(pull: Pull, block_size: int) -> tuple[EngineId, tuple[RequestChunkKey, ...], str]:
    """The index entry a successful pull stands for until the target's own events confirm it."""
    return pull.target, pull.prefix.chunk_keys[: pull.num_tokens // block_size], TIER_SPECULATIVE
