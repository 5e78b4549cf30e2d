"""The session RPCs: Join (a session with a lease), Heartbeat (renews it), Challenge (a join proof's
nonce) and Status. What the run's mode adds to them comes from its policy (coordinator/modes.py)."""
from __future__ import annotations

import json
import logging

import grpc

from fedswarm.coordinator.admission import peer_host
from fedswarm.coordinator.auth import AuthError, Authenticator
from fedswarm.coordinator.config import CoordinatorTimeouts
from fedswarm.coordinator.driver import RunProgress
from fedswarm.coordinator.membership import Membership, SessionsFull
from fedswarm.coordinator.rpc import MAX_NAME, Counters, invalid, session, unauthenticated
from fedswarm.coordinator.status import StatusReport
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.proto.refusals import Reason, Refused
from fedswarm.run_config import RunConfig

log = logging.getLogger(__name__)


class SessionRpcs:
    def __init__(self, cfg: RunConfig, run_id: str, members: Membership, grid, progress: RunProgress,
                 timeouts: CoordinatorTimeouts, auth: Authenticator, mode, counters: Counters, report: StatusReport):
        self.cfg, self.run_id, self.members, self.grid, self.progress = cfg, run_id, members, grid, progress
        self.timeouts, self.auth, self.mode, self.counters, self.report = timeouts, auth, mode, counters, report

    def join(self, req: pb.JoinRequest, context) -> pb.JoinReply:
        role = self._check_join(req)
        key_name = self._prove(req, role)
        self._check_role(role)
        self.mode.check_join(req)
        member, resumed = self._member(req, role, context)
        fields = self.mode.joined(member, req)
        if resumed:
            self.grid.requeue_for(member.client_id)
        log.info("client %s %s as %d%s", req.name, "re-joined" if resumed else "joined", member.client_id,
                 f" (key {key_name})" if key_name else "")
        return pb.JoinReply(client_id=member.client_id, session_token=member.token, run_id=self.run_id,
                            run_config_json=self.cfg.to_json(), heartbeat_interval_s=self.timeouts.heartbeat_interval_s,
                            lease_s=self.timeouts.lease_s, **fields)

    def heartbeat(self, req: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        member = session(self.members, req.client_id, req.session_token)
        fields = self.mode.heartbeat(member, req)
        return pb.HeartbeatReply(state=self.progress.state, round=self.progress.committed_round, **fields)

    def challenge(self, req: pb.ChallengeRequest, context) -> pb.ChallengeReply:
        return pb.ChallengeReply(run_id=self.run_id, challenge=self.auth.challenge(), expires_in_s=self.auth.window_s)

    def status(self, req: pb.StatusRequest, context) -> pb.StatusReply:
        try:
            self.auth.check_status(req.public_key, req.signature, req.challenge, req.nonce)
        except AuthError as err:
            raise unauthenticated(err) from None
        if req.history:   # a page of the round history
            return pb.StatusReply(json=json.dumps(self.report.history(req.from_round, req.max_rounds)))
        return pb.StatusReply(json=json.dumps(self.status_dict()))

    def status_dict(self) -> dict:
        """The Status object (coordinator/status.py): the last rounds, totals over all, bounded client lists."""
        return self.report.status(self.counters.snapshot(self.grid.updates.refused()))

    # -- join, step by step ----------------------------------------------------------------
    def _check_join(self, req: pb.JoinRequest) -> str:
        """The join's fields within bounds; its role (default: a federated client)."""
        if not req.name or len(req.name) > MAX_NAME or not req.name.isprintable():
            raise invalid(Reason.BAD_NAME, f"name must be 1..{MAX_NAME} printable characters")
        if len(req.device) > MAX_NAME or len(req.precision) > 16:
            raise invalid(Reason.BAD_JOIN, "device/precision field too long")
        return req.role or "client"

    def _prove(self, req: pb.JoinRequest, role: str) -> str:
        """The name of the authorized key the join proved (empty in dev mode)."""
        try:
            return self.auth.check_join(req.name, role[:16], req.public_key, req.signature, req.challenge, req.nonce,
                                        p2p_peer_id=req.p2p_peer_id)
        except AuthError as err:
            log.warning("refused join of %r: %s", req.name, err.reason)
            raise unauthenticated(err) from None

    def _check_role(self, role: str) -> None:
        allowed = self.mode.roles
        if role not in allowed:
            raise invalid(Reason.BAD_ROLE, f"role {role[:16]!r} does not fit this {self.cfg.mode} run "
                          f"(use {' or '.join(allowed)})")
        if role == "evaluator" and self.cfg.evaluate == "central":
            raise invalid(Reason.BAD_ROLE, "this run evaluates on the coordinator only (--evaluate central): an evaluator "
                          "would never be asked; start the run with --evaluate clients or both, or run a client")

    def _member(self, req: pb.JoinRequest, role: str, context):
        """(the session, whether it is a re-join of a known one); one live session per key."""
        try:
            member, resumed = self.members.join(req.name, req.device, req.precision,
                                                req.resume_client_id, req.resume_token,
                                                public_key=bytes(req.public_key) if self.auth.enabled else b"",
                                                role=role, address=peer_host(context.peer()))
        except SessionsFull as err:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_SESSIONS, str(err)) from None
        if member.replaced:  # the older session of the key was dropped (its tasks failed)
            self.counters.count(Reason.REPLACED_SESSION)
            log.warning("client %s joined with the key of session %d, which it replaces", req.name, member.replaced)
        return member, resumed
