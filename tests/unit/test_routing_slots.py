"""gateway.limits.routing_slots: past the cap a request is refused at once with an OpenAI-shaped
503 and Retry-After; a slot is given back however routing ends."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.errors import Overloaded, error_response
from gateway.limits.routing_slots import RoutingSlots


def test_past_the_cap_a_request_gets_503_with_retry_after_and_is_counted() -> None:
    rejected: list[str] = []
    slots = RoutingSlots(2, retry_after_s=3, on_reject=rejected.append)
    with slots, slots:
        assert slots.in_use == 2
        with pytest.raises(Overloaded) as refused:
            with slots:
                pass
        assert slots.in_use == 2  # a refused request holds no slot
    assert slots.in_use == 0
    assert rejected == ["routing_backlog"]
    response = error_response(refused.value)
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert json.loads(response.body)["error"]["code"] == "overloaded"


def test_a_slot_is_given_back_when_routing_fails_or_is_cancelled() -> None:
    slots = RoutingSlots(1, retry_after_s=1, on_reject=lambda reason: None)
    for error in (ValueError("tokenizer"), asyncio.CancelledError()):
        with pytest.raises(type(error)):
            with slots:
                raise error
    assert slots.in_use == 0
    with slots:
        assert slots.in_use == 1


def test_no_cap_refuses_nothing() -> None:
    slots = RoutingSlots(None, retry_after_s=1, on_reject=lambda reason: None)
    with slots, slots, slots:
        assert slots.in_use == 3
