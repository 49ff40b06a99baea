"""`python -m gateway` as `make run` uses it: local engines, serve, stop everything on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import MODEL_NAME
from tests.harness import free_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"engines": [{"name": "e", "url": "nowhere"}]}, "engines.0.url"),
        ({"engines": [{"name": "e", "url": "http://e"}], "routing": {"policy": "fastest"}}, "routing.policy"),
        ({"engines": [{"name": "e", "url": "http://e"}], "routing": {"scorers": [{"name": "magic"}]}},
         "routing.scorers.0.name"),
    ],
)  # fmt: skip
def test_bad_config_exits_with_a_clear_message(tmp_path: Path, config: dict[str, object], named: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert named in result.stderr and "Traceback" not in result.stderr


def test_local_engines_start_serve_and_stop_on_sigterm(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "local_engines": {
            "count": 1, "base_port": free_port(), "kv_events_base_port": free_port(),
            "model_dir": str(tiny_model_dir), "log_dir": str(tmp_path / "logs"), "max_model_len": 2048,
        },
    }  # fmt: skip
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, "gateway exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        # The engine runs in its own process group, so look it up by its command line.
        engines = [p for p in psutil.process_iter(["cmdline"]) if str(config["local_engines"]["base_port"]) in " ".join(p.info["cmdline"] or [])]  # type: ignore[index]
        assert engines, "no engine process found"
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                          json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=30)  # fmt: skip
        assert resp.status_code == 200 and resp.headers["x-gateway-engine"] == "engine-0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children + engines, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
