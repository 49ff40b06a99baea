"""Gateway configuration: one pydantic model per component, loaded from YAML.

Every field has a visible default, so a config file only states what differs.
`load_config` turns validation failures into a `ConfigError` whose message names
the offending field by its dotted path (``routing.scorers.0.weight: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config file that cannot be used; the message is meant for the operator."""


class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: reject them.
    model_config = ConfigDict(extra="forbid")


class APIKeyConfig(_Strict):
    """One client API key; in YAML either the key itself or `{key, max_concurrent_requests}`."""

    key: str
    # This key's own cap on requests in flight (per worker); unset: `limits.max_concurrent_requests_per_key`.
    max_concurrent_requests: int | None = Field(default=None, ge=1)

    @field_validator("key")
    @classmethod
    def _real_key(cls, value: str) -> str:
        return _check_secret(value, "API key")


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer token for admin endpoints (/admin/*, /debug/*). None disables them. The
    # environment's GATEWAY_ADMIN_TOKEN, when set and not empty, takes its place.
    admin_token: str | None = None
    # Client API keys: with any, every client request must carry one (Authorization: Bearer,
    # or x-api-key). The environment's GATEWAY_API_KEYS (comma-separated) adds to them. An entry
    # is a key, or a mapping that also gives the key its own concurrency cap.
    api_keys: list[APIKeyConfig] = Field(default_factory=list)
    # One log line per request (uvicorn's access log): off by default, it costs on every request.
    access_log: bool = False
    # Worker processes serving the port, one per core to use (gateway.workers).
    workers: int = Field(default=1, ge=1, le=64)
    # How often the configuration file is checked for changes, which are then applied without
    # a restart (gateway.reload); 0: only on SIGHUP.
    config_poll_interval_s: float = Field(default=2.0, ge=0)

    @field_validator("admin_token")
    @classmethod
    def _real_admin_token(cls, value: str | None) -> str | None:
        return None if value is None else _check_secret(value, "admin token")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_as_entries(cls, value: Any) -> Any:
        """A plain string (the existing YAML lists, GATEWAY_API_KEYS) is a key with no cap of its
        own; a key given twice (the file and the environment) is one key, with the cap either gives."""
        if not isinstance(value, list):
            return value
        entries: dict[str, dict[str, Any]] = {}
        for item in value:
            entry = {"key": item} if isinstance(item, str) else item
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                return value  # let the field's own validation name what is wrong
            known = entries.setdefault(entry["key"], dict(entry))
            cap = entry.get("max_concurrent_requests")
            if cap is not None and known.get("max_concurrent_requests") not in (None, cap):
                raise ValueError("an API key is listed twice with different max_concurrent_requests")
            if cap is not None:
                known["max_concurrent_requests"] = cap
        return list(entries.values())


# Tokens that are placeholders in examples, never secrets.
_PLACEHOLDER_TOKENS = frozenset({"change-me", "changeme", "change_me", "secret", "password", "token"})


def _check_secret(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"an empty {what} would let anyone in; remove the key to disable it")
    if value.strip().lower() in _PLACEHOLDER_TOKENS:
        raise ValueError(f"{value!r} is a placeholder, not a {what}: set a real one (or its environment variable)")
    return value


class LimitsConfig(_Strict):
    """What one client may hold of a gateway worker (gateway.limits). Every limit is per worker
    process: with `server.workers: N`, the gateway as a whole admits up to N times as much."""

    # From a connection's opening, or the end of the previous response on a kept-alive one,
    # until the request's headers are complete: past it, 408 (or, before any byte, a plain
    # close) and the connection is closed. A slow-loris client holds a connection this long.
    header_read_timeout_s: float = Field(default=10.0, gt=0)
    # Longest silence between two pieces of a request body, and the whole body's time: 408.
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    body_total_timeout_s: float = Field(default=300.0, gt=0)
    # An idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive).
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    # Request line and headers together, and the number of headers: past either, 431.
    max_header_bytes: int = Field(default=65536, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    # Open client connections; further ones get a 503 and are closed at once. Lowered at
    # start-up to what the open-file limit leaves room for (gateway.limits.open_files).
    max_connections: int = Field(default=4096, ge=1)
    # Requests in flight (health, metrics, admin and debug excepted); more get 503 at once.
    max_concurrent_requests: int = Field(default=1024, ge=1)
    # Requests in flight per client API key (`server.api_keys` entries may set their own);
    # more get 429 at once. None: only the global cap.
    max_concurrent_requests_per_key: int | None = Field(default=None, ge=1)
    # Requests tokenized and looked up at once (gateway.limits.routing_slots): a worker offered
    # more prompts than its core routes refuses the excess with 503 at once rather than queue
    # them, so those admitted keep their latency. None: no cap.
    max_requests_routing: int | None = Field(default=8, ge=1)
    # A worker whose event loop runs at least this far behind through a whole 0.1 s window
    # (gateway.limits.loop_lag: more requests than it can even read and answer), or in one
    # pass under a flood, refuses new ones with 503 until it catches up, then admits at most
    # 0.8 of what that window admitted, a little more each window. None: never.
    max_event_loop_lag_s: float | None = Field(default=0.005, gt=0)
    # Sent as Retry-After with every 503 and 429 above (whole seconds, as HTTP has it).
    retry_after_s: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _keep_alive_within_header_timeout(self) -> LimitsConfig:
        # The header timeout runs from the end of the previous response as well: an idle
        # connection kept longer would be cut by it, counted as a slow client.
        if self.keep_alive_timeout_s > self.header_read_timeout_s:
            if "keep_alive_timeout_s" in self.model_fields_set:
                raise ValueError("keep_alive_timeout_s must not exceed header_read_timeout_s")
            self.keep_alive_timeout_s = self.header_read_timeout_s  # the default, under a short header timeout
        return self


class EngineConfig(_Strict):
    name: str = Field(min_length=1)
    url: str
    # ZMQ endpoint of the engine's KV-event publisher (tcp://host:port), if it has one.
    kv_events_endpoint: str | None = None
    # ROUTER socket the engine resends missed event batches from (vLLM replay_endpoint).
    kv_events_replay_endpoint: str | None = None
    # KV-cache capacity in blocks; read from the engine's metrics when unset.
    kv_capacity_blocks: int | None = Field(default=None, ge=1)
    # Models this engine serves; discovered from GET /v1/models when empty.
    models: list[str] = Field(default_factory=list)
    # Sent upstream as a bearer token when the engine was started with --api-key.
    api_key: str | None = None
    # The engine runs vLLM's NixlConnector (kv_role kv_both): it can give its cached KV to
    # another such engine and take theirs (see `kv_transfer`).
    kv_transfer: bool = False
    # Prefill/decode disaggregation (gateway.proxy.disaggregation): "prefill" engines compute
    # prompts, "decode" engines pull that KV and generate, "both" do either (and everything
    # when the fleet has no split). A split needs NIXL: prefill and decode need `kv_transfer`.
    role: Literal["prefill", "decode", "both"] = "both"
    # The shared KV store the engine's connector reads and writes (vLLM's LMCacheMPConnector
    # to an LMCache server): engines naming the same store load what any of them stored there.
    kv_store: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")

    @model_validator(mode="after")
    def _role_needs_kv_transfer(self) -> EngineConfig:
        if self.role != "both" and not self.kv_transfer:
            raise ValueError(f"role {self.role!r} needs kv_transfer: true (the decode engine pulls the KV over NIXL)")
        return self

    @field_validator("name")
    @classmethod
    def _not_a_store(cls, value: str) -> str:
        if value.startswith("kv-store:"):
            raise ValueError("names starting with 'kv-store:' are the index's names for shared KV stores")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class LocalEnginesConfig(_Strict):
    """CPU vLLM engines the gateway launches itself (quick start, tests)."""

    count: int = Field(default=2, ge=1, le=16)
    host: str = "127.0.0.1"
    base_port: int = Field(default=8100, ge=1024, le=65000)
    kv_events_base_port: int = Field(default=5557, ge=1024, le=65000)
    model_dir: str = ".cache/tiny-llama"
    served_model_name: str = "tiny-llama"
    block_size: int = Field(default=32, ge=16)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    max_model_len: int = Field(default=16384, ge=256)
    extra_args: list[str] = Field(default_factory=list)
    # Start the engines with vLLM's NixlConnector so the gateway can move KV between them;
    # their NIXL side channels listen on consecutive ports from this one.
    kv_transfer: bool = False
    kv_transfer_base_port: int = Field(default=5600, ge=1024, le=65000)
    # Start one LMCache server (a shared KV store in host memory) and the engines with vLLM's
    # LMCacheMPConnector to it: a prefix any engine computed loads on the others.
    kv_store: bool = False
    kv_store_port: int = Field(default=5580, ge=1024, le=65000)
    kv_store_http_port: int = Field(default=5581, ge=1024, le=65000)
    kv_store_gib: float = Field(default=1.0, gt=0)
    startup_timeout_s: float = Field(default=300.0, gt=0)
    log_dir: str = ".cache/engine-logs"

    @field_validator("block_size")
    @classmethod
    def _cpu_block_size(cls, value: int) -> int:
        if value % 32:
            raise ValueError("vLLM's CPU backend needs a multiple of 32")
        return value


class ModelConfig(_Strict):
    name: str
    # Where the gateway gets token ids (gateway.tokenization.models): "auto" (the model's own
    # files where this host has them, else the engines), "engine" (the engines' /tokenize or
    # /render), or a local tokenizer directory or Hugging Face model id. Checked against the
    # engines' own tokenization before use.
    tokenizer: str = Field(default="auto", min_length=1)


class KVIndexConfig(_Strict):
    enabled: bool = True
    # The engines' KV block size (vLLM --block-size); keys line up with blocks. Unset, it is
    # read from the engines; set, an engine that disagrees is an error at start-up.
    block_size: int | None = Field(default=None, ge=1)
    backend: Literal["memory"] = "memory"
    # Upper bound on distinct chunk keys held (approximately least recently used beyond it:
    # gateway/kvindex/generations.py); ~80 bytes each held by one engine, ~180 by 256.
    capacity_chunks: int = Field(default=2_000_000, ge=1000)
    # Entries written at routing time, until the engine's own events arrive.
    speculative_ttl_s: float = Field(default=10.0, gt=0)
    # For engines without an event stream: what was routed there is assumed cached this long.
    approximate_ttl_s: float = Field(default=120.0, gt=0)
    # Working set: chunks routed to an engine within this window must fit its KV cache.
    working_set_window_s: float = Field(default=120.0, gt=0)
    # Prompts longer than this (characters) are tokenized in a worker thread.
    tokenize_offload_min_chars: int = Field(default=2048, ge=0)
    # A long prompt whose start no engine holds is tokenized only this far (to a word boundary):
    # chunk keys are chained, so the rest cannot match anywhere. 0: always tokenize whole.
    tokenize_head_chars: int = Field(default=256, ge=0)
    # vLLM replay sockets answer within this; a gap it cannot fill drops the engine's entries.
    replay_timeout_s: float = Field(default=2.0, gt=0)
    # Discover KV-event endpoints from GET /kv_event_sources for engines that list none.
    discover_event_sources: bool = True


class HealthConfig(_Strict):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    # Consecutive failed checks before an engine leaves rotation.
    unhealthy_threshold: int = Field(default=2, ge=1)
    # Consecutive passing checks before it comes back.
    healthy_threshold: int = Field(default=1, ge=1)


class OutlierDetectionConfig(_Strict):
    """Passive health (gateway.endpoints.outlier): engines that fail requests are ejected from
    rotation, for longer each time, and come back once a probe request succeeds."""

    # Failed answers (5xx, a stream cut mid-way) in a row that eject an engine. A refused
    # connection or a timeout ejects at once: each costs its client a long wait.
    consecutive_failures: int = Field(default=3, ge=1)
    # First ejection; each further one doubles it, up to `max_ejection_s`. An engine that stayed
    # in rotation for `max_ejection_s` starts again from `base_ejection_s`.
    base_ejection_s: float = Field(default=5.0, gt=0)
    max_ejection_s: float = Field(default=300.0, gt=0)
    # Never eject more than this share of the engines: past it, failing engines stay in rotation
    # (an ejection that would leave too few engines would turn a fault into an outage).
    max_ejected_fraction: float = Field(default=0.5, ge=0, le=1)
    # When an ejection ends, one small completion (1 token) must succeed within this before the
    # engine takes traffic again (half-open); if it does not, the engine is ejected again.
    probe_timeout_s: float = Field(default=10.0, gt=0)


class KVTransferConfig(_Strict):
    """Moving a cached prefix from the engine holding it to the one chosen (engine_adapter.transfer).
    Only engines marked `kv_transfer: true` take part, and only the `kv_aware` scorer plans
    transfers: it compares them with recomputing and with waiting for the holder."""

    enabled: bool = True
    # Prefixes shorter than this (tokens beyond what the target holds, or loads from its store) are not pulled.
    min_prefix_tokens: int = Field(default=512, ge=1)
    # Both transfer steps together; past it the request is recomputed on the target.
    timeout_s: float = Field(default=5.0, gt=0)


class ElasticConfig(_Strict):
    """Engines joining and leaving (gateway.elastic): a joining engine is warmed with the
    fleet's hottest recent prefixes before it takes traffic; a drained one first hands the
    hot prefixes only it holds to a peer. Both move KV over NIXL (engines with
    `kv_transfer: true`) and use the prefix index (a prefix-aware policy)."""

    warm_on_join: bool = True
    handoff_on_drain: bool = True
    # The prompts remembered with their token ids (the hottest are moved), and per prompt the
    # leading tokens kept (a longer prompt is remembered by its head).
    max_tracked_prefixes: int = Field(default=256, ge=1)
    max_prefix_tokens: int = Field(default=16384, ge=1)
    # A prompt's use count halves every `hot_half_life_s` seconds: "hot" means used lately.
    hot_half_life_s: float = Field(default=120.0, gt=0)
    # The budget of one join or drain: prefixes moved, tokens moved, seconds spent.
    max_prefixes: int = Field(default=32, ge=0)
    max_tokens: int = Field(default=262144, ge=0)
    max_s: float = Field(default=30.0, gt=0)


class ProxyConfig(_Strict):
    connect_timeout_s: float = Field(default=3.0, gt=0)
    # Longest silence allowed between two bytes from the engine (time to first byte included).
    # A non-streamed answer comes whole, so this is also its longest generation.
    read_timeout_s: float = Field(default=600.0, gt=0)
    # A streamed request whose engine sent no event this long after the request is abandoned
    # there (the engine aborts it) and retried on another engine: the client got no byte yet.
    first_byte_timeout_s: float = Field(default=60.0, gt=0)
    # A stream that then goes silent this long is ended with an in-band error (bytes reached
    # the client: no retry is possible) and the engine aborts the request.
    stream_idle_timeout_s: float = Field(default=30.0, gt=0)
    # Attempts on other engines after a failure that happened before any byte reached the client.
    max_retries: int = Field(default=2, ge=0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # A client's own chat template (`chat_template`, or in `chat_template_kwargs`) is Jinja code:
    # refused (400) unless allowed here; allowed, it is passed to the engine, never run here.
    allow_client_chat_templates: bool = False
    # The engines' HTTP client: the gateway's own HTTP/1.1 client (gateway.proxy.http1), or
    # aiohttp's, a general client that costs more per request.
    upstream_client: Literal["http1", "aiohttp"] = "http1"


class ScorerConfig(BaseModel):
    """One scorer of a policy: its registered name, weight, and its own parameters."""

    model_config = ConfigDict(extra="allow")

    name: str
    weight: float = Field(default=1.0, ge=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RoutingConfig(_Strict):
    # A preset name (prefix, kv_aware, round_robin, least_loaded, session) or None when
    # `scorers` is given. The default routes by cached prefix, capacity-aware, with a load release.
    policy: str | None = "prefix"
    scorers: list[ScorerConfig] | None = None
    # Header read by the session scorer (also usable by custom scorers).
    session_header: str = "x-session-id"

    @model_validator(mode="after")
    def _one_of(self) -> RoutingConfig:
        if self.scorers is not None and self.policy is not None and "policy" in self.model_fields_set:
            raise ValueError("give either `policy` (a preset) or `scorers`, not both")
        if self.scorers is not None:
            self.policy = None
        if self.policy is None and not self.scorers:
            raise ValueError("needs a `policy` preset or a non-empty `scorers` list")
        return self


class GatewayConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    engines: list[EngineConfig] = Field(default_factory=list)
    local_engines: LocalEnginesConfig | None = None
    models: list[ModelConfig] = Field(default_factory=list)
    kv_index: KVIndexConfig = Field(default_factory=KVIndexConfig)
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    elastic: ElasticConfig = Field(default_factory=ElasticConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    outlier_detection: OutlierDetectionConfig = Field(default_factory=OutlierDetectionConfig)

    @model_validator(mode="after")
    def _engines_present(self) -> GatewayConfig:
        if not self.engines and self.local_engines is None:
            raise ValueError("list at least one engine under `engines`, or set `local_engines`")
        names = [e.name for e in self.engines]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"engine names must be unique; repeated: {', '.join(duplicated)}")
        return self


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> GatewayConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def with_environment(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """Secrets from the environment rather than the file: GATEWAY_ADMIN_TOKEN replaces
    `server.admin_token`, GATEWAY_API_KEYS (comma-separated) adds to `server.api_keys`. An
    empty variable is as good as unset (docker compose passes unset ones as empty)."""
    environ = os.environ if environ is None else environ
    admin_token = environ.get("GATEWAY_ADMIN_TOKEN", "").strip()
    api_keys = [k.strip() for k in environ.get("GATEWAY_API_KEYS", "").split(",") if k.strip()]
    if not (admin_token or api_keys) or not isinstance(data, dict):
        return data
    server = dict(data.get("server") or {})
    if admin_token:
        server["admin_token"] = admin_token
    if api_keys:
        server["api_keys"] = [*(server.get("api_keys") or []), *api_keys]
    return {**data, "server": server}


def read_config_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(f"cannot read configuration {path}: {reason}") from None


def parse_config_text(text: str, source: str) -> GatewayConfig:
    """The YAML `text` of the file `source`, with the environment's secrets (`with_environment`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {exc}") from None
    return parse_config(with_environment(data), source)


def load_config(path: str | Path) -> GatewayConfig:
    return parse_config_text(read_config_text(path), str(path))
