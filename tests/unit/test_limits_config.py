"""`limits:` and `server.api_keys` entries in the YAML, and the caps fitted to the open-file
limit (gateway.limits.open_files). The limits themselves, over sockets: test_limits.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.config import ConfigError, LimitsConfig, parse_config, with_environment
from gateway.limits.open_files import FDS_PER_ENGINE, RESERVED_FDS, fds_needed, fit_to_open_files

ENGINES = [{"name": "a", "url": "http://a"}]


def test_api_keys_may_be_plain_keys_or_carry_their_own_cap() -> None:
    data = {"engines": ENGINES, "server": {"api_keys": [
        "k-plain-0123456789", {"key": "k-batch-0123456789", "max_concurrent_requests": 8}]}}  # fmt: skip
    keys = parse_config(with_environment(data, {"GATEWAY_API_KEYS": "k-env-0123456789,k-batch-0123456789"})).server.api_keys
    # The environment adds plain keys; the one also in the file keeps the file's cap.
    assert [(k.key, k.max_concurrent_requests) for k in keys] == [
        ("k-plain-0123456789", None), ("k-batch-0123456789", 8), ("k-env-0123456789", None)]  # fmt: skip


@pytest.mark.parametrize(("keys", "fragment"), [
    (["k-0123456789", {"key": "k-0123456789", "max_concurrent_requests": 2},
      {"key": "k-0123456789", "max_concurrent_requests": 3}], "listed twice"),
    ([{"key": "change-me"}], "placeholder"),
    ([{"key": "k-0123456789", "max_concurrent_requests": 0}], "server.api_keys.0.max_concurrent_requests"),
    ([{"key": "k-0123456789", "limit": 2}], "server.api_keys.0.limit"),
    ([7], "server.api_keys.0"),
])  # fmt: skip
def test_bad_api_key_entries_are_named(keys: list[object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        parse_config({"engines": ENGINES, "server": {"api_keys": keys}})


def test_keep_alive_may_not_outlast_the_header_timeout() -> None:
    with pytest.raises(ConfigError, match="keep_alive_timeout_s"):
        parse_config({"engines": ENGINES, "limits": {"header_read_timeout_s": 2, "keep_alive_timeout_s": 3}})
    # Its default gives way to a short header timeout.
    assert parse_config({"engines": ENGINES, "limits": {"header_read_timeout_s": 2}}).limits.keep_alive_timeout_s == 2


def test_the_configuration_survives_the_trip_to_the_workers() -> None:
    """gateway.workers writes the resolved configuration as JSON for the workers to parse."""
    data = {"engines": ENGINES, "limits": {"max_connections": 10, "max_concurrent_requests_per_key": 2},
            "server": {"api_keys": ["k-a-0123456789", {"key": "k-b-0123456789", "max_concurrent_requests": 5}]}}  # fmt: skip
    config = parse_config(data)
    assert parse_config(json.loads(json.dumps(config.model_dump(mode="json")))) == config


def test_caps_that_fit_the_open_file_limit_are_kept() -> None:
    limits = LimitsConfig()
    assert fit_to_open_files(limits, fds_needed(limits, 4), 4) is limits


def test_caps_beyond_the_open_file_limit_are_lowered_in_proportion() -> None:
    limits = LimitsConfig(max_connections=4000, max_concurrent_requests=1000)
    fitted = fit_to_open_files(limits, 1024, 2)
    # Room: 1024 - 160 - 2 × 8 = 848 descriptors for connections + 2 × requests.
    assert fitted.max_connections + 2 * fitted.max_concurrent_requests <= 1024 - RESERVED_FDS - 2 * FDS_PER_ENGINE
    assert (fitted.max_connections, fitted.max_concurrent_requests) == (565, 141)  # 4:1 as configured
    # A limit with no room at all still serves one request on one connection.
    starved = fit_to_open_files(limits, 64, 2)
    assert (starved.max_connections, starved.max_concurrent_requests) == (1, 1)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    code = """
import logging, resource, sys
from gateway.limits.open_files import raise_open_files_limit
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
print(raise_open_files_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "True"
    assert "open-file limit raised from 256 to" in out
