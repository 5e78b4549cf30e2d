"""The swarm's timeouts: every wait of the P2P layer and of a trainer, named, each a flag of `fedswarm client`
(and a key of a config file's [client] table). Light on purpose: the client's flags are built from these
without importing hivemind."""
from __future__ import annotations

from dataclasses import dataclass

from fedswarm.settings import opt

SWARM_PREFIX, TRAINER_PREFIX = "p2p_", "trainer_"   # their dests among the client's options (call_s is in both)


@dataclass
class SwarmTimeouts:
    """Every deadline of the swarm layer, in seconds; each is a flag of `fedswarm client` (peers, trainers)."""
    call_s: float = opt(5.0, "swarm: default deadline of one P2P call", flag="--p2p-call-timeout", metavar="S")
    dht_op_s: float = opt(5.0, "swarm: deadline of a DHT store or get", flag="--dht-timeout", metavar="S")
    announce_every_s: float = opt(1.0, "swarm: seconds between a stage server's announces of its record",
                                  flag="--announce-every", metavar="S")
    record_ttl_s: float = opt(4.0, "swarm: a stage record expires this many seconds after its last announce",
                              flag="--record-ttl", metavar="S")
    startup_s: float = opt(30.0, "swarm: seconds the DHT node and p2pd may take to start",
                           flag="--p2p-startup-timeout", metavar="S")
    shutdown_s: float = opt(5.0, "swarm: grace in seconds for the DHT process before it is killed",
                            flag="--p2p-shutdown-timeout", metavar="S")


@dataclass
class TrainerTimeouts:
    """Every wait of the trainer, named; each is a flag of `fedswarm client` (--role trainer)."""

    call_s: float = opt(10.0, "trainer: deadline of one stage call, a forward or a backward",
                        flag="--stage-call-timeout", metavar="S")
    refresh_s: float = opt(0.5, "trainer: seconds between reads of the stage records in the DHT",
                           flag="--dht-refresh", metavar="S")
    no_replica_wait_s: float = opt(1.0, "trainer: longest wait for the next DHT read while a stage has no live replica",
                                   flag="--no-replica-wait", metavar="S")
    give_up_s: float = opt(300.0, "trainer: a micro-batch still unplaced after this many seconds is counted lost",
                           flag="--microbatch-give-up", metavar="S")
    roster_check_s: float = opt(0.2, "trainer: while a call is in flight, seconds between checks that its peer is "
                                     "still on the roster", flag="--roster-check", metavar="S")


SPOT_PREFIX = "spot_"   # SpotChecks' dests among the client's options


@dataclass
class SpotChecks:
    """How a trainer checks the replicas it routes through (client/swarm/evidence.py)."""

    verify_fraction: float = opt(0.02, "trainer: fraction of micro-batches whose every stage call is spot-checked: "
                                       "re-run on the replica that served it and on another, both on the stage's last "
                                       "committed average; a third replica settles a mismatch and the liar is "
                                       "reported (the coordinator removes it from the roster); 0: no spot checks",
                                 flag="--verify-fraction", metavar="F")

    def __post_init__(self):
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"--verify-fraction must be between 0 and 1, got {self.verify_fraction}")
