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


OWN_CALL = re.compile(r"chained micro-batch, stage \d+: (unreachable|timeout): ")   # the trainer's own call failed
# an honest hop whose own call to the next hop failed in transit, while that hop answered the trainer's re-run:
# the trainer cannot tell it from a false claim, so it is banned as one (2 s), as the README says
TRANSIENT_CLAIM = re.compile(r"chained micro-batch, stage \d+: claimed stage \d+'s \w+ failed "
                             r"\((unreachable|timeout): .*\), but it answers a direct re-run$")


def _bans(log: str) -> dict[str, list[str]]:
    """Peer id -> the reasons the trainer's log gives for banning it."""
    found: dict[str, list[str]] = {}
    for peer, why in re.findall(r"Peer (\w+) failed \((.*?)\); not routing", log):
        found.setdefault(peer, []).append(why)
    return found


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
def test_sim_with_a_lying_chain_head_bans_it_catches_it_and_loses_no_microbatch(tmp_path):
    """`fedswarm sim --liars 1`: the liar joins stage 0 beside two honest replicas and, as a chain head, tells the
    security review's lies in turn (blaming its own stage's honest replica, blaming the honest next hop, a made-up
    loss without calling the next stage, a NaN loss), then corrupts what it sends; the trainer bans it for each
    lie and no honest peer ever, a spot check catches the corruption and the coordinator removes it."""
    out = tmp_path / "sim"
    proc = run_fedswarm("sim", "--mode", "swarm", "--stages", "2", "--peers", "5", "--liars", "1",
                        "--lies", ",".join(LIES * 2 + ["corrupt"]),   # each lie twice, then corrupt from then on
                        "--verify-fraction", "0.5", "--rounds", "3", "--average-every",
                        "5", "--lease", "20", "--seq-len", "64", "--batch-size", "8", "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    sw, liar_log = report["swarm"], (out / "peer4.log").read_text()
    assert report["sim"]["liars"] == ["peer4"], report["sim"]
    assert all(f"lying: {k.split(':')[0]}" in liar_log for k in LIES), liar_log[-3000:]   # told every lie
    log, liar_id = (out / "trainer0.log").read_text(), re.search(r"as peer (\w+)", liar_log)[1]
    bans = _bans(log)
    honest = {peer: why for peer, why in bans.items() if peer != liar_id}
    # no honest peer banned on the liar's word, ever: only where a call failed in transit (the trainer's own to
    # it: a peer that exits as the run ends, or a hiccup; or its own to the next hop, which then answered)
    assert all((OWN_CALL.match(w) or TRANSIENT_CLAIM.match(w)) and "made up" not in w
               for why in honest.values() for w in why), honest
    # each lie told twice: two of each kind banned it, even if a call to it failed under load instead
    assert sum("does not check out" in b or "but it answers" in b for b in bans[liar_id]) >= 2, bans   # shifting
    assert sum("without valid receipts" in b for b in bans[liar_id]) >= 2, bans                        # made up
    assert sum("caught lying by a spot check" in b for b in bans[liar_id]) == 1, bans                 # corrupting
    assert sw["refused"].get("false_blame", 0) >= 2 and sw["refused"].get("bad_receipt", 0) >= 2, sw["refused"]
    assert sw["lying_peers"] == 1 and sw["microbatches_lost"] == 0, sw
    assert [e["peer"] for e in sw["events"] if e["kind"] == "lying_peer"] == ["peer4"], sw["events"]
    assert "micro-batch lost" not in log
    assert report["rounds"][-1]["eval_loss"] < report["rounds"][0]["eval_loss"]
