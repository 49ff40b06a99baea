"""Fixtures of the unit tests that drive the whole app against fake engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tokenization.tokenizer import HFPromptTokenizer
from tests.unit.fake_engines import Engines


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> HFPromptTokenizer:
    return HFPromptTokenizer(tiny_model_dir)


@pytest.fixture()
def engines(tokenizer: HFPromptTokenizer, tiny_model_dir: Path) -> Engines:
    return Engines(tokenizer, str(tiny_model_dir))
