"""What `local_engines:` starts (gateway.cli), with the processes replaced by a recorder."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_adapter.launch import launcher, tiny_model
from engine_adapter.launch.kv_store import KVStoreSpec
from gateway.cli import LOCAL_KV_STORE, local_engine_configs
from gateway.config import LocalEnginesConfig


class RecordedFleet:
    started: list[RecordedFleet] = []

    def __init__(self, specs: list[launcher.EngineSpec], log_dir: str | Path, kv_store: KVStoreSpec | None = None) -> None:
        self.specs, self.kv_store = specs, kv_store

    def start(self, timeout_s: float) -> None:
        RecordedFleet.started.append(self)


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordedFleet.started.clear()
    monkeypatch.setattr(launcher, "EngineFleet", RecordedFleet)
    monkeypatch.setattr(tiny_model, "ensure_tiny_model", lambda path: Path(path))


def test_kv_store_starts_one_lmcache_server_and_attaches_every_engine_to_it() -> None:
    local = LocalEnginesConfig(count=2, kv_store=True, kv_store_port=6001, kv_store_http_port=6002, kv_store_gib=2)
    engines, _ = local_engine_configs(local)
    (fleet,) = RecordedFleet.started
    assert fleet.kv_store == KVStoreSpec(LOCAL_KV_STORE, 6001, 6002, host="127.0.0.1", l1_size_gib=2)
    assert [s.kv_store_port for s in fleet.specs] == [6001, 6001]
    assert all(s.kv_transfer_port is None for s in fleet.specs)
    assert [e.kv_store for e in engines] == [LOCAL_KV_STORE, LOCAL_KV_STORE]


def test_without_kv_store_there_is_no_server_and_no_store_for_the_index() -> None:
    engines, _ = local_engine_configs(LocalEnginesConfig(count=2))
    (fleet,) = RecordedFleet.started
    assert fleet.kv_store is None and all(s.kv_store_port is None for s in fleet.specs)
    assert all(e.kv_store is None for e in engines)


def test_kv_store_and_nixl_together_give_every_engine_both() -> None:
    local = LocalEnginesConfig(count=2, kv_transfer=True, kv_transfer_base_port=6100, kv_store=True, kv_store_port=6001)
    engines, _ = local_engine_configs(local)
    (fleet,) = RecordedFleet.started
    assert fleet.kv_store is not None
    assert [(s.kv_transfer_port, s.kv_store_port) for s in fleet.specs] == [(6100, 6001), (6101, 6001)]
    assert all(e.kv_transfer and e.kv_store == LOCAL_KV_STORE for e in engines)
