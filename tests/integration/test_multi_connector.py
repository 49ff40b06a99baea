"""Two real CPU engines each running NIXL and LMCache's connector in one vLLM MultiConnector,
attached to one LMCache server: a prefix engine A computed loads on B from the store (no NIXL
read), and the NIXL pull flow moves another from A to B (one NIXL read), on the same engines."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from engine_adapter.launch.kv_store import CHUNK_SIZE_TOKENS, KVStoreSpec
from engine_adapter.launch.launcher import EngineFleet, local_specs
from engine_adapter.metrics import parse_engine_metrics
from engine_adapter.transfer.nixl import EngineAddress, NixlPullTransfer
from tests.conftest import MODEL_NAME, ROOT
from tests.harness import free_port

pytestmark = pytest.mark.integration

PREFIX_TOKENS = 4 * CHUNK_SIZE_TOKENS


@pytest.fixture(scope="module")
def urls(tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    store = KVStoreSpec("test-multi", port=free_port(), http_port=free_port(), l1_size_gib=1)
    specs = local_specs(
        2, model_dir=str(tiny_model_dir), served_model_name=MODEL_NAME, base_port=free_port(), max_model_len=4096,
        kv_events_base_port=None, kv_store_port=store.port, kv_transfer_base_port=free_port(),
    )  # fmt: skip
    specs = [replace(s, port=free_port(), kv_transfer_port=free_port()) for s in specs]
    assert all((s.kv_transfer_config() or {}).get("kv_connector") == "MultiConnector" for s in specs)
    fleet = EngineFleet(specs, ROOT / ".cache" / "test-engine-logs" / "multi-connector", kv_store=store)
    fleet.start(timeout_s=400)
    try:
        yield specs[0].url, specs[1].url
    finally:
        fleet.stop()


def cached_tokens(url: str, prompt: list[int]) -> int:
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1,
                                                     "temperature": 0}, timeout=120)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def nixl_seconds(url: str) -> float:
    return parse_engine_metrics(httpx.get(f"{url}/metrics", timeout=10).text).nixl_xfer_seconds


def fresh(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 4000) for _ in range(n)]


def test_a_prefix_a_computed_loads_on_b_from_the_store_not_over_nixl(urls: tuple[str, str]) -> None:
    a, b = urls
    prefix = fresh(random.Random(1), PREFIX_TOKENS)
    assert cached_tokens(a, prefix) == 0
    before = nixl_seconds(b)
    assert cached_tokens(b, prefix + fresh(random.Random(2), 16)) == PREFIX_TOKENS
    assert nixl_seconds(b) == before


def test_the_nixl_pull_flow_moves_a_prefix_from_a_to_b(urls: tuple[str, str]) -> None:
    a, b = urls
    prefix = fresh(random.Random(3), PREFIX_TOKENS)
    assert cached_tokens(a, prefix) == 0
    before = nixl_seconds(b)

    async def pull() -> None:
        async with httpx.AsyncClient() as client:
            await NixlPullTransfer(client).transfer(EngineAddress(a), EngineAddress(b), MODEL_NAME, prefix,
                                                    timeout_s=60, request_id="multi-connector-pull")  # fmt: skip

    asyncio.run(pull())
    assert nixl_seconds(b) > before
    assert cached_tokens(b, prefix + fresh(random.Random(4), 16)) == PREFIX_TOKENS
