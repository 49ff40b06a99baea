"""The drain benchmark's accounting (bench/elastic_drain.py) on made-up samples: what counts as
recomputed, which request is a prefix's first after the drain, and the headline."""

from __future__ import annotations

import argparse
import random

from bench.elastic_common import Sample
from bench.elastic_drain import Run, phase, prefix_of, report


def sample(at: float, ttft_s: float, prefix: str, prompt_tokens: int, cached: int) -> Sample:
    return Sample(at, ttft_s, "b", prompt_tokens, cached, prefix + " question x")


def test_phases_interleave_the_prefixes_and_each_prompt_names_its_prefix() -> None:
    prompts = phase(random.Random(1), ["p one", "p two"], 2)
    assert [prefix_of(p) for p in prompts] == ["p one", "p two", "p one", "p two"]


def test_recomputed_tokens_and_the_first_requests_of_the_drained_engines_prefixes() -> None:
    plain = Run(drained="a", alone={"pa"}, after=[
        sample(0.0, 0.2, "pa", 1000, 0), sample(0.1, 0.05, "pb", 1000, 960), sample(0.2, 0.04, "pa", 1000, 960),
    ], busy={"a": 0.0, "b": 1.0}, idle={"a": 0.0, "b": 0.1})  # fmt: skip
    hand = Run(drained="a", alone={"pa"}, hand_off={"prefixes_pulled": 1, "tokens_moved": 960}, after=[
        sample(0.0, 0.05, "pa", 1000, 960), sample(0.1, 0.05, "pb", 1000, 960), sample(0.2, 0.04, "pa", 1000, 960),
    ], busy={"a": 0.0, "b": 1.0}, idle={"a": 0.0, "b": 0.1})  # fmt: skip
    assert plain.recomputed() == 1080 and plain.recomputed(only_alone=True) == 1040
    assert plain.first_ttfts() == [0.2] and hand.first_ttfts() == [0.05]
    args = argparse.Namespace(groups=2, prefix_words=10, rounds=1, concurrency=1, settle_s=0.0)
    text = report({"plain drain": plain, "hand-off": hand}, args)
    assert "recompute avoided 960 prompt tokens (1080 recomputed vs 120; 960 per prefix" in text
    assert "first request of A's prefixes 4.00x" in text
    assert "| hand-off | 1 (+0) | 1 | 960 |" in text
