"""Typed refusals: every reason fedswarm refuses input for is a `Reason`, the name it is counted under
(`rejections` in status, the P2P refusals in heartbeats). The coordinator puts the reason of every refused
call in the trailing metadata key REASON_KEY; clients switch on it, never on the error text."""
from __future__ import annotations

import enum

import grpc

REASON_KEY = "fedswarm-reason"


class Reason(enum.StrEnum):
    """Why input was refused; the value is the counter's name on the wire, in status and in metrics."""

    # serving limits (coordinator/admission.py, serving.py)
    NO_REQUEST = "no_request"                  # the call ended before its request
    MALFORMED = "malformed"                    # a request that does not parse
    OVERSIZED = "oversized"                    # a request or stream over its size bound
    SLOW_REQUEST = "slow_request"              # a unary request body not sent within the first-message deadline
    SLOW_HEADER = "slow_header"                # an upload's header not sent within the first-message deadline
    SLOW_UPLOAD = "slow_upload"                # an upload's parts stalled
    UPLOAD_DEADLINE = "upload_deadline"        # a whole upload over --upload-timeout
    STREAM_BROKEN = "stream_broken"            # the upload stream broke mid-way
    BUSY = "busy"                              # every waiting slot of the server is taken
    BUSY_CONNECTION = "busy_connection"        # this connection's waiting slots are taken
    BUSY_ADDRESS = "busy_address"              # this address's waiting slots are taken
    TOO_MANY_CONNECTIONS = "too_many_connections"  # a connection beyond its address's share, shut down
    BANNED = "banned"                          # a call from an address banned for a flood (held, then refused)
    SESSION_BUSY = "session_busy"              # this session has too many calls in flight
    UPLOAD_REPLACED = "upload_replaced"        # a newer upload stream for the same task replaced this one
    TOO_MANY_WATCHES = "too_many_watches"      # too many status watchers
    POLL_SUPERSEDED = "poll_superseded"        # a newer long-poll of the session replaced this one
    # sessions (coordinator/session_rpcs.py, rpc.py, membership.py)
    BAD_SESSION = "bad_session"                # unknown or expired session: join again
    SESSION_REPLACED = "session_replaced"      # another daemon joined with this key: this one stops
    REPLACED_SESSION = "replaced_session"      # counted when a join replaces an older session of its key
    TOO_MANY_SESSIONS = "too_many_sessions"
    BAD_JOIN = "bad_join"
    BAD_NAME = "bad_name"
    BAD_ROLE = "bad_role"
    BAD_PEER_ID = "bad_peer_id"
    BAD_HEARTBEAT = "bad_heartbeat"
    BAD_WAIT = "bad_wait"
    BAD_PART_SIZE = "bad_part_size"
    BAD_STAGE = "bad_stage"
    BAD_TASK_ID = "bad_task_id"
    TASK_CLOSED = "task_closed"
    TASK_PENDING = "task_pending"
    NOT_READY = "not_ready"                    # the swarm's stages are not loaded yet: retry shortly
    # identity (coordinator/auth.py)
    STALE_CHALLENGE = "stale_challenge"        # a challenge this coordinator did not issue (or issued before a restart)
    STALE_JOIN = "stale_join"                  # the proof's challenge expired
    UNKNOWN_KEY = "unknown_key"
    NO_KEY = "no_key"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED_JOIN = "replayed_join"
    TOO_MANY_PROOFS = "too_many_proofs"        # this key holds too many unexpired proofs: retry soon
    NONCE_CACHE_FULL = "nonce_cache_full"      # every key together does: retry soon
    # updates and evaluations (coordinator/uploads.py, task_rpcs.py, modes.py)
    EMPTY_STREAM = "empty_stream"
    NO_HEADER = "no_header"
    BAD_HEADER = "bad_header"
    BAD_CHUNK = "bad_chunk"
    BAD_PART_COUNT = "bad_part_count"
    BAD_TENSOR = "bad_tensor"
    INCOMPLETE = "incomplete"
    BAD_BASE = "bad_base"
    WRONG_TASK_KIND = "wrong_task_kind"
    REPLAYED_UPDATE = "replayed_update"
    BAD_EVAL = "bad_eval"
    BAD_SECAGG = "bad_secagg"                  # a secure-aggregation answer that does not fit its stage (secagg_rpcs.py)
    # integrity (coordinator/integrity.py, aggregate.py)
    NON_FINITE = "non_finite"
    UPDATE_MAGNITUDE = "update_magnitude"
    UPDATE_OVERFLOW = "update_overflow"
    UPDATE_NORM = "update_norm"
    NON_FINITE_AGGREGATE = "non_finite_aggregate"
    # the P2P plane and stage peers (p2p.py, client/swarm/)
    NOT_MEMBER = "not_member"
    OVERSIZED_MESSAGE = "oversized_message"
    WRONG_RUN = "wrong_run"
    WRONG_STAGE = "wrong_stage"
    NOT_SERVING = "not_serving"
    BAD_INPUT = "bad_input"
    BAD_SHAPE = "bad_shape"
    BAD_ENCODING = "bad_encoding"
    BAD_TOKENS = "bad_tokens"
    BAD_ROUTE = "bad_route"
    BAD_REPLY = "bad_reply"
    BAD_AVERAGE = "bad_average"
    NON_FINITE_GRAD = "non_finite_grad"
    NON_FINITE_AVERAGE = "non_finite_average"
    RECORD_NOT_MEMBER = "record_not_member"    # a DHT stage record of a peer on no part of the roster: ignored
    RECORD_MALFORMED = "record_malformed"      # a roster peer's DHT record that does not parse: ignored
    RECORD_UNSIGNED = "record_unsigned"        # a DHT stage record under no peer's own signed subkey: ignored
    WEIGHTS_RESTORED = "weights_restored"      # not a refusal of input: a replica's weights turned non-finite
    BAD_RECEIPT = "bad_receipt"                # a chained reply without every stage's valid signed receipt
    FALSE_BLAME = "false_blame"                # a peer's claim that another failed did not check out
    LYING_PEER = "lying_peer"                  # a spot check: two other replicas of its stage contradict its output


REJOIN = frozenset({Reason.BAD_SESSION})                           # the session is gone (restart, lease lost): join again
REPLACED = Reason.SESSION_REPLACED                                 # another daemon joined with this key: stop
RETRY_JOIN = frozenset({Reason.STALE_CHALLENGE, Reason.STALE_JOIN})  # the challenge expired or predates a restart
FINAL = frozenset({Reason.OVERSIZED})                              # the same request can never succeed: do not retry
# the coordinator holds too many unexpired proofs (of this key, or of all): sign a fresh challenge a little later
RETRY_SOON = frozenset({Reason.TOO_MANY_PROOFS, Reason.NONCE_CACHE_FULL})


class Refused(Exception):
    """A call refused with a gRPC status; `reason` is the counter it lands in."""

    def __init__(self, code: grpc.StatusCode, reason: Reason, detail: str):
        super().__init__(detail)
        self.code, self.reason, self.detail = code, Reason(reason), detail


def reason(err: grpc.RpcError) -> str:
    """The coordinator's reason for refusing `err`'s call ('' when the refusal did not come from it)."""
    metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == REASON_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""
