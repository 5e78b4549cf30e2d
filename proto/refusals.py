"""Typed refusals: the coordinator puts the reason of every refusal (the name it counts in `rejections`)
in the trailing metadata key REASON_KEY; clients switch on it, never on the error text."""
from __future__ import annotations

import grpc

REASON_KEY = "fedswarm-reason"
REJOIN = frozenset({"bad_session"})                  # the session is gone (restart, lease lost): join again
REPLACED = "session_replaced"                        # another daemon joined with this key: stop
RETRY_JOIN = frozenset({"stale_challenge", "stale_join"})  # the proof's challenge expired or predates a restart
FINAL = frozenset({"oversized"})                     # the same request can never succeed: do not retry
# the coordinator holds too many unexpired proofs (of this key, or of all): sign a fresh challenge a little later
RETRY_SOON = frozenset({"too_many_proofs", "nonce_cache_full"})


def reason(err: grpc.RpcError) -> str:
    """The coordinator's reason for refusing `err`'s call ('' when the refusal did not come from it)."""
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == REASON_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
