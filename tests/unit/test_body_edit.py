"""Members added in front of a body as the client sent it give the JSON the engine would get
from a re-serialization, whatever the body's shape."""

from __future__ import annotations

import json

import pytest

from gateway.proxy.body import with_member


@pytest.mark.parametrize("raw", [b'{"model":"m","prompt":"x"}', b"{}", b"{ }", b'{\n  "a": [1, {"b": null}]\n}'])
def test_the_member_comes_first_and_the_rest_is_untouched(raw: bytes) -> None:
    edited = with_member(raw, "request_id", "resp_gw1")
    assert edited is not None and edited.endswith(raw[1:])
    assert json.loads(edited) == {"request_id": "resp_gw1", **json.loads(raw)}
    assert next(iter(json.loads(edited))) == "request_id"


def test_a_body_not_starting_with_a_brace_is_left_to_the_caller() -> None:
    assert with_member(b' {"a": 1}', "x", True) is None
