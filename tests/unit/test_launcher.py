"""The command line and environment the launcher gives a local engine (no engine started)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from engine_adapter.launch.kv_store import KVStoreSpec
from engine_adapter.launch.launcher import NIXL_TRANSFER_CONFIG, EngineSpec, local_specs
from engine_adapter.launch.process import kill_group, shared_memory_of_group


def args_after(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_engines_with_kv_transfer_load_the_nixl_connector_through_our_module() -> None:
    spec = EngineSpec(name="e", model_dir="/m", served_model_name="m", port=8100, kv_transfer_port=5601)
    config = json.loads(args_after(spec.command(), "--kv-transfer-config"))
    assert config["kv_connector"] == "NixlConnector" and config["kv_role"] == "kv_both"
    assert config["kv_connector_module_path"] == "engine_adapter.transfer.vllm_nixl"
    env = spec.environment()
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601" and env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == spec.host
    assert "tcp" in env["UCX_TLS"]


def test_engines_without_kv_transfer_have_no_connector() -> None:
    spec = EngineSpec(name="e", model_dir="/m", served_model_name="m", port=8100)
    assert "--kv-transfer-config" not in spec.command()


def test_local_specs_give_each_engine_its_own_side_channel_port_and_core() -> None:
    specs = local_specs(2, model_dir="/m", served_model_name="m", kv_transfer_base_port=5600)
    assert [s.kv_transfer_port for s in specs] == [5600, 5601]
    assert len({s.port for s in specs}) == 2 and len({s.kv_events_port for s in specs}) == 2
    assert [s.kv_transfer_port for s in local_specs(2, model_dir="/m", served_model_name="m")] == [None, None]


def test_engines_attached_to_a_kv_store_run_lmcaches_connector_to_it() -> None:
    spec = EngineSpec(name="e", model_dir="/m", served_model_name="m", port=8100, kv_store_port=5580)
    config = json.loads(args_after(spec.command(), "--kv-transfer-config"))
    assert config["kv_connector"] == "LMCacheMPConnector" and config["kv_role"] == "kv_both"
    assert config["kv_connector_extra_config"] == {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5580}
    env = spec.environment()
    assert env["LMCACHE_TRACK_USAGE"] == "false" and env["DO_NOT_TRACK"] == "1"
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
    specs = local_specs(2, model_dir="/m", served_model_name="m", kv_store_port=5580)
    assert [s.kv_store_port for s in specs] == [5580, 5580]


def test_nixl_and_a_kv_store_run_in_one_multi_connector_nixl_first() -> None:
    spec = EngineSpec(name="e", model_dir="/m", served_model_name="m", port=8100, kv_transfer_port=5601, kv_store_port=5580)
    assert spec.command().count("--kv-transfer-config") == 1
    config = json.loads(args_after(spec.command(), "--kv-transfer-config"))
    assert config["kv_connector"] == "MultiConnector" and config["kv_buffer_device"] == "cpu"
    nixl, store = config["kv_connector_extra_config"]["connectors"]
    assert nixl == NIXL_TRANSFER_CONFIG
    assert store["kv_connector"] == "LMCacheMPConnector" and store["kv_connector_extra_config"]["lmcache.mp.port"] == 5580
    env = spec.environment()
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601" and env["LMCACHE_TRACK_USAGE"] == "false"
    assert spec.confine_to_cores is False and replace(spec, cpu_bind="0").confine_to_cores


def test_the_kv_store_command_is_lmcaches_server_in_the_fast_transfer_mode() -> None:
    spec = KVStoreSpec("local", port=5580, http_port=5581, l1_size_gib=2)
    command = spec.command()
    assert command[0].endswith("/lmcache") and command[1] == "server"
    assert args_after(command, "--port") == "5580" and args_after(command, "--http-port") == "5581"
    assert args_after(command, "--chunk-size") == "256" and args_after(command, "--l1-size-gb") == "2"
    assert args_after(command, "--eviction-policy") == "LRU"
    assert args_after(command, "--supported-transfer-mode") == "auto" and args_after(command, "--shm-name")
    assert args_after(command, "--kv-event-log-size") == "0"
    assert spec.environment()["LMCACHE_TRACK_USAGE"] == "false"


_CHILD = """
import sys, time
from multiprocessing import shared_memory
mine = shared_memory.SharedMemory(create=True, size=4096)
print(mine.name, flush=True)
time.sleep(60)
"""


def _start_child_with_shared_memory() -> tuple[subprocess.Popen[bytes], Path]:
    """A process in its own group that created a /dev/shm segment and keeps it mapped."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout is not None
    name = child.stdout.readline().decode().strip()
    return child, Path("/dev/shm") / name


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_a_killed_group_leaves_no_shared_memory_nobody_maps() -> None:
    child, path = _start_child_with_shared_memory()
    assert path.exists() and str(path) in shared_memory_of_group(child.pid)
    kill_group(child, "test child")
    assert child.poll() is not None and not path.exists()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_shared_memory_another_process_still_maps_is_kept() -> None:
    child, path = _start_child_with_shared_memory()
    kept = shared_memory.SharedMemory(name=path.name)  # this process maps it too
    try:
        kill_group(child, "test child")
        assert child.poll() is not None and path.exists()
    finally:
        kept.close()
        kept.unlink()
