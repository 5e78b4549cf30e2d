"""Members that lie (FEDSWARM_LIE, client/swarm/lies.py): a trainer blames only what the evidence shows (signed
receipts, direct re-runs), and spot checks catch a replica that corrupts its outputs; the liar is banned or
removed, no honest peer is banned, no micro-batch is lost."""
from __future__ import annotations

import json
import re

import pytest

from fedswarm.app.testing import completed, swarm_run, swarm_status, until
from fedswarm.sim.processes import run_fedswarm

LIES = ["blame_replica", "blame_next", "fabricate:0.05", "nan_loss"]


def _bans(log: str) -> dict[str, list[str]]:
    """Peer id -> the reasons the trainer's log gives for banning it."""
    found: dict[str, list[str]] = {}
    for peer, why in re.findall(r"Peer (\w+) failed \((.*?)\); not routing", log):
        found.setdefault(peer, []).append(why)
    return found


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_lying_chain_head_is_banned_and_no_honest_peer_is(tmp_path):
    """The security review's attacks from stage 0, in turn: blaming its own stage's honest replica, blaming the
    honest next hop, a made-up loss without calling the next stage, a NaN loss."""
    with swarm_run(tmp_path, stages=2, rounds=50, average_every=5,
                   extra=["--swarm-traffic", "chained", "--lease", "20"]) as swarm:
        liar = swarm.start_peer("liar", 0, env={"FEDSWARM_LIE": ",".join(LIES)})
        honest = [swarm.start_peer("h1", 1), swarm.start_peer("h0", 0)]
        trainer = swarm.start_trainer()
        watched = [swarm.coordinator, trainer, liar, *honest]
        until("the liar told every lie", lambda: all(f"lying: {k.split(':')[0]}" in liar.output() for k in LIES),
              150, watched, poll_s=0.2)
        after = completed(swarm.address)
        until("10 more micro-batches", lambda: completed(swarm.address) >= after + 10, 60, watched)
        log, liar_id = trainer.output(), re.search(r"as peer (\w+)", liar.output())[1]
        bans = _bans(log)
        assert set(bans) == {liar_id}, bans                                    # no honest peer banned, ever
        assert sum("does not check out" in b or "but it answers" in b for b in bans[liar_id]) >= 2, bans   # shifting
        assert sum("without valid receipts" in b for b in bans[liar_id]) >= 2, bans                        # made up
        sw = swarm_status(swarm.address)
        assert sw["microbatches_lost"] == 0, sw
        assert sw["refused"].get("false_blame", 0) >= 2 and sw["refused"].get("bad_receipt", 0) >= 2, sw["refused"]
        assert "micro-batch lost" not in log


@pytest.mark.integration
@pytest.mark.slow   # the --liars sim below catches a liar by spot check in the default run
@pytest.mark.timeout(240)
def test_spot_checks_catch_a_replica_that_corrupts_its_outputs(tmp_path):
    """Three replicas of stage 0, one adding noise to what it sends: a spot check re-runs its call on the two
    others, which agree against it; the coordinator, given the signed evidence, takes it off the roster."""
    with swarm_run(tmp_path, stages=2, rounds=50, average_every=5,
                   extra=["--swarm-traffic", "chained", "--lease", "20"]) as swarm:
        liar = swarm.start_peer("liar", 0, env={"FEDSWARM_LIE": "corrupt:1"})
        peers = [swarm.start_peer("h1", 1), swarm.start_peer("h0", 0), swarm.start_peer("h2", 1),
                 swarm.start_peer("h3", 0)]
        trainer = swarm.start_trainer("t0", ["--verify-fraction", "0.25"])
        watched = [swarm.coordinator, trainer, liar, *peers]
        until("the coordinator removed the liar", lambda: swarm_status(swarm.address)["lying_peers"] >= 1, 150,
              watched, poll_s=0.2)
        sw = swarm_status(swarm.address)
        events = [e for e in sw["events"] if e["kind"] == "lying_peer"]
        assert [e["peer"] for e in events] == ["liar"], sw["events"]
        assert "liar" not in sw["stages"][0]["peers"], sw["stages"]
        after = completed(swarm.address)
        until("10 more micro-batches", lambda: completed(swarm.address) >= after + 10, 60, watched)
        sw = swarm_status(swarm.address)
        assert sw["microbatches_lost"] == 0 and sw["lying_reports_refused"] == 0, sw
        log = trainer.output()
        caught = re.findall(r"spot check: (\w+) \(stage 0\) lies", log)
        assert len(caught) == 1 and set(_bans(log)) == {caught[0]}, log[-3000:]   # only the liar banned


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sim_with_a_liar_catches_it_and_loses_no_microbatch(tmp_path):
    out = tmp_path / "sim"
    proc = run_fedswarm("sim", "--mode", "swarm", "--stages", "2", "--peers", "6", "--liars", "1",
                        "--verify-fraction", "0.3", "--rounds", "6", "--average-every", "5", "--lease", "20",
                        "--seq-len", "64", "--batch-size", "8", "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    sw = report["swarm"]
    assert report["sim"]["liars"] == ["peer5"], report["sim"]
    assert sw["lying_peers"] == 1 and sw["microbatches_lost"] == 0, sw
    assert [e["peer"] for e in sw["events"] if e["kind"] == "lying_peer"] == ["peer5"], sw["events"]
    assert report["rounds"][-1]["eval_loss"] < report["rounds"][0]["eval_loss"]
