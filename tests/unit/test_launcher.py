"""The command line and environment the launcher gives a local engine (no engine started)."""

from __future__ import annotations

import json

from engine_adapter.launch.launcher import EngineSpec, local_specs


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
