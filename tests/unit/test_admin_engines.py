"""Adding an engine through the admin API (fake engines): checked, then in rotation; refused
for a taken name, a bad body or several workers. Warming itself: tests/unit/test_elastic_warmup.py
(planning) and tests/integration/test_elastic.py (real engines)."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_config_reload import ADMIN, Fleet, engine, fleet, gateway, served_by, write  # noqa: F401 (fixture)

AUTH = {"authorization": f"Bearer {ADMIN}"}


def test_an_engine_added_through_the_admin_api_is_checked_then_takes_requests(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        assert served_by(client, 4) == {"a"}
        resp = client.post("/admin/engines", json=engine("b"), headers=AUTH)
        assert resp.status_code == 200, resp.text
        state = resp.json()
        assert state["id"] == "b" and state["available"] and not state["warming"]
        assert state["warm_up"] is None  # nothing to warm it with: no prefix policy, no kv_transfer
        assert fleet.times_asked("b", "/health") == 1 and fleet.times_asked("b", "/v1/models") == 1
        assert served_by(client, 4) == {"a", "b"}
        assert [e["id"] for e in client.get("/admin/engines", headers=AUTH).json()["engines"]] == ["a", "b"]


def test_an_engine_that_fails_its_first_check_is_added_out_of_rotation(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], routing={"policy": "round_robin"})
    fleet.down.add("b")
    with gateway(fleet, path) as client:
        resp = client.post("/admin/engines", json=engine("b"), headers=AUTH)
        assert resp.status_code == 200 and not resp.json()["available"]
        assert served_by(client, 4) == {"a"}


def test_adding_is_refused_for_a_taken_name_a_bad_body_or_no_token(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a")], routing={"policy": "round_robin"})
    with gateway(fleet, path) as client:
        taken = client.post("/admin/engines", json=engine("a", url="http://other"), headers=AUTH)
        assert taken.status_code == 400 and "configured already" in taken.json()["error"]["message"]
        bad = client.post("/admin/engines", json={"name": "c"}, headers=AUTH)
        assert bad.status_code == 400 and "url" in bad.json()["error"]["message"]
        assert client.post("/admin/engines", content=b"not json", headers=AUTH).status_code == 400
        assert client.post("/admin/engines", json=engine("c")).status_code == 401
        assert len(client.get("/admin/engines", headers=AUTH).json()["engines"]) == 1


def test_a_joining_engine_is_planned_a_warm_up_from_the_prompts_routed_lately(fleet: Fleet, tmp_path: Path) -> None:
    # The prompt's only holder publishes no KV events (its entries are guesses): nothing to
    # pull, but the prompt was remembered and the join planned with it.
    path = tmp_path / "gateway.yaml"
    write(path, [engine("a", kv_transfer=True)], routing={"policy": "kv_aware"}, kv_transfer={"min_prefix_tokens": 32})
    with gateway(fleet, path) as client:
        prompt = " ".join(f"word{i}" for i in range(200))
        # Twice: a first request of a prompt no engine holds is tokenized by its head only
        # (gateway.tokenization.head), no prefix to move.
        for _ in range(2):
            resp = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1})
            assert resp.status_code == 200
        added = client.post("/admin/engines", json=engine("b", kv_transfer=True), headers=AUTH)
        assert added.status_code == 200, added.text
        warm_up = added.json()["warm_up"]
        assert (warm_up["prefixes_pulled"], warm_up["prefixes_unheld"], warm_up["prefixes_too_small"]) == (0, 1, 0)
        assert added.json()["available"]
        metrics = client.get("/metrics").text
        assert 'gateway_elastic_prefixes_total{event="join",outcome="unheld"} 1.0' in metrics
