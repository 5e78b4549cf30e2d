"""Router and record parsing: pure logic, fake clock, seeded rng."""
import logging
import math
import random
from collections import Counter

import pytest

from fedswarm.client.swarm.routing import Router, RoutingConfig, StageRecord, parse_records, stage_key


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def rec(peer, throughput, load=0.0, stage=0):
    return StageRecord(peer, f"srv-{peer}", stage, throughput, load)


def make_router(records, stage=0, **cfg):
    clock = FakeClock()
    router = Router(RoutingConfig(**cfg), rng=random.Random(1234), clock=clock)
    router.update(stage, records)
    return router, clock


def test_stage_key():
    assert stage_key("run1", 3) == "fedswarm:run1:stage:3"


def test_weights_proportional_to_throughput_over_load():
    router, _ = make_router([rec("a", 100, 0), rec("b", 300, 2), rec("c", 50, 1)])
    raw = {"a": 100 / 1, "b": 300 / 3, "c": 50 / 2}
    total = sum(raw.values())
    w = router.weights(0)
    assert set(w) == {"a", "b", "c"}
    for p in raw:
        assert w[p] == pytest.approx(raw[p] / total, rel=1e-12)
    assert math.fsum(w.values()) == pytest.approx(1.0)
    assert router.weights(7) == {}
    assert router.peers(0) == ["a", "b", "c"]


def test_min_throughput_floor():
    router, _ = make_router([rec("a", 0.0), rec("b", 3.0)], min_throughput=1.0)
    assert router.weights(0) == pytest.approx({"a": 0.25, "b": 0.75})


def test_banned_peer_weight_zero_then_returns(caplog):
    router, clock = make_router([rec("a", 100), rec("b", 100)])
    with caplog.at_level(logging.WARNING):
        length = router.ban("a", "timeout")
    assert length == 2.0
    assert "a" in caplog.text and "timeout" in caplog.text and "2.0 s" in caplog.text
    assert router.is_banned("a")
    assert router.weights(0) == {"b": 1.0}
    clock.t += 1.99
    assert router.is_banned("a")
    clock.t += 0.02
    assert not router.is_banned("a")
    assert router.weights(0) == pytest.approx({"a": 0.5, "b": 0.5})


def test_ban_doubles_caps_and_resets_on_success():
    router, clock = make_router([rec("a", 100)], ban_initial_s=2.0, ban_max_s=10.0)
    lengths = []
    for _ in range(5):
        lengths.append(router.ban("a", "error"))
        clock.t += lengths[-1] + 0.01
    assert lengths == [2.0, 4.0, 8.0, 10.0, 10.0]
    router.begin("a")
    router.end("a", ok=False, seconds=0.1)
    assert router.ban("a", "error") == 10.0  # a failure does not reset the streak
    clock.t += 10.01
    router.begin("a")
    router.end("a", ok=True, seconds=0.1)
    assert router.ban("a", "error") == 2.0


def test_choose_frequencies_match_weights():
    router, _ = make_router([rec("a", 100, 0), rec("b", 300, 2), rec("c", 50, 1), rec("d", 10, 0)])
    w = router.weights(0)
    n = 5000
    counts = Counter(router.choose(0).peer_id for _ in range(n))
    for p, wp in w.items():
        assert abs(counts[p] / n - wp) < 0.03, (p, counts[p] / n, wp)


def test_choose_is_deterministic_with_seed():
    recs = [rec("a", 1), rec("b", 2), rec("c", 3)]
    r1, _ = make_router(recs)
    r2, _ = make_router(recs)
    assert [r1.choose(0).peer_id for _ in range(50)] == [r2.choose(0).peer_id for _ in range(50)]


def test_exclude_and_none_when_all_banned():
    router, _ = make_router([rec("a", 100), rec("b", 100)])
    for _ in range(200):
        assert router.choose(0, exclude={"a"}).peer_id == "b"
    assert router.choose(0, exclude={"a", "b"}) is None
    assert router.weights(0, exclude={"b"}) == {"a": 1.0}
    router.ban("b", "unreachable")
    assert all(router.choose(0).peer_id == "a" for _ in range(200))
    router.ban("a", "unreachable")
    assert router.choose(0) is None
    assert router.weights(0) == {}
    assert router.choose(5) is None


def test_inflight_lowers_weight():
    router, _ = make_router([rec("a", 100, 1), rec("b", 100, 1)])
    assert router.weights(0)["a"] == pytest.approx(0.5)
    router.begin("a")
    router.begin("a")
    assert router.inflight("a") == 2
    # a: 100 / (1 + 1 + 2) = 25, b: 100 / 2 = 50
    assert router.weights(0) == pytest.approx({"a": 25 / 75, "b": 50 / 75})
    router.end("a", ok=True, seconds=0.2)
    router.end("a", ok=False, seconds=0.3)
    assert router.inflight("a") == 0
    router.end("a", ok=True, seconds=0.1)  # unmatched end never goes negative
    assert router.inflight("a") == 0
    assert router.weights(0)["a"] == pytest.approx(0.5)


def test_update_replaces_records():
    router, _ = make_router([rec("a", 1), rec("b", 1)])
    router.update(0, [rec("b", 1), rec("c", 1)])
    assert router.peers(0) == ["b", "c"]
    with pytest.raises(ValueError):
        router.update(0, [rec("x", 1, stage=1)])


def test_parse_records_roundtrip_and_drops_malformed():
    good = rec("peerA", 120.5, 2, stage=3)
    raw = {
        "peerA": good.to_value(),
        "peerB": {"name": "b", "throughput": 10, "load": 0},  # ints and no stage field are fine
        "nan": {"name": "x", "throughput": float("nan"), "load": 0},
        "inf": {"name": "x", "throughput": 5.0, "load": float("inf")},
        "neg": {"name": "x", "throughput": -1.0, "load": 0},
        "negload": {"name": "x", "throughput": 1.0, "load": -0.5},
        "str": {"name": "x", "throughput": "fast", "load": 0},
        "bool": {"name": "x", "throughput": True, "load": 0},
        "missing": {"name": "x", "load": 0},
        "badname": {"name": 7, "throughput": 1.0, "load": 0},
        "otherstage": {"name": "x", "stage": 4, "throughput": 1.0, "load": 0},
        "notdict": [1, 2, 3],
        "none": None,
        "": {"name": "x", "throughput": 1.0, "load": 0},
    }
    out = parse_records(3, raw)
    assert out == [good, StageRecord("peerB", "b", 3, 10.0, 0.0)]
    assert parse_records(0, {}) == []
