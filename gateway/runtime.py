"""The running gateway: what outlives configurations (the index and what learns from traffic,
health checks, KV-event feeds, tokenizers, clients, metrics) and the `Generation` the current
configuration built (gateway.generation).

`reconfigure` is how a reload takes effect (gateway.reload triggers it):

1. diff the running configuration with the new one (gateway.config_diff); restart-only
   fields keep their running values;
2. build the new generation beside the running one: the policy, a registry in which engines
   that stay are the same objects (their health, load and cache stay known) and new ones are
   health-checked once before they can take traffic. Anything wrong raises ConfigError here,
   and nothing has changed;
3. swap, in one step with no await: requests that arrive from then on use the new
   generation; those under way finish with the one they started with;
4. follow up, off the request path: stop following removed engines' KV events and drop their
   index entries (in time proportional to their own entries), follow new engines, and warm
   those that join (gateway.elastic) before they enter rotation.

`add_engine` (the admin API) is a reconfiguration that adds one engine to the running
configuration. Reconfigurations run one at a time.

An engine that restarts (the health checker sees a new process) lost its cache: its index
entries go, and it is warmed as one that joins, in the background (`_on_restart`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from engine_adapter.transfer.nixl import NixlPullTransfer
from gateway.api.auth import APIKeys
from gateway.config import ConfigError, EngineConfig, GatewayConfig
from gateway.config_diff import ConfigChange, diff_configs
from gateway.elastic.fleet import ElasticFleet
from gateway.elastic.hot_prefixes import HotPrefixes
from gateway.elastic.warmup import Outcome
from gateway.endpoints.health import HealthChecker
from gateway.endpoints.outlier import OutlierDetector
from gateway.endpoints.registry import Endpoint, EndpointRegistry
from gateway.endpoints.shared import SharedFleetState
from gateway.generation import Generation, RoutingPlan, plan_routing
from gateway.kvindex.feeds import EventFeeds
from gateway.kvindex.ingest import IndexIngestor
from gateway.kvindex.layout import KVLayout
from gateway.kvindex.memory import InMemoryIndex
from gateway.kvindex.service import PrefixService
from gateway.kvindex.working_set import WorkingSetTracker
from gateway.limits.routing_slots import RoutingSlots
from gateway.metrics import GatewayMetrics
from gateway.proxy.dispatcher import Dispatcher
from gateway.proxy.response_affinity import ResponseAffinity
from gateway.proxy.transfer import KVTransferRunner
from gateway.proxy.probe import probe_inference
from gateway.proxy.upstream import UpstreamClient, build_client
from gateway.routing.cost_model import CostModel
from gateway.routing.store_model import StoreLoadModel
from gateway.routing.transfer_model import TransferCostModel
from gateway.tasks import cancel_and_wait
from gateway.tokenization.engine import EngineTokenizer
from gateway.tokenization.models import ModelTokenizers
from gateway.types import EngineId

logger = logging.getLogger(__name__)

# How long start-up (or a reload that turns prefix routing on) waits for the tokenizer
# checks; slower ones finish in the background.
TOKENIZER_CHECK_TIMEOUT_S = 20.0
# How long a worker waits for the others to start before it serves anyway (a worker that
# cannot start at all must not keep the gateway closed).
WORKERS_READY_TIMEOUT_S = 60.0


class GatewayRuntime:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        shared: SharedFleetState | None = None,
        on_tokenizer_loaded: Callable[[], None] | None = None,
    ) -> None:
        """For `config.engines` (local engines already resolved). `transport` replaces the
        network for every engine call (tests); `shared` is what this worker shares with the
        others (gateway.workers). Raises ConfigError for a policy that cannot be built."""
        self._transport = transport
        self._shared = shared
        self._on_tokenizer_loaded = on_tokenizer_loaded
        kv = config.kv_index
        self.metrics = GatewayMetrics()
        limits, rejections = config.limits, self.metrics.rejections
        # Limits hold for the worker's life (a reload does not change them): one set of slots.
        self.routing_slots = RoutingSlots(limits.max_requests_routing, limits.retry_after_s,
                                          lambda reason: rejections.labels(reason).inc())  # fmt: skip
        self.layout = KVLayout(kv.block_size)
        self.working_sets = WorkingSetTracker(window_s=kv.working_set_window_s)
        el = config.elastic
        self.hot_prefixes = HotPrefixes(max_prefixes=el.max_tracked_prefixes, max_tokens=el.max_prefix_tokens,
                                        half_life_s=el.hot_half_life_s)  # fmt: skip
        # What the last warm-up of each joining (or restarted) engine did (the admin API reports it).
        self.warmed: dict[EngineId, Outcome] = {}
        # Warm-ups of restarted engines, running off the health checker's path.
        self._warm_ups: set[asyncio.Task[None]] = set()
        self._reconfiguring = asyncio.Lock()
        self.cost_model = CostModel()
        self.transfer_model = TransferCostModel()
        self.store_model = StoreLoadModel()
        self.index = InMemoryIndex(capacity_chunks=kv.capacity_chunks)
        self.ingestor = IndexIngestor(self.index, self.layout, lambda engine: self.registry.model_of(engine),
                                      on_reset=self._on_index_reset, on_stored=self.working_sets.touch,
                                      store_of=lambda engine: self.registry.store_of(engine))  # fmt: skip
        self.responses = ResponseAffinity(fleet=lambda: [e.id for e in self.registry.endpoints])
        self.feeds = EventFeeds(self.ingestor, replay_timeout_s=kv.replay_timeout_s)
        self.tokenizers: ModelTokenizers | None = None  # built with the control client, when a policy needs them
        self._config = config
        self._registry = self._registry_for(config.engines, {})
        # Built now, not at start, so a bad policy fails before the server starts.
        self._plan = self._plan_for(config, self._registry)
        self._generation: Generation | None = None
        self._following = False  # KV events followed (once a policy needed them)

    # -- what requests read -------------------------------------------------------------

    @property
    def generation(self) -> Generation:
        if self._generation is None:
            raise RuntimeError("the gateway is not started")
        return self._generation

    @property
    def registry(self) -> EndpointRegistry:
        return self._registry if self._generation is None else self._generation.registry

    def routing_problems(self) -> list[str]:
        """Why prefix routing is not (fully) working, for /health; empty when it is."""
        if not self.generation.uses_prefix:
            return []
        found = self.layout.problems()
        if self.tokenizers is not None:
            found += [f"model {model}: {problem}" for model, problem in self.tokenizers.problems().items()]
        return found

    # -- lifetime -----------------------------------------------------------------------

    async def start(self) -> None:
        """Know each engine's models, health and block size before the first request."""
        config, registry, plan = self._config, self._registry, self._plan
        self.upstream: UpstreamClient = build_client(config.proxy, self._transport)
        self.control = httpx.AsyncClient(transport=self._transport)
        self.elastic = ElasticFleet(self.hot_prefixes, NixlPullTransfer(self.control), self.metrics)
        # One detector for the runtime: ejections live on the engines, which outlive configurations.
        self.outlier = OutlierDetector(registry, config.outlier_detection, self.metrics, probe=self._probe)
        self.checker = HealthChecker(registry, self.control, config.health, self._on_health_change, self._on_restart,
                                     on_pass=self.outlier.lift_after_health_check)  # fmt: skip
        if plan.uses_prefix:
            self._tokenizers_for(config, registry)
        self._generation = self._build(config, plan, registry)
        await self.checker.check_all(initial=True)
        for endpoint in registry.endpoints:
            self.metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)
            if endpoint.healthy:
                self._on_join(endpoint)
        if plan.uses_prefix and self.layout.configured is not None and self.layout.mismatches:
            await self.stop()
            raise ConfigError(
                f"kv_index.block_size is {self.layout.configured}, but "
                + ", ".join(f"engine {e} uses {size}" for e, size in sorted(self.layout.mismatches.items()))
                + ": set it to the engines' --block-size, or leave it unset to read it from them"
            )
        self.checker.start()
        if plan.uses_prefix:
            assert self.tokenizers is not None
            # Token ids checked against the engines before the first request.
            await self.tokenizers.check_all(timeout_s=TOKENIZER_CHECK_TIMEOUT_S)
            await self._follow(registry.endpoints)
        if self._shared is not None:
            await wait_for_other_workers(self._shared, config.server.workers)

    async def stop(self) -> None:
        if self.tokenizers is not None:
            await self.tokenizers.close()
        await self.feeds.stop()
        await self.ingestor.drops.close()
        await self.checker.stop()  # first: no restart starts another warm-up
        await cancel_and_wait(self._warm_ups)
        await self.outlier.close()
        await self.upstream.aclose()
        await self.control.aclose()
        self.metrics.close()

    # -- reload -------------------------------------------------------------------------

    async def reconfigure(self, config: GatewayConfig) -> ConfigChange:
        """Run `config` from now on (see the module's docstring). Raises ConfigError, with
        nothing changed, when it cannot run."""
        async with self._reconfiguring:
            return await self._reconfigure(config)

    async def add_engine(self, engine: EngineConfig) -> Endpoint:
        """Add `engine` to the running configuration (the admin API); returns it once it is
        checked and warmed. Raises ConfigError when its name is taken or it cannot run."""
        async with self._reconfiguring:
            running = self.generation.config
            if any(e.name == engine.name for e in running.engines):
                raise ConfigError(f"an engine named `{engine.name}` is configured already")
            await self._reconfigure(running.model_copy(update={"engines": [*running.engines, engine]}))
        endpoint = self.registry.get(engine.name)
        if endpoint is None:
            raise ConfigError(f"engine `{engine.name}` was not added")
        return endpoint

    async def _reconfigure(self, config: GatewayConfig) -> ConfigChange:
        running = self.generation
        change = diff_configs(running.config, config)
        for field in change.needs_restart:
            logger.warning("configuration reload: %s needs a restart; the running value stays", field)
        if change.empty:
            return change
        config, engines = change.config, change.engines
        kept = {e.id: e for e in running.registry.endpoints}
        for gone in (*engines.removed, *(old for old, _ in engines.replaced)):
            del kept[EngineId(gone.name)]
        registry = self._registry_for(config.engines, kept)
        plan = self._plan_for(config, registry)
        joining = [e for e in registry.endpoints if e.id not in kept]
        # New engines take traffic only once checked, as at start-up.
        await asyncio.gather(*(self.checker.check(e, initial=True) for e in joining))
        if plan.uses_prefix:
            self._tokenizers_for(config, registry)
            assert self.tokenizers is not None
            if not running.uses_prefix:
                # The running generation tokenizes nothing: the tokenizers can take the new
                # settings now, and prove them before the first request needs them.
                self.tokenizers.reconfigure(_tokenizer_settings(config), registry)
                await self.tokenizers.check_all(timeout_s=TOKENIZER_CHECK_TIMEOUT_S)
        generation = self._build(config, plan, registry)
        # A joining engine that the fleet's hot prefixes will warm stays out of rotation until then.
        for endpoint in joining:
            endpoint.warming = endpoint.healthy and self.elastic.would_warm(endpoint, generation)
        el = config.elastic
        self.hot_prefixes.configure(max_prefixes=el.max_tracked_prefixes, max_tokens=el.max_prefix_tokens,
                                    half_life_s=el.hot_half_life_s)  # fmt: skip
        # -- the swap: no await until every reference points at the new generation.
        events_changed = [kept[EngineId(new.name)] for old, new in engines.updated
                          if kept[EngineId(new.name)].reconfigure(old, new)]  # fmt: skip
        for endpoint in running.registry.endpoints:
            if registry.get(endpoint.id) is not endpoint:
                endpoint.leave_shared()
        self._generation = generation
        self.checker.watch(registry, config.health)
        self.outlier.reconfigure(registry, config.outlier_detection)
        if self.tokenizers is not None:
            self.tokenizers.reconfigure(_tokenizer_settings(config), registry)
        # -- off the request path.
        try:
            await self._follow_up(change, joining, events_changed)
        except Exception:  # the new configuration runs; what did not follow is logged
            logger.exception("configuration reload: applied, but a follow-up step failed")
        finally:
            for endpoint in joining:
                if endpoint.warming:
                    await self._warm(endpoint)
        return change

    async def _warm(self, endpoint: Endpoint) -> None:
        """Pull the hot prefixes into a joining (or restarted) engine (its KV events followed
        already, so the index learns what it took), then put it in rotation, whatever happened
        (an engine that failed its health checks meanwhile stays out until it passes them)."""
        try:
            outcome = await self.elastic.warm(endpoint, self.generation)
            if outcome is not None:
                self.warmed[endpoint.id] = outcome
        except Exception:  # warming is an optimisation: the engine joins cold
            logger.exception("warming engine %s failed; it joins cold", endpoint.id)
        finally:
            endpoint.warming = False

    async def _follow_up(self, change: ConfigChange, joining: list[Endpoint], events_changed: list[Endpoint]) -> None:
        engines = change.engines
        left = [EngineId(e.name) for e in (*engines.removed, *(old for old, _ in engines.replaced))]
        for engine in left:
            await self.feeds.unfollow(engine)
            # 0 first: with several workers the value lives on in the worker's metrics file.
            self.metrics.engine_healthy.labels(engine).set(0)
            self.metrics.engine_healthy.remove(engine)
            self.layout.mismatches.pop(engine, None)
            # In-flight requests to it finish on their own; what they add to the index expires.
            self.ingestor.drops.drop(engine, [*self.ingestor.release(engine), *self.working_sets.forget(engine)])
            await self.ingestor.drops.wait(engine)
        for endpoint in events_changed:
            await self.feeds.unfollow(endpoint.id)
        for endpoint in joining:
            self.metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)
            if endpoint.healthy:
                self._on_join(endpoint)
        for _, new in engines.updated:
            updated = self.registry.get(new.name)
            if updated is not None and updated.healthy and self.tokenizers is not None:
                self.tokenizers.engine_joined(updated)  # it may serve other models now
        if self._following:
            await self._follow([*joining, *events_changed])
        elif self.generation.uses_prefix:
            await self._follow(self.registry.endpoints)

    # -- building -----------------------------------------------------------------------

    def _registry_for(self, engines: list[EngineConfig], kept: dict[EngineId, Endpoint]) -> EndpointRegistry:
        """Engines that stay are the same objects; the others are new ones. With several
        workers each has its column in the shared state, by name (ConfigError: no room)."""
        endpoints = []
        for config in engines:
            endpoint = kept.get(EngineId(config.name))
            if endpoint is None:
                endpoint = Endpoint.from_config(config)
                if self._shared is not None:
                    try:
                        endpoint.shared, endpoint.shared_index = self._shared, self._shared.slot(endpoint.id)
                    except RuntimeError as exc:
                        raise ConfigError(f"engines: {exc}") from None
            endpoints.append(endpoint)
        return EndpointRegistry(endpoints)

    def _plan_for(self, config: GatewayConfig, registry: EndpointRegistry) -> RoutingPlan:
        return plan_routing(config, registry, layout=self.layout, working_sets=self.working_sets,
                            cost_model=self.cost_model, transfer_model=self.transfer_model,
                            store_model=self.store_model)  # fmt: skip

    def _tokenizers_for(self, config: GatewayConfig, registry: EndpointRegistry) -> None:
        """Built once, the first time a policy needs them (they outlive configurations)."""
        if self.tokenizers is not None:
            return
        # Ask the least loaded engine serving the model: a busy engine's API server answers slowly.
        engine = EngineTokenizer(self.control, lambda model: min(self.registry.candidates(model),
                                                                 key=lambda e: e.load, default=None))  # fmt: skip
        metrics = self.metrics
        self.tokenizers = ModelTokenizers(
            _tokenizer_settings(config), engine, registry,
            offload_min_chars=config.kv_index.tokenize_offload_min_chars, head_chars=config.kv_index.tokenize_head_chars,
            on_status=lambda model, status: metrics.tokenizer_ready.labels(model).set(1 if status.ok else 0),
            on_loaded=self._on_tokenizer_loaded,
        )  # fmt: skip

    def _build(self, config: GatewayConfig, plan: RoutingPlan, registry: EndpointRegistry) -> Generation:
        kv, metrics = config.kv_index, self.metrics
        prefix = None
        if plan.uses_prefix:
            assert self.tokenizers is not None
            prefix = PrefixService(
                self.index, self.tokenizers, registry, self.working_sets, self.layout,
                speculative_ttl_s=kv.speculative_ttl_s, approximate_ttl_s=kv.approximate_ttl_s,
                on_tokenize_failure=lambda model: metrics.tokenization_failures.labels(model).inc(),
                store_writes=self.ingestor.store_writes, hot=self.hot_prefixes,
            )  # fmt: skip
        transfers = None
        if plan.plans_transfers and prefix is not None:
            transfers = KVTransferRunner(
                NixlPullTransfer(self.control), plan.estimator, registry, prefix, metrics, config.kv_transfer
            )
        dispatcher = Dispatcher(
            plan.router, self.upstream.with_config(config.proxy), self.outlier, metrics, config.proxy,
            prefix, self.cost_model, transfers, self.responses, self.store_model, self.routing_slots,
        )  # fmt: skip
        return Generation(config, registry, plan.router, plan.estimator, plan.uses_prefix, prefix, transfers,
                          dispatcher, APIKeys(config.server.api_keys, config.limits.max_concurrent_requests_per_key))  # fmt: skip

    async def _follow(self, endpoints: list[Endpoint]) -> None:
        """Subscribe to these engines' KV events (asking them where, where the configuration
        does not say and discovery is on)."""
        self._following = True
        if self.generation.config.kv_index.discover_event_sources:
            await self.feeds.discover(self.control, endpoints)
        self.feeds.follow(endpoints)

    # -- engine events (health checks) ----------------------------------------------------

    async def _probe(self, endpoint: Endpoint, timeout_s: float) -> bool:
        """Outlier detection's half-open probe, through the client the traffic uses."""
        return await probe_inference(self.upstream, endpoint, timeout_s)

    def _current(self, endpoint: Endpoint) -> bool:
        """`endpoint` is one the running configuration has (a check under way at a reload
        may end for an engine that left it, or one not yet in it)."""
        return self.registry.get(endpoint.id) is endpoint

    def _on_join(self, endpoint: Endpoint) -> None:
        """An engine (re)joined: what it says about itself may have changed."""
        if endpoint.stats is not None and endpoint.stats.block_size is not None:
            self.layout.observe(endpoint.id, endpoint.stats.block_size)
        if self.tokenizers is not None:
            self.tokenizers.engine_joined(endpoint)

    def _on_health_change(self, endpoint: Endpoint) -> None:
        if not self._current(endpoint):
            return
        self.metrics.engine_healthy.labels(endpoint.id).set(1 if endpoint.healthy else 0)
        # Out of rotation, an engine is no candidate, so what the index says of it routes
        # nothing; a blip must not make the gateway forget a cache the engine still has (vLLM
        # announces no blocks it already holds). A restart (new process start time, event
        # sequence back to 0) or a gap in its events that cannot be replayed does reset it.
        if endpoint.healthy:
            self._on_join(endpoint)

    def _on_index_reset(self, engine: EngineId, reason: str) -> None:
        # What was routed there lately goes too (the speculative entries among it).
        self.ingestor.drops.drop(engine, self.working_sets.forget(engine))

    def _on_restart(self, endpoint: Endpoint) -> None:
        if not self._current(endpoint):
            return
        self.ingestor.reset(endpoint.id, "engine restarted")
        self._on_join(endpoint)
        self._rewarm(endpoint)

    def _rewarm(self, endpoint: Endpoint) -> None:
        """A restarted engine comes back with an empty cache: warm it as one that joins, out of
        rotation until then (`elastic.warm_on_join`). In the background: the health checker
        that saw the restart goes on checking the others, and finds the engine failing if it
        does. One warm-up at a time: a restart during one (or during a join's) lets it finish.
        The check that saw the restart passed: the engine answers, even if it is not back in
        rotation yet (`health.healthy_threshold`)."""
        if endpoint.warming or not self.elastic.would_warm(endpoint, self.generation):
            return
        endpoint.warming = True
        task = asyncio.create_task(self._warm(endpoint), name=f"warm-{endpoint.id}")
        self._warm_ups.add(task)
        task.add_done_callback(self._warm_ups.discard)


def _tokenizer_settings(config: GatewayConfig) -> dict[str, str]:
    return {m.name: m.tokenizer for m in config.models}


async def wait_for_other_workers(shared: SharedFleetState, num_workers: int) -> None:
    """Return once every worker follows the engines' events. Each worker's index learns a
    block only from the event that announced it: a worker still starting while another
    already served would never learn the blocks of those first requests."""
    shared.mark_ready()
    deadline = time.monotonic() + WORKERS_READY_TIMEOUT_S
    while shared.num_ready() < num_workers:
        if time.monotonic() > deadline:
            logger.warning("serving before the other workers: %d of %d are ready after %g s",
                           shared.num_ready(), num_workers, WORKERS_READY_TIMEOUT_S)  # fmt: skip
            return
        await asyncio.sleep(0.05)
