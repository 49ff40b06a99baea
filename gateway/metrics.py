"""The gateway's own Prometheus metrics, on a registry owned by the app (no global state).

With several worker processes (`server.workers`), prometheus_client's multiprocess mode keeps
each worker's values in files under PROMETHEUS_MULTIPROC_DIR and `exposition()` adds them up;
each gauge says how (`multiprocess_mode`: in-flight counts are summed over live workers, a
readiness flag is the minimum, i.e. 1 only where every worker agrees)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests answered, by engine, model, route and HTTP status.",
            ["engine", "model", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "gateway_request_duration_seconds", "Time from request received to last byte sent.",
            ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time from request received to the first response byte sent to the client "
            "(time to first token for streaming requests).",
            ["model", "route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("gateway_engine_in_flight", "Requests in flight per engine.", ["engine"], registry=r,
                               multiprocess_mode="livesum")  # fmt: skip
        self.engine_healthy = Gauge("gateway_engine_healthy", "1 if the engine is in rotation.", ["engine"], registry=r,
                                    multiprocess_mode="livemin")  # fmt: skip
        self.routing_decisions = Counter(
            "gateway_routing_decisions", "Routing decisions by policy and chosen engine.",
            ["policy", "engine"], registry=r,
        )  # fmt: skip
        self.upstream_retries = Counter(
            "gateway_upstream_retries", "Requests retried on another engine, by reason.", ["reason"], registry=r
        )
        self.predicted_cached_tokens = Counter(
            "gateway_predicted_cached_tokens", "Prompt tokens the gateway predicted the engine had cached.",
            ["engine"], registry=r,
        )  # fmt: skip
        self.engine_cached_tokens = Counter(
            "gateway_engine_cached_tokens", "Prompt tokens the engine reported as cached (usage.prompt_tokens_details).",
            ["engine"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens of answered requests, as the engine counted them.",
            ["engine"], registry=r,
        )  # fmt: skip
        self.prediction_error = Histogram(
            "gateway_cached_tokens_prediction_error", "Engine-reported minus predicted cached tokens.",
            buckets=(-4096, -1024, -256, -64, -32, -1, 0, 32, 64, 256, 1024, 4096), registry=r,
        )  # fmt: skip
        self.predictions = Counter(
            "gateway_cached_tokens_predictions", "Checked predictions: within_one_block, under, over.",
            ["verdict"], registry=r,
        )  # fmt: skip
        self.tokenizer_ready = Gauge(
            "gateway_tokenizer_ready",
            "1 if the gateway tokenizes this model's prompts as its engines do (checked against their "
            "/tokenize); 0 if it cannot, and then requests for it route without prefix knowledge.",
            ["model"], registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.tokenization_failures = Counter(
            "gateway_tokenization_failures", "Requests routed without prefix knowledge: their prompt could "
            "not be tokenized.", ["model"], registry=r,
        )  # fmt: skip
        # gateway.limits: what a worker refused to protect itself and its other clients.
        self.rejections = Counter(
            "gateway_rejections", "Connections and requests refused or cut off by a server limit, by reason: "
            "connections, header_timeout, body_timeout, header_bytes, header_count, concurrency, key_concurrency, "
            "routing_backlog, event_loop_lag.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.client_disconnects = Counter(
            "gateway_client_disconnects", "Responses abandoned by the client mid-way.", ["route"], registry=r
        )
        # Passive health (gateway.endpoints.outlier).
        self.upstream_timeouts = Counter(
            "gateway_upstream_timeouts", "Engine requests abandoned for silence: first_byte (retried elsewhere) "
            "or stream_stall (ended with an in-band error).", ["engine", "kind"], registry=r,
        )  # fmt: skip
        self.ejections = Counter(
            "gateway_engine_ejections", "Engines taken out of rotation by outlier detection, by reason.",
            ["engine", "reason"], registry=r,
        )  # fmt: skip
        self.ejections_refused = Counter(
            "gateway_engine_ejections_refused", "Ejections not made: max_ejected_fraction engines were out.",
            ["engine"], registry=r,
        )  # fmt: skip
        self.probes = Counter(
            "gateway_engine_probes", "Half-open probes at the end of an ejection, by result (ok, failed).",
            ["engine", "result"], registry=r,
        )  # fmt: skip
        # KV transfers (gateway.proxy.transfer): attempted = succeeded + fell_back.
        self.kv_transfers = Counter(
            "gateway_kv_transfers", "KV transfers by outcome: attempted, succeeded, fell_back (recomputed).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.kv_transfer_failures = Counter(
            "gateway_kv_transfer_failures", "Transfers that fell back, by the step that failed.", ["stage"], registry=r
        )
        self.kv_transfer_tokens = Counter(
            "gateway_kv_transfer_tokens", "Prompt tokens whose KV was moved between engines.", ["source", "target"],
            registry=r,
        )  # fmt: skip
        self.kv_transfer_duration = Histogram(
            "gateway_kv_transfer_duration_seconds", "Both steps of a successful transfer, as the gateway timed them.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Saved time = recompute_estimated − transfer_estimated (as decided) and
        # recompute_estimated − observed (as it happened); counters cannot go negative.
        self.kv_transfer_ttft = Counter(
            "gateway_kv_transfer_ttft_seconds",
            "Time to first token of requests served after a transfer: recompute_estimated (the "
            "alternative), transfer_estimated (the plan), observed (transfer start to first byte).",
            ["kind"], registry=r,
        )  # fmt: skip
        # Elastic fleet (gateway.elastic): prefixes a join warmed or a drain handed over, by
        # outcome: pulled, failed, over_budget, in_store (the engine loads it from its store),
        # held (nothing to move), unheld (no engine that can give KV holds enough of it),
        # too_small (a pull would move fewer than kv_transfer.min_prefix_tokens).
        self.elastic_prefixes = Counter(
            "gateway_elastic_prefixes", "Hot prefixes considered when an engine joined or was drained, by outcome.",
            ["event", "outcome"], registry=r,
        )  # fmt: skip
        self.elastic_duration = Histogram(
            "gateway_elastic_duration_seconds", "Time a join's warm-up or a drain's hand-off took.", ["event"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Prefill/decode disaggregation (gateway.proxy.disaggregation). Outcomes: complete,
        # client_disconnected, upstream_failed, upstream_stalled (the decode engine's response, as
        # for any response), cancelled (the client left during the prefill), prefill_failed
        # (served unified instead), decode_failed (the decode engine failed before its first
        # byte: retried unified).
        self.disaggregated_requests = Counter(
            "gateway_disaggregated_requests", "Requests served with prefill and decode on two engines, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.disaggregated_engine_requests = Counter(
            "gateway_disaggregated_engine_requests", "Disaggregated requests sent to an engine, by phase "
            "(prefill, decode) and engine.", ["phase", "engine"], registry=r,
        )  # fmt: skip
        self.disaggregated_prefill_duration = Histogram(
            "gateway_disaggregated_prefill_duration_seconds", "A successful prefill step, sent to answered.",
            ["engine"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

        # Configuration reloads (gateway.reload), counted by every worker process that reads the file.
        self.config_reloads = Counter(
            "gateway_config_reloads", "Configuration reloads by result: applied, unchanged (nothing to change), "
            "refused (invalid; the running configuration stays).", ["result"], registry=r,
        )  # fmt: skip

    def close(self) -> None:
        """This process is ending: its live gauges leave the workers' sums."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        """The text for GET /metrics: this process's metrics, or every worker's together."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(combined))
        return bytes(generate_latest(self.registry))
