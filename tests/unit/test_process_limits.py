"""What the server process does for many connections: its open-file limit raised to the hard
one (gateway.cli), and what start-up built kept out of the garbage collector's full passes
(gateway.app.freeze_long_lived)."""

from __future__ import annotations

import gc
import logging
import resource
from collections.abc import Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from gateway.app import build_app
from gateway.cli import raise_open_file_limit
from gateway.config import parse_config
from tests.unit.fake_engines import Engines


class Limits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.soft, self.hard = limits


@pytest.fixture()
def limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[Limits]:
    fake = Limits(1024, 524288)
    monkeypatch.setattr(resource, "getrlimit", fake.get)
    monkeypatch.setattr(resource, "setrlimit", fake.set)
    yield fake


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(limits: Limits, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert raise_open_file_limit() == 524288
    assert (limits.soft, limits.hard) == (524288, 524288)
    assert "raised from 1024 to 524288" in caplog.text and "WARNING" not in caplog.text


def test_a_low_hard_limit_or_a_refusal_is_said_with_the_streams_it_allows(
    limits: Limits, caplog: pytest.LogCaptureFixture
) -> None:
    limits.hard = 1024
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert raise_open_file_limit() == 1024
    assert "open-file limit 1024: about 480 concurrent streams" in caplog.text
    caplog.clear()
    limits.hard, limits.refuse = 65536, True
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert raise_open_file_limit() == 1024
    assert "cannot raise the open-file limit from 1024 to 65536" in caplog.text


def test_unlimited_is_left_alone(limits: Limits) -> None:
    limits.soft = limits.hard = resource.RLIM_INFINITY
    assert raise_open_file_limit() is None


def test_the_server_freezes_what_start_up_built(engines: Engines) -> None:
    config = parse_config({"engines": [{"name": "a", "url": "http://a"}], "health": {"interval_s": 600},
                           "models": [{"name": "m", "tokenizer": engines.root}]})  # fmt: skip
    gc.unfreeze()
    try:
        with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler))):
            assert gc.get_freeze_count() == 0  # tests and embedders: untouched
        with TestClient(build_app(config, transport=httpx.MockTransport(engines.handler), freeze_gc=True)) as client:
            assert gc.get_freeze_count() > 0
            assert client.post("/v1/completions", json={"model": "m", "prompt": "hi"}).status_code == 200
    finally:
        gc.unfreeze()
