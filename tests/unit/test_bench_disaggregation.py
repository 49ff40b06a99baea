"""The disaggregation benchmark (bench/disaggregation.py) end to end at a tiny scale against
two fake engines (bench/fake_engine.py answers vLLM's prefill request with
`kv_transfer_params`), so the benchmark cannot rot."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from bench.disaggregation import bench, report
from bench.fake_engine import FakeEngine
from tests.harness import fake_engine_in_thread


def test_the_benchmark_runs_both_modes_on_the_same_engines(tiny_model_dir: Path) -> None:
    fakes = [FakeEngine("tiny-llama", str(tiny_model_dir), tokens=4, inter_token_s=0.002) for _ in range(2)]
    args = argparse.Namespace(prompt_tokens=64, output_tokens=4, requests=2, concurrency="1")
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(fake_engine_in_thread(fake)) for fake in fakes]
        runs = asyncio.run(bench(urls, str(tiny_model_dir), args))
    assert [(r.mode, r.concurrency) for r in runs] == [("unified", 1), ("disaggregated", 1)]
    unified, disaggregated = runs
    assert disaggregated.engines == {"bench-pd-0->bench-pd-1": 2}
    assert set(unified.engines) <= {"bench-pd-0", "bench-pd-1"} and sum(unified.engines.values()) == 2
    for run in runs:
        assert len(run.ttft) == 2 and len(run.itl) == 2 * 3 and run.tokens == 8
    text = report(runs, args)
    assert "| disaggregated | 1 |" in text and "| unified | 1 |" in text
