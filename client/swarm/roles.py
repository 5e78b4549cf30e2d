"""`fedswarm client --role peer|trainer`: the swarm roles of the client daemon."""
from __future__ import annotations

import hashlib
import logging
import threading
import time

from fedswarm import tokenized
from fedswarm.client.daemon import ClientDaemon
from fedswarm.client.swarm.routing import StageRecord, stage_key
from fedswarm.client.swarm.stage_server import HANDLER, StageServer
from fedswarm.client.swarm.swarm_trainer import MicrobatchLost, SwarmTrainer
from fedswarm.client.swarm.transport import SwarmNode
from fedswarm.proto import codec as C
from fedswarm.proto import fedswarm_pb2 as pb

log = logging.getLogger("fedswarm.swarm")
ANNOUNCE_EVERY_S, RECORD_TTL_S = 1.0, 4.0


class PeerDaemon(ClientDaemon):
    """Serves the stage the coordinator assigns; switches when re-assigned; syncs with the stage average."""

    role = "peer"

    def _setup(self, cfg: dict) -> None:
        self.run_cfg = cfg
        self.codec = C.codec_by_name(cfg["upload_codec"])
        self.feedback = C.ErrorFeedback(self.codec, cfg.get("codec_block_size") or None)
        with self.fork_guard:  # no gRPC call in flight while hivemind forks its DHT process
            self.node = SwarmNode(initial_peers=self.dht_peers)
        self.server = StageServer(self.run_id, cfg, self.device, self.precision)
        self.node.add_handler(HANDLER, self.server.handle, pb.StageRequest)
        self._switch_lock = threading.Lock()
        self._switch(self.assigned_stage, "assigned at join")
        self._announcer_stop = threading.Event()
        threading.Thread(target=self._announce_loop, name="announce", daemon=True).start()

    def _switch(self, stage: int, why: str) -> None:
        with self._switch_lock:
            if stage < 0 or stage == self.server.stage_index:
                return
            old = self.server.stage_index
            started = time.monotonic()
            self.server.serve(stage, self.fetch_model("", stage=stage))
            self._announce()
            log.warning("now serving stage %d (was %d): %s; ready in %.2f s", stage, old, why, time.monotonic() - started)

    def _announce(self) -> None:
        throughput, _, _, load = self.server.stats()
        record = StageRecord(self.node.peer_id, self.name, self.server.stage_index, max(throughput, 1.0), load)
        self.node.announce(stage_key(self.run_id, self.server.stage_index), self.node.peer_id, record.to_value(),
                           ttl=RECORD_TTL_S)

    def _announce_loop(self) -> None:
        while not self._announcer_stop.wait(ANNOUNCE_EVERY_S):
            try:
                self._announce()
            except Exception as err:  # noqa: BLE001 - a missed announce only shortens the record's life
                log.debug("announce failed: %s", err)

    def heartbeat_request(self) -> pb.HeartbeatRequest:
        if not hasattr(self, "_announcer_stop"):  # still setting up
            return super().heartbeat_request()
        throughput, steps, utilization, _ = self.server.stats()
        return pb.HeartbeatRequest(client_id=self.client_id, session_token=self.token, stage=self.server.stage_index,
                                   throughput=throughput, optimizer_steps=steps, load=utilization)

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        if hasattr(self, "_announcer_stop") and reply.stage >= 0 and reply.stage != self.server.stage_index:
            self._switch(reply.stage, "re-assigned by the coordinator")

    def train(self, task: pb.Task) -> None:
        """A stage sync: adopt the new average, upload the progress made since the last sync."""
        import json

        stage = int(json.loads(task.config_json).get("stage", -1))
        average = self.fetch_model(task.task_id)
        started = time.monotonic()
        with self._switch_lock:
            progress, tokens = self.server.sync(stage, average)
        reply = self.upload(task, progress, tokens, 0.0, time.monotonic() - started)
        log.info("stage %d sync %d: uploaded %d bytes of progress over %d tokens; %d of %d backward passes "
                 "re-ran their forward", stage, task.round, reply.bytes_received, tokens,
                 self.server.recomputed_total, self.server.backward_total)

    def run(self) -> int:
        try:
            return super().run()
        finally:
            if hasattr(self, "node"):
                self._announcer_stop.set()
                self.server.close()
                self.node.shutdown()


class TrainerDaemon(ClientDaemon):
    """Holds data and drives micro-batches through the swarm until the run is done."""

    role = "trainer"

    def _setup(self, cfg: dict) -> None:
        self.run_cfg = cfg
        tokens = tokenized.client_tokens(self.args, cfg, self.index, self.num_partitions)  # the model's tokenizer
        seed = int.from_bytes(hashlib.sha256(f"{cfg['seed']}/trainer/{self.index}".encode()).digest()[:4], "little")
        self.sampler = tokenized.sampler(tokens, cfg["seq_len"], cfg["batch_size"], seed)
        self._sample_lock = threading.Lock()
        with self.fork_guard:  # no gRPC call in flight while hivemind forks its DHT process
            self.node = SwarmNode(initial_peers=self.dht_peers)
        self.swarm = SwarmTrainer(self.node, self.run_id, cfg["stages"])
        self.done = threading.Event()

    def heartbeat_request(self) -> pb.HeartbeatRequest:
        if not hasattr(self, "done"):  # still setting up
            return super().heartbeat_request()
        s = self.swarm.stats
        with s.lock:
            losses, s.losses = s.losses, []
            return pb.HeartbeatRequest(client_id=self.client_id, session_token=self.token,
                                       microbatches_completed=s.completed, microbatches_retried=s.retried,
                                       microbatches_lost=s.lost, tokens=s.tokens,
                                       train_loss=sum(losses) / len(losses) if losses else 0.0)

    def on_heartbeat(self, reply: pb.HeartbeatReply) -> None:
        if reply.state == "done" and hasattr(self, "done"):
            self.done.set()

    def _work(self) -> None:
        while not self.done.is_set():
            with self._sample_lock:
                x, y = self.sampler.sample()
            try:
                loss = self.swarm.step(x, y)
            except MicrobatchLost as err:
                log.error("micro-batch lost: %s", err)
                continue
            n = self.swarm.stats.completed
            if n % 20 == 0:
                log.info("%d micro-batches, loss %.4f, %d replayed; DHT read %.3f s", n, loss,
                         self.swarm.stats.retried, self.swarm.lookup_seconds)

    def run(self) -> int:
        self.join()
        workers = [threading.Thread(target=self._work, name=f"microbatch-{i}", daemon=True)
                   for i in range(max(1, self.args.inflight))]
        try:
            for w in workers:
                w.start()
            self.done.wait()
            for w in workers:
                w.join(timeout=60)
            try:  # the final counts reach the coordinator
                self.stub.Heartbeat(self.heartbeat_request(), timeout=self.t.rpc_s)
            except Exception:  # noqa: BLE001
                pass
            log.info("run finished: %d micro-batches, %d replayed, %d lost (last DHT read %.3f s)",
                     self.swarm.stats.completed, self.swarm.stats.retried, self.swarm.stats.lost,
                     self.swarm.lookup_seconds)
            return 0
        finally:
            self._hb_stop.set()
            self.swarm.close()
            self.node.shutdown()
            self.channel.close()
