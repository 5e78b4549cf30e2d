"""`fedswarm client --role peer|trainer`: the swarm roles of the client daemon."""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from fedswarm.client.daemon import Host, RoleBase
from fedswarm.client.options import ClientSettings
from fedswarm.client.swarm.roster import Roster
from fedswarm.client.swarm.routing import StageRecord, stage_key
from fedswarm.client import work
from fedswarm.client.swarm.chain import MAX_NEIGHBOURS
from fedswarm.client.swarm.stage_server import HANDLER, StageServer
from fedswarm.client.swarm.stage_sync import Adopter, average_tensors, carry_unsent
from fedswarm.client.swarm.tensors import BadStageInput
from fedswarm.client.swarm.swarm_trainer import MicrobatchLost, SwarmTrainer, run_workers
from fedswarm.p2p import P2P_REFUSALS, SwarmNode, new_identity
from fedswarm import memory
from fedswarm.models import model_config
from fedswarm.proto import fedswarm_pb2 as pb
from fedswarm.stage_lora import lora_stage_shapes
from fedswarm.stages import HandedOver, stage_shapes
from fedswarm.proto.refusals import Reason
from fedswarm.proto.run_state import RunState
from fedswarm.run_config import RunConfig

log = logging.getLogger("fedswarm.swarm")


def _with_p2p(refused: dict[str, int]) -> dict[str, int]:
    """A member's refusals plus those of its P2P layer (messages refused unread)."""
    return {**refused, **P2P_REFUSALS.snapshot()}


class StageSwitcher:
    """Runs stage switches (a fetch and a build: seconds) on a thread of its own, so the heartbeat thread that
    asks for one returns at once and keeps the lease (3 s) alive. The latest request wins; a switch that
    raises is logged and handed to ``on_fail`` (the peer stops: it cannot serve what it was assigned)."""

    def __init__(self, switch, on_fail):
        self._switch, self._on_fail = switch, on_fail
        self._cv = threading.Condition()
        self._pending: tuple[int, str] | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="stage-switch", daemon=True)
        self._thread.start()

    def request(self, stage: int, why: str) -> None:
        with self._cv:
            self._pending = (stage, why)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._stopped)
                if self._stopped:
                    return
                (stage, why), self._pending = self._pending, None
            try:
                self._switch(stage, why)
            except BaseException as err:  # noqa: BLE001 - handed on: the peer stops loudly
                log.exception("switching to stage %d failed", stage)
                self._on_fail(err)
                return


class ForkGate:
    """The daemon's fork guard, held while hivemind forks its DHT process; `forked` is set once it has."""

    def __init__(self, lock: threading.Lock):
        self.lock, self.forked = lock, threading.Event()

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc) -> None:
        self.lock.release()
        self.forked.set()


class PeerStageServer(StageServer):
    """A peer's StageServer: with `gradient_checkpointing` (the client's --gradient-checkpointing), every stage
    it builds recomputes its blocks' activations in the backward pass, so cached forwards hold only block inputs."""

    def __init__(self, *args, gradient_checkpointing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gradient_checkpointing = gradient_checkpointing

    def _serve(self, stage: int, weights) -> None:
        super()._serve(stage, weights)   # on the stage's one worker thread: no request runs in between
        self.module.gradient_checkpointing = self.gradient_checkpointing


class SwarmMember(RoleBase):
    """A role on the swarm's data plane: its libp2p identity exists before it joins (the signed join binds
    the peer id), and it holds the coordinator's roster of who else is on the data plane."""

    def __init__(self, settings: ClientSettings, host: Host | None = None):
        super().__init__(settings, host)
        self.p2p_key, self.p2p_peer_id = new_identity()
        self.roster = Roster()
        self.node: SwarmNode | None = None

    @property
    def run_id(self) -> str:
        return self.session.creds.run_id

    def _start_node(self, client_mode: bool, gate: "ForkGate | None" = None) -> SwarmNode:
        joined = self.session.joined
        self.roster.update(joined.roster)
        # fork_guard: no gRPC call in flight while hivemind forks its DHT process (only the fork: heartbeats
        # go on while the DHT starts, so the 3 s lease cannot lapse during a slow start)
        return SwarmNode(initial_peers=list(joined.dht_peers), host=self.options.p2p_host,
                         announce=self.options.p2p_announce, client_mode=client_mode, identity=self.p2p_key,
                         fork_lock=gate or self.session.fork_guard, timeouts=self.settings.swarm)


class PeerRole(SwarmMember):
    """Serves the stage the coordinator assigns; switches when re-assigned; syncs with the stage average."""

    name = "peer"

    def __init__(self, settings: ClientSettings, host: Host | None = None):
        super().__init__(settings, host)
        self.server: StageServer | None = None
        self.switcher: StageSwitcher | None = None
        self._announcer_stop = threading.Event()
        self.ready = threading.Event()   # set once the assigned stage is served (heartbeats read it)
        self.switch_s = 0.0              # seconds the last stage load took (fetch + build): the coordinator's move cost

    def setup(self, cfg: RunConfig) -> None:
        self.run_cfg = cfg
        memory.return_freed_memory_to_os()   # freed activations, gradients and sync buffers leave the process
        self.start_uploads(cfg)
        self.server = PeerStageServer(self.run_id, self.options.local_run(cfg), self.device, self.precision,
                                      roster=self.roster, gradient_checkpointing=self.options.gradient_checkpointing)
        self._switch_lock = threading.Lock()
        # The DHT node (p2pd, bootstrap) starts while the assigned stage is fetched and built: only hivemind's
        # fork must see no gRPC call of ours in flight, so the fetch waits for the fork, not for the node.
        gate = ForkGate(self.session.fork_guard)
        with ThreadPoolExecutor(1, thread_name_prefix="node-start") as pool:
            starting = pool.submit(self._start_node, False, gate)
            while not gate.forked.wait(0.05):
                if starting.done():
                    starting.result()   # failed before it forked: raise its error
                    break
            started = time.monotonic()
            assigned = self.session.joined.stage
            with self._switch_lock:
                self.server.serve(assigned, self.fetch_stage(assigned))
            memory.trim()   # what the download's buffers left free in malloc's arenas goes back to the OS
            built_s = self.switch_s = time.monotonic() - started
            self.node = starting.result()
        self.server.node = self.node   # chained forwards go out on it
        self.node.add_handler(HANDLER, self.server.handle, pb.StageRequest, gate=self.server.gate)
        self._announce()
        log.warning("now serving stage %d (was -1): assigned at join; built in %.2f s while the node started; "
                    "RSS %s", assigned, built_s, memory.rss_summary())
        self.switcher = StageSwitcher(self._switch, self._abort)
        threading.Thread(target=self._announce_loop, name="announce", daemon=True).start()
        self.ready.set()

    def _switch(self, stage: int, why: str) -> None:
        with self._switch_lock:
            if stage < 0 or stage == self.server.stage_index:
                return
            old = self.server.stage_index
            started = time.monotonic()
            self.feedback.reset()   # the old stage's residuals: never sent now, and a stage's size of memory
            self.server.serve(stage, self.fetch_stage(stage))
            memory.trim()   # the old stage was freed: its pages go back to the OS, not into malloc's arenas
            self.switch_s = time.monotonic() - started
            self._announce()
            log.warning("now serving stage %d (was %d): %s; ready in %.2f s; RSS %s", stage, old, why,
                        self.switch_s, memory.rss_summary())

    def _stage_spec(self, stage: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the tensors stage `stage` trains (LoRA: its adapters), on this host's copy of the model."""
        cfg = self.server.cfg
        return lora_stage_shapes(cfg, stage) if cfg.peft == "lora" else stage_shapes(cfg.model, stage, cfg.stages)

    def fetch_stage(self, stage: int) -> HandedOver:
        """Stage `stage`'s latest committed average. Each part is checked against the stage's names and shapes
        and decoded into place as it arrives, so the stream is never held whole next to the tensors; the result
        is handed over (the stage built from it copies nothing)."""
        spec, s = self._stage_spec(stage), self.session

        def download() -> HandedOver:
            req = pb.FetchModelRequest(**s.creds.ids(), stage=stage + 1)
            return HandedOver(average_tensors(s.stub.FetchModel(req, timeout=s.t.transfer_s), spec))
        return s.with_retry("stage download", download)

    def _announce(self) -> None:
        throughput, _, _, load = self.server.stats()
        record = StageRecord(self.node.peer_id, self.name, self.server.stage_index, max(throughput, 1.0), load)
        self.node.announce(stage_key(self.run_id, self.server.stage_index), record.to_value())   # signed

    def _announce_loop(self) -> None:
        while not self._announcer_stop.wait(self.node.timeouts.announce_every_s):
            try:
                self._announce()
            except Exception as err:  # noqa: BLE001 - a missed announce only shortens the record's life
                log.debug("announce failed: %s", err)

    def heartbeat_fields(self) -> dict:
        if not self.ready.is_set():  # still setting up: serving nothing (not on the roster yet)
            return {"stage": -1}
        throughput, steps, utilization, _ = self.server.stats()
        return dict(stage=self.server.stage_index, throughput=throughput, optimizer_steps=steps, load=utilization,
                    refused=_with_p2p(self.server.refusals.snapshot()), switch_s=self.switch_s,
                    confirmed_tokens=self.server.confirmed_tokens())

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        self.roster.update(reply.roster)
        if self.ready.is_set() and reply.stage >= 0 and reply.stage != self.server.stage_index:
            self.switcher.request(reply.stage, "re-assigned by the coordinator")  # never on this thread

    _failure: BaseException | None = None

    def _abort(self, err: BaseException) -> None:
        """A switch failed: this peer cannot serve its stage. Closing the channel ends run()'s task loop."""
        self._failure = err
        self.session.channel.close()

    def on_task(self, task: pb.Task) -> None:
        if task.kind == pb.TASK_TRAIN:   # in a swarm, a "train" task is a stage sync
            self.sync(task)
        else:
            super().on_task(task)

    def sync(self, task: pb.Task) -> None:
        """A stage sync, a tensor at a time (stage_sync.py): adopt each tensor of the new average as it arrives,
        encode the progress it replaces into the upload; then upload it. Not applied: carried to the next one."""
        stage = int(json.loads(task.config_json).get("stage", -1))
        if stage != self.server.stage_index:   # checked before the download: its parts are checked against stage's
            raise BadStageInput(f"sync for stage {stage}, but this peer serves stage {self.server.stage_index}",
                                Reason.WRONG_STAGE)
        spec, adopter, s = self._stage_spec(stage), Adopter(self.server, self.feedback), self.session
        started = time.monotonic()

        def download() -> None:
            req = pb.FetchModelRequest(**s.creds.ids(), task_id=task.task_id)
            try:
                for name, average in average_tensors(s.stub.FetchModel(req, timeout=s.t.transfer_s), spec,
                                                     adopter.adopted):
                    adopter.add(name, average)
            finally:
                adopter.flush()
        try:
            with self._switch_lock:
                self.server.begin_sync(stage, spec)
                s.with_retry("stage sync download", download)
                tokens = self.server.end_sync()
            c = s.creds
            chunks = work.update_stream(adopter.parts, client_id=c.client_id, token=c.token, run_id=c.run_id,
                                        task=task, num_tensors=len(spec), num_examples=tokens, train_loss=0.0,
                                        seconds=time.monotonic() - started, identity=s.identity)
            reply = s.push(chunks)
        except BaseException:
            carry_unsent(self.feedback, adopter.parts)
            raise
        finally:
            del adopter.parts[:]
            memory.trim()   # the encoded upload was freed
        log.info("stage %d sync %d: uploaded %d bytes of progress over %d tokens; %d of %d backward passes "
                 "re-ran their forward; %d forwards chained to the next stage; RSS %s", stage, task.round,
                 reply.bytes_received, tokens, self.server.recomputed_total, self.server.backward_total,
                 self.server.chained_total, memory.rss_summary())

    def run(self) -> int:
        try:
            return super().run()
        except Exception:
            if self._failure is not None:
                raise RuntimeError(f"this peer stopped: its stage switch failed ({self._failure!r})") from self._failure
            raise

    def close(self) -> None:
        self._announcer_stop.set()
        for part in (self.switcher, self.server):
            if part is not None:
                part.close()
        if self.node is not None:
            self.node.shutdown()


class TrainerRole(SwarmMember):
    """Holds data and drives micro-batches through the swarm until the run is done."""

    name = "trainer"

    def __init__(self, settings: ClientSettings, host: Host | None = None):
        super().__init__(settings, host)
        self.swarm: SwarmTrainer | None = None
        self.done = threading.Event()    # the coordinator said the run is done
        self.ready = threading.Event()   # set once the node and the trainer exist (heartbeats read them)

    def setup(self, cfg: RunConfig) -> None:
        self.run_cfg = cfg
        self.batches = self.sampler(cfg, f"trainer/{self.host.index}")   # tokenized with the model's tokenizer
        self._sample_lock = threading.Lock()
        self.node = self._start_node(client_mode=True)   # a trainer only dials out
        self.swarm = SwarmTrainer(self.node, self.run_id, cfg.stages, self.roster,
                                  model_config(self.options.local_run(cfg).model).hidden_size,
                                  timeouts=self.settings.trainer, checks=self.settings.spot_checks,
                                  chained=cfg.swarm_traffic == "chained")
        self.ready.set()

    def heartbeat_fields(self) -> dict:
        if not self.ready.is_set():  # still setting up
            return {}
        s = self.swarm.stats
        with s.lock:
            losses, s.losses = s.losses, []
            return dict(microbatches_completed=s.completed, microbatches_retried=s.retried,
                        microbatches_lost=s.lost, tokens=s.tokens,
                        train_loss=sum(losses) / len(losses) if losses else 0.0,
                        refused=_with_p2p(self.swarm.refusals.snapshot()),
                        lying=self.swarm.take_lying_reports(),
                        confirmed_tokens=dict(s.routed.most_common(MAX_NEIGHBOURS)))

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        if self.ready.is_set() and self.roster.update(reply.roster):
            self.swarm.apply_roster()   # a peer the coordinator dropped is not routed to from now on
        if reply.state == RunState.DONE:
            self.done.set()

    def _work_once(self) -> None:
        """One micro-batch; a lost one is logged (and counted), anything else stops the trainer (run_workers)."""
        with self._sample_lock:
            x, y = self.batches.sample()
        try:
            loss = self.swarm.step(x, y)
        except MicrobatchLost as err:
            log.error("micro-batch lost: %s", err)
            return
        n = self.swarm.stats.completed
        if n == 1 or n % 20 == 0:
            log.info("%d micro-batches, loss %.4f, %d replayed; DHT read %.3f s", n, loss,
                     self.swarm.stats.retried, self.swarm.lookup_seconds)

    def run(self) -> int:
        run_workers(self.options.inflight, self._work_once, self.done, join_s=60)
        self.session.stop_heartbeats()
        try:  # the final counts reach the coordinator
            self.session.beat()
        except grpc.RpcError as err:
            log.warning("the final heartbeat failed (%s): the coordinator keeps the previous counts", err.code().name)
        log.info("run finished: %d micro-batches, %d replayed, %d lost (last DHT read %.3f s)",
                 self.swarm.stats.completed, self.swarm.stats.retried, self.swarm.stats.lost,
                 self.swarm.lookup_seconds)
        return 0

    def close(self) -> None:
        if self.swarm is not None:
            self.swarm.close()
        if self.node is not None:
            self.node.shutdown()
