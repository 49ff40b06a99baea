"""Configuration reload as users do it: `python -m gateway --config FILE` in front of real CPU
engines, the file rewritten, SIGHUP sent; with one worker process and with two."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import MODEL_NAME, ROOT
from tests.harness import GatewayProcess
from tests.integration.test_prefix_routing import wait_until

pytestmark = pytest.mark.integration

LOG_DIR = ROOT / ".cache" / "test-engine-logs" / "reload"


def served_by(gateway: GatewayProcess, prompt: str) -> str:
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1},
                      timeout=60)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp.headers["x-gateway-engine"]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_file_is_reloaded_when_it_changes_and_on_sighup(
    engine_configs: list[dict[str, Any]], model_configs: list[dict[str, Any]], workers: int
) -> None:
    first, second = [e for e in engine_configs if e["name"] in ("engine-0", "engine-1")]
    polled = {"workers": workers, "config_poll_interval_s": 0.2}
    # From the second file on, polling is off: only SIGHUP reads the file.
    on_sighup = {"workers": workers, "config_poll_interval_s": 0}
    with GatewayProcess({"engines": [first], "models": model_configs, "server": polled},
                        LOG_DIR / f"gateway-{workers}-workers.log") as gateway:  # fmt: skip

        def reloads(result: str) -> float:
            return gateway.metric("gateway_config_reloads_total", result=result)

        workers_before = {p.pid for p in psutil.Process(gateway.pid).children()}
        assert {served_by(gateway, f"before {workers} {i}") for i in range(3)} == {first["name"]}

        # 1. An engine added to the file (seen by polling) takes requests.
        gateway.write_config({"engines": [first, second], "models": model_configs, "server": on_sighup})
        wait_until(lambda: reloads("applied") == workers, 30, "every worker to apply the new file")
        assert httpx.get(f"{gateway.url}/health").json()["engines_total"] == 2
        prompts = iter(range(100))
        wait_until(lambda: served_by(gateway, f"added {workers} {next(prompts)}") == second["name"], 60,
                   "a request to reach the added engine")  # fmt: skip

        # 2. Another policy, read on SIGHUP.
        round_robin = {"engines": [first, second], "models": model_configs, "server": on_sighup,
                       "routing": {"policy": "round_robin"}}  # fmt: skip
        gateway.write_config(round_robin)
        gateway.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads("applied") == 2 * workers, 30, "every worker to apply the policy")
        assert gateway.running()
        engines = {served_by(gateway, f"round robin {workers} {i}") for i in range(2 * workers)}
        assert gateway.metric("gateway_routing_decisions_total", policy="round_robin") == 2 * workers
        assert engines == {first["name"], second["name"]}

        # 3. A file that cannot run is refused; the gateway serves on with the running one.
        gateway.write_config({**round_robin, "routing": {"policy": "fastest"}})
        gateway.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads("refused") == workers, 30, "every worker to refuse the file")
        assert gateway.running()
        engines = {served_by(gateway, f"after refusal {workers} {i}") for i in range(2 * workers)}
        assert gateway.metric("gateway_routing_decisions_total", policy="round_robin") == 4 * workers
        assert engines == {first["name"], second["name"]}
        log = (LOG_DIR / f"gateway-{workers}-workers.log").read_text()
        refusals = [line for line in log.splitlines() if "configuration reload (SIGHUP) refused" in line]
        assert len(refusals) >= workers and all("routing.policy: unknown preset 'fastest'" in r for r in refusals)

        # 4. An engine removed: no request reaches it any more.
        gateway.write_config({**round_robin, "engines": [second]})
        gateway.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads("applied") == 3 * workers, 30, "every worker to apply the removal")
        assert {served_by(gateway, f"removed {workers} {i}") for i in range(2 * workers)} == {second["name"]}
        assert httpx.get(f"{gateway.url}/health").json()["engines_total"] == 1

        # SIGHUP reloaded the workers in place: none was restarted (uvicorn's own SIGHUP would).
        assert {p.pid for p in psutil.Process(gateway.pid).children()} == workers_before
