"""Stage assignment, re-assignment of an emptied stage, and utilization-based rebalancing."""
from fedswarm.coordinator.swarm_registry import SwarmRegistry, SwarmTimeouts


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _registry(stages=3, peers=5):
    clock = Clock()
    reg = SwarmRegistry(stages, SwarmTimeouts(rebalance_cooldown_s=15.0, warm_reports=2), clock=clock)
    placed = [reg.assign(i, f"p{i}") for i in range(peers)]
    return reg, clock, placed


def test_assign_fills_the_emptiest_stage():
    _, _, placed = _registry()
    assert placed == [0, 1, 2, 0, 1]


def test_emptied_stage_takes_a_peer_from_the_most_provisioned_stage():
    reg, _, _ = _registry()
    reg.remove(2, "lease expired")            # p2 was stage 2's only peer
    assert len(reg.stage_peers(2)) == 1
    moved = reg.stage_peers(2)[0]
    assert moved in (0, 1, 3, 4)
    events = reg.snapshot()["reassignments"]
    assert events[-1]["stage"] == 2 and "lost its last peer" in events[-1]["reason"]
    assert all(reg.stage_peers(s) for s in range(3))


def test_no_donor_leaves_the_stage_empty_until_a_peer_joins():
    reg, _, _ = _registry(stages=3, peers=3)
    reg.remove(1, "killed")
    assert reg.stage_peers(1) == []
    assert reg.assign(9, "new") == 1          # the next peer fills the hole


def test_bottleneck_moves_a_peer_from_an_idle_stage_once_per_cooldown():
    reg, clock, _ = _registry()
    busy = {0: 0.2, 3: 0.2, 1: 0.3, 4: 0.3, 2: 0.97}   # stage 2 saturated, stages 0/1 mostly idle
    reg.report_peer(2, 5000.0, 1, busy[2])
    assert reg.snapshot()["reassignments"] == []        # not warm yet: no decision on one reading
    for _ in range(2):
        for cid, u in busy.items():
            reg.report_peer(cid, 5000.0, 1, u)
    assert len(reg.stage_peers(2)) == 2
    last = reg.snapshot()["reassignments"][-1]
    assert last["stage"] == 2 and "bottleneck" in last["reason"]
    donor_stage = 0                                     # the idlest stage with two peers gave one
    assert len(reg.stage_peers(donor_stage)) == 1
    busy[0] = 0.95                                      # p0 now serves stage 2, which stays saturated
    for _ in range(3):                                  # still saturated, but within the cooldown
        for cid, u in busy.items():
            reg.report_peer(cid, 5000.0, 1, u)
    assert len(reg.snapshot()["reassignments"]) == 1
    clock.t += 16.0                                     # after the cooldown only stage 1 can still give
    for _ in range(3):
        for cid, u in busy.items():
            reg.report_peer(cid, 5000.0, 1, u)
    assert len(reg.stage_peers(2)) == 3 and len(reg.stage_peers(1)) == 1


def test_equal_utilization_moves_nothing():
    reg, clock, _ = _registry()
    for _ in range(5):
        for cid in range(5):
            reg.report_peer(cid, 5000.0, 1, 0.6)
        clock.t += 20
    assert reg.snapshot()["reassignments"] == []


def test_trainer_totals_survive_the_trainer_leaving():
    reg, clock, _ = _registry()
    reg.report_trainer(100, "t0", completed=10, retried=2, lost=0, tokens=1000)
    clock.t += 5
    reg.report_trainer(100, "t0", completed=30, retried=3, lost=0, tokens=3000)
    snap = reg.snapshot()
    assert snap["microbatches_completed"] == 30 and snap["tokens_per_s"] == 400.0
    reg.remove(100, "done")
    reg.report_trainer(101, "t1", completed=5, retried=0, lost=0, tokens=500)
    snap = reg.snapshot()
    assert snap["microbatches_completed"] == 35 and snap["microbatches_retried"] == 3 and snap["tokens"] == 3500


def test_trainer_losses_average_into_one_round_then_reset():
    reg, _, _ = _registry()
    assert reg.take_train_loss() is None
    reg.report_trainer(100, "t0", 1, 0, 0, 100, train_loss=3.0)
    reg.report_trainer(101, "t1", 1, 0, 0, 100, train_loss=2.0)
    reg.report_trainer(100, "t0", 2, 0, 0, 200)            # a heartbeat with no new micro-batch
    assert reg.take_train_loss() == 2.5
    assert reg.take_train_loss() is None


def test_a_replica_cannot_claim_more_tokens_than_went_through_its_stage():
    """A stage sync's averaging weight is the peer's token count, capped at what the trainers reported since
    that stage's last average: a peer claiming 1e9 tokens weighs no more than the stage's real traffic."""
    reg, _, _ = _registry()
    reg.report_trainer(100, "t0", completed=10, retried=0, lost=0, tokens=2048)
    assert reg.sync_weight(0, 10**9) == 2048 and reg.sync_weight(0, 1000) == 1000
    reg.stage_synced(0)
    assert reg.sync_weight(0, 10**9) == 1             # nothing went through stage 0 since its average
    assert reg.sync_weight(1, 10**9) == 2048          # stage 1 was not averaged yet
    reg.report_trainer(100, "t0", completed=15, retried=0, lost=0, tokens=3072)
    assert reg.sync_weight(0, 10**9) == 1024
