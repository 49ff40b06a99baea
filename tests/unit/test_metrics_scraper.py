from __future__ import annotations

from engine_adapter.metrics import parse_engine_metrics

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 640.0
# TYPE vllm:prompt_tokens_by_source counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 360.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 640.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.0
"""


def test_parses_vllm_metrics_summing_ranks() -> None:
    stats = parse_engine_metrics(VLLM_METRICS, now=5.0)
    assert stats.num_requests_running == 3.0
    assert stats.num_requests_waiting == 4.0
    assert stats.kv_cache_usage == 0.25
    assert stats.prefix_cache_queries == 1000.0 and stats.prefix_cache_hits == 640.0
    assert stats.prompt_tokens_by_source == {"local_compute": 360.0, "local_cache_hit": 640.0, "external_kv_transfer": 0.0}
    assert stats.scraped_at == 5.0


def test_empty_page_gives_zeros() -> None:
    stats = parse_engine_metrics("")
    assert stats.num_requests_running == 0.0 and stats.prompt_tokens_by_source == {}
