"""The coordinator's own timeouts (the run's configuration is fedswarm.run_config.RunConfig)."""
from __future__ import annotations

from dataclasses import dataclass

from fedswarm.settings import opt


@dataclass
class CoordinatorTimeouts:
    """Every wait the coordinator does, named; each is a flag of `fedswarm coordinator` and a key of
    [coordinator] (the lease and heartbeat, whose defaults depend on the mode, come from --lease)."""

    lease_s: float = 15.0              # a client silent this long is dropped (its open tasks fail)
    heartbeat_interval_s: float = 2.0  # what clients are told to use
    round_timeout_s: float = opt(600.0, "seconds a round waits for replies before it closes (late ones count as "
                                        "failures)", flag="--round-timeout", metavar="S")
    evaluate_timeout_s: float = opt(0.0, "seconds a round's federated evaluation waits for replies before it leaves "
                                         "the rest out (0: --round-timeout)", flag="--evaluate-timeout", metavar="S")
    max_pull_wait_s: float = opt(30.0, "longest a client's task long-poll is held, whatever it asks",
                                 flag="--max-pull-wait", metavar="S")
    reaper_interval_s: float = opt(1.0, "seconds between checks of the clients' leases", flag="--reaper-interval",
                                   metavar="S")
    failed_round_backoff_s: float = opt(1.0, "wait before repeating a round with no usable reply (doubles each time)",
                                        flag="--failed-round-backoff", metavar="S")
    failed_round_backoff_max_s: float = opt(60.0, "longest wait before repeating a failed round",
                                            flag="--failed-round-backoff-max", metavar="S")
    max_failed_rounds: int = opt(10, "give up (state failed, exit 3) after this many rounds in a row with no usable "
                                     "reply (0: never)", metavar="N")
