"""Session-wide fixtures. Real CPU vLLM engines are slow to start (about a minute), so the
whole run shares one fleet; tests that break an engine restore it before they return."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine_adapter.launch.launcher import EngineFleet, EngineSpec, local_specs
from engine_adapter.launch.process import remove_unmapped
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "tiny-llama"
EMBED_MODEL_NAME = "tiny-embed"
BLOCK_SIZE = 32
KV_BLOCKS_PER_ENGINE = 320
MAX_MODEL_LEN = 8192


SHARED_MEMORY_DIR = Path("/dev/shm")


def _shared_memory_files() -> set[str]:
    try:
        return {entry.path for entry in os.scandir(SHARED_MEMORY_DIR)}
    except OSError:  # no /dev/shm (not Linux)
        return set()


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left() -> Iterator[None]:
    """Set up first, torn down last: the /dev/shm files that appeared during the run and that
    no live process maps any more are removed. A vLLM process that dies by SIGKILL (a test's
    crashed engine core, an engine stopped the hard way) leaves its message queues there
    (160 MB each) and multiprocessing's semaphores; a run left one queue and two semaphores."""
    before = _shared_memory_files()
    yield
    remove_unmapped(_shared_memory_files() - before)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from engine_adapter.launch.tiny_model import ensure_tiny_model

    return ensure_tiny_model(ROOT / ".cache" / "tiny-llama")


@pytest.fixture(scope="session")
def engine_fleet(tiny_model_dir: Path) -> Iterator[EngineFleet]:
    specs = local_specs(
        2,
        model_dir=str(tiny_model_dir),
        served_model_name=MODEL_NAME,
        base_port=free_port(),
        kv_events_base_port=5557,  # replaced by free ports below
        max_model_len=MAX_MODEL_LEN,
        # A small KV cache (10,240 tokens) so tests can fill it: eviction, capacity spreading.
        num_gpu_blocks_override=KV_BLOCKS_PER_ENGINE,
        # Engines keep Responses API responses (previous_response_id, GET /v1/responses/{id}).
        extra_env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"},
    )
    # An embeddings engine (same weights, pooling runner) proves /v1/embeddings routing.
    specs.append(
        EngineSpec(
            name="embed-0",
            model_dir=str(tiny_model_dir),
            served_model_name=EMBED_MODEL_NAME,
            port=0,
            max_model_len=2048,
            cpu_bind="1" if (os.cpu_count() or 1) > 1 else "0",
            extra_args=("--runner", "pooling", "--convert", "embed"),
        )
    )
    # Consecutive ports from one free port may collide; give each engine its own.
    specs = [_with_ports(s) for s in specs]
    fleet = EngineFleet(specs, ROOT / ".cache" / "test-engine-logs")
    fleet.start(timeout_s=float(os.environ.get("ENGINE_STARTUP_TIMEOUT_S", "400")))
    try:
        yield fleet
    finally:
        fleet.stop()


def _with_ports(spec: EngineSpec) -> EngineSpec:
    events = None if spec.kv_events_port is None else free_port()
    return replace(spec, port=free_port(), kv_events_port=events)


@contextmanager
def nixl_fleet_running(model_dir: Path, num_engines: int, log_dir: str, timeout_s: float) -> Iterator[EngineFleet]:
    """`num_engines` local CPU engines with NIXL KV transfer, started and, at the end, stopped."""
    specs = local_specs(
        num_engines, model_dir=str(model_dir), served_model_name=MODEL_NAME, base_port=free_port(),
        max_model_len=MAX_MODEL_LEN, kv_transfer_base_port=free_port(),
    )  # fmt: skip
    # Consecutive side-channel ports from one free port may collide: one free port each.
    specs = [replace(_with_ports(s), kv_transfer_port=free_port()) for s in specs]
    fleet = EngineFleet(specs, ROOT / ".cache" / "test-engine-logs" / log_dir)
    fleet.start(timeout_s=timeout_s)
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="session")
def model_configs(tiny_model_dir: Path) -> list[dict[str, Any]]:
    """The gateway tokenizes locally with the files the engines load."""
    return [{"name": MODEL_NAME, "tokenizer": str(tiny_model_dir)}]


@pytest.fixture(scope="session")
def engine_configs(engine_fleet: EngineFleet) -> list[dict[str, Any]]:
    return [
        {"name": e.spec.name, "url": e.spec.url, "kv_events_endpoint": e.spec.kv_events_endpoint}
        for e in engine_fleet.engines
    ]
