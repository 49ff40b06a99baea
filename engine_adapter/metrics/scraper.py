"""Turn a vLLM `/metrics` page (Prometheus text) into the few numbers routing needs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0  # fraction 0..1
    prefix_cache_queries: float = 0.0  # tokens queried, cumulative
    prefix_cache_hits: float = 0.0  # tokens hit, cumulative
    # Cumulative prompt tokens by source: local_cache_hit, local_compute, external_kv_transfer.
    prompt_tokens_by_source: dict[str, float] = field(default_factory=dict)
    # Seconds NIXL spent reading KV into this engine (vllm:nixl_xfer_time_seconds), cumulative.
    nixl_xfer_seconds: float = 0.0
    # From vllm:cache_config_info: KV-cache capacity in blocks, and the block size.
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    # The API server's start time: a change means the engine restarted (cache empty).
    process_start_time: float | None = None
    scraped_at: float = 0.0  # time.monotonic()


# vLLM names gauges with a `vllm:` prefix; counters appear as `<name>_total` samples.
_GAUGES = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}
_COUNTERS = {
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:nixl_xfer_time_seconds_sum": "nixl_xfer_seconds",
}


def parse_engine_metrics(text: str, now: float | None = None) -> EngineStats:
    """Sum each metric over its label sets (data-parallel ranks, model names)."""
    values: dict[str, float] = {}
    by_source: dict[str, float] = {}
    info: dict[str, str] = {}
    start_time: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _GAUGES:
                key = _GAUGES[sample.name]
            elif sample.name in _COUNTERS:
                key = _COUNTERS[sample.name]
            elif sample.name == "process_start_time_seconds":
                start_time = sample.value
                continue
            elif sample.name == "vllm:cache_config_info":
                info.update(sample.labels)
                continue
            elif sample.name == "vllm:prompt_tokens_by_source_total":
                source = sample.labels.get("source", "unknown")
                by_source[source] = by_source.get(source, 0.0) + sample.value
                continue
            else:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return EngineStats(
        **values,
        prompt_tokens_by_source=by_source,
        num_gpu_blocks=_int_label(info, "num_gpu_blocks"),
        block_size=_int_label(info, "block_size"),
        process_start_time=start_time,
        scraped_at=time.monotonic() if now is None else now,
    )


def _int_label(labels: dict[str, str], name: str) -> int | None:
    try:
        return int(labels[name])
    except (KeyError, ValueError):
        return None
