from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_NONE: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_BF16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]
    CODEC_INT4: _ClassVar[Codec]
    CODEC_TOPK: _ClassVar[Codec]
    CODEC_INT2: _ClassVar[Codec]
    CODEC_SIGN: _ClassVar[Codec]
    CODEC_MASKED: _ClassVar[Codec]
    CODEC_INT2Z: _ClassVar[Codec]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_NONE: _ClassVar[TaskKind]
    TASK_TRAIN: _ClassVar[TaskKind]
    TASK_DONE: _ClassVar[TaskKind]
    TASK_EVALUATE: _ClassVar[TaskKind]
    TASK_SECAGG: _ClassVar[TaskKind]
CODEC_NONE: Codec
CODEC_FP16: Codec
CODEC_BF16: Codec
CODEC_INT8: Codec
CODEC_INT4: Codec
CODEC_TOPK: Codec
CODEC_INT2: Codec
CODEC_SIGN: Codec
CODEC_MASKED: Codec
CODEC_INT2Z: Codec
TASK_NONE: TaskKind
TASK_TRAIN: TaskKind
TASK_DONE: TaskKind
TASK_EVALUATE: TaskKind
TASK_SECAGG: TaskKind

class TensorPart(_message.Message):
    __slots__ = ("name", "shape", "codec", "block_size", "offset", "count", "data", "scales", "topk", "bits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: Codec
    block_size: int
    offset: int
    count: int
    data: bytes
    scales: bytes
    topk: int
    bits: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[_Union[Codec, str]] = ..., block_size: _Optional[int] = ..., offset: _Optional[int] = ..., count: _Optional[int] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., topk: _Optional[int] = ..., bits: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("name", "device", "precision", "resume_client_id", "public_key", "signature", "resume_token", "nonce", "role", "challenge", "p2p_peer_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RESUME_CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    P2P_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    precision: str
    resume_client_id: int
    public_key: bytes
    signature: bytes
    resume_token: str
    nonce: bytes
    role: str
    challenge: bytes
    p2p_peer_id: str
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., resume_client_id: _Optional[int] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., resume_token: _Optional[str] = ..., nonce: _Optional[bytes] = ..., role: _Optional[str] = ..., challenge: _Optional[bytes] = ..., p2p_peer_id: _Optional[str] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("run_id", "challenge", "expires_in_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    challenge: bytes
    expires_in_s: float
    def __init__(self, run_id: _Optional[str] = ..., challenge: _Optional[bytes] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class StageRoster(_message.Message):
    __slots__ = ("peer_ids",)
    PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    peer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SwarmRoster(_message.Message):
    __slots__ = ("stages", "trainer_peer_ids", "version")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TRAINER_PEER_IDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageRoster]
    trainer_peer_ids: _containers.RepeatedScalarFieldContainer[str]
    version: int
    def __init__(self, stages: _Optional[_Iterable[_Union[StageRoster, _Mapping]]] = ..., trainer_peer_ids: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "session_token", "run_id", "run_config_json", "heartbeat_interval_s", "lease_s", "dht_peers", "stage", "roster")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    DHT_PEERS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    run_id: str
    run_config_json: str
    heartbeat_interval_s: float
    lease_s: float
    dht_peers: _containers.RepeatedScalarFieldContainer[str]
    stage: int
    roster: SwarmRoster
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., run_id: _Optional[str] = ..., run_config_json: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., dht_peers: _Optional[_Iterable[str]] = ..., stage: _Optional[int] = ..., roster: _Optional[_Union[SwarmRoster, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "stage", "throughput", "optimizer_steps", "microbatches_completed", "microbatches_retried", "microbatches_lost", "tokens", "load", "train_loss", "refused", "switch_s", "lying", "confirmed_tokens")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ConfirmedTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_RETRIED_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_LOST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    SWITCH_S_FIELD_NUMBER: _ClassVar[int]
    LYING_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    stage: int
    throughput: float
    optimizer_steps: int
    microbatches_completed: int
    microbatches_retried: int
    microbatches_lost: int
    tokens: int
    load: float
    train_loss: float
    refused: _containers.ScalarMap[str, int]
    switch_s: float
    lying: _containers.RepeatedCompositeFieldContainer[LyingReport]
    confirmed_tokens: _containers.ScalarMap[str, int]
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., stage: _Optional[int] = ..., throughput: _Optional[float] = ..., optimizer_steps: _Optional[int] = ..., microbatches_completed: _Optional[int] = ..., microbatches_retried: _Optional[int] = ..., microbatches_lost: _Optional[int] = ..., tokens: _Optional[int] = ..., load: _Optional[float] = ..., train_loss: _Optional[float] = ..., refused: _Optional[_Mapping[str, int]] = ..., switch_s: _Optional[float] = ..., lying: _Optional[_Iterable[_Union[LyingReport, _Mapping]]] = ..., confirmed_tokens: _Optional[_Mapping[str, int]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("state", "round", "stage", "roster")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    state: str
    round: int
    stage: int
    roster: SwarmRoster
    def __init__(self, state: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[int] = ..., roster: _Optional[_Union[SwarmRoster, _Mapping]] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "wait_s")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    wait_s: float
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "task_id", "round", "config_json", "num_tensors")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    task_id: str
    round: int
    config_json: str
    num_tensors: int
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., config_json: _Optional[str] = ..., num_tensors: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id", "max_part_bytes", "stage", "has_version", "held_version", "held_digest")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_PART_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HAS_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    HELD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    task_id: str
    max_part_bytes: int
    stage: int
    has_version: bool
    held_version: int
    held_digest: bytes
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., max_part_bytes: _Optional[int] = ..., stage: _Optional[int] = ..., has_version: _Optional[bool] = ..., held_version: _Optional[int] = ..., held_digest: _Optional[bytes] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("part", "version", "delta", "digest")
    PART_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    part: TensorPart
    version: int
    delta: bool
    digest: bytes
    def __init__(self, part: _Optional[_Union[TensorPart, _Mapping]] = ..., version: _Optional[int] = ..., delta: _Optional[bool] = ..., digest: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id", "round", "num_examples", "train_loss", "num_tensors", "num_parts", "train_seconds", "signature", "base_digest", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    task_id: str
    round: int
    num_examples: int
    train_loss: float
    num_tensors: int
    num_parts: int
    train_seconds: float
    signature: bytes
    base_digest: bytes
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., num_tensors: _Optional[int] = ..., num_parts: _Optional[int] = ..., train_seconds: _Optional[float] = ..., signature: _Optional[bytes] = ..., base_digest: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "part")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    part: TensorPart
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., part: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted", "message", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    bytes_received: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id", "round", "loss", "tokens", "eval_seconds", "signature", "base_digest", "error")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    task_id: str
    round: int
    loss: float
    tokens: int
    eval_seconds: float
    signature: bytes
    base_digest: bytes
    error: str
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., tokens: _Optional[int] = ..., eval_seconds: _Optional[float] = ..., signature: _Optional[bytes] = ..., base_digest: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("client_id", "session_token", "task_id", "round", "stage", "pk1", "pk2", "node_ids", "blobs", "self_mask", "signature")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PK1_FIELD_NUMBER: _ClassVar[int]
    PK2_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_token: str
    task_id: str
    round: int
    stage: str
    pk1: bytes
    pk2: bytes
    node_ids: _containers.RepeatedScalarFieldContainer[int]
    blobs: _containers.RepeatedScalarFieldContainer[bytes]
    self_mask: _containers.RepeatedScalarFieldContainer[bool]
    signature: bytes
    def __init__(self, client_id: _Optional[int] = ..., session_token: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[str] = ..., pk1: _Optional[bytes] = ..., pk2: _Optional[bytes] = ..., node_ids: _Optional[_Iterable[int]] = ..., blobs: _Optional[_Iterable[bytes]] = ..., self_mask: _Optional[_Iterable[bool]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("public_key", "signature", "challenge", "nonce", "history", "from_round", "max_rounds")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    challenge: bytes
    nonce: bytes
    history: bool
    from_round: int
    max_rounds: int
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., challenge: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., history: _Optional[bool] = ..., from_round: _Optional[int] = ..., max_rounds: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class SwarmTensor(_message.Message):
    __slots__ = ("shape", "codec", "block_size", "data", "scales")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: Codec
    block_size: int
    data: bytes
    scales: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., codec: _Optional[_Union[Codec, str]] = ..., block_size: _Optional[int] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("run_id", "stage", "microbatch_id", "ids", "ids_shape", "hidden", "labels", "grad_output", "backward", "next_hops", "audit", "verify")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    IDS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage: int
    microbatch_id: str
    ids: bytes
    ids_shape: _containers.RepeatedScalarFieldContainer[int]
    hidden: SwarmTensor
    labels: bytes
    grad_output: SwarmTensor
    backward: bool
    next_hops: _containers.RepeatedScalarFieldContainer[str]
    audit: bool
    verify: bool
    def __init__(self, run_id: _Optional[str] = ..., stage: _Optional[int] = ..., microbatch_id: _Optional[str] = ..., ids: _Optional[bytes] = ..., ids_shape: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[SwarmTensor, _Mapping]] = ..., labels: _Optional[bytes] = ..., grad_output: _Optional[_Union[SwarmTensor, _Mapping]] = ..., backward: _Optional[bool] = ..., next_hops: _Optional[_Iterable[str]] = ..., audit: _Optional[bool] = ..., verify: _Optional[bool] = ...) -> None: ...

class StageReceipt(_message.Message):
    __slots__ = ("microbatch_id", "stage", "input_digest", "output_digest", "loss", "public_key", "signature", "output", "failed_peer", "failed_reason", "weights_version")
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FAILED_PEER_FIELD_NUMBER: _ClassVar[int]
    FAILED_REASON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    microbatch_id: str
    stage: int
    input_digest: bytes
    output_digest: bytes
    loss: float
    public_key: bytes
    signature: bytes
    output: SwarmTensor
    failed_peer: str
    failed_reason: str
    weights_version: bytes
    def __init__(self, microbatch_id: _Optional[str] = ..., stage: _Optional[int] = ..., input_digest: _Optional[bytes] = ..., output_digest: _Optional[bytes] = ..., loss: _Optional[float] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., output: _Optional[_Union[SwarmTensor, _Mapping]] = ..., failed_peer: _Optional[str] = ..., failed_reason: _Optional[str] = ..., weights_version: _Optional[bytes] = ...) -> None: ...

class StageReply(_message.Message):
    __slots__ = ("hidden", "grad_input", "loss", "optimizer_step", "recomputed", "failed_peer", "failed_reason", "receipts")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STEP_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_PEER_FIELD_NUMBER: _ClassVar[int]
    FAILED_REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    hidden: SwarmTensor
    grad_input: SwarmTensor
    loss: float
    optimizer_step: int
    recomputed: bool
    failed_peer: str
    failed_reason: str
    receipts: _containers.RepeatedCompositeFieldContainer[StageReceipt]
    def __init__(self, hidden: _Optional[_Union[SwarmTensor, _Mapping]] = ..., grad_input: _Optional[_Union[SwarmTensor, _Mapping]] = ..., loss: _Optional[float] = ..., optimizer_step: _Optional[int] = ..., recomputed: _Optional[bool] = ..., failed_peer: _Optional[str] = ..., failed_reason: _Optional[str] = ..., receipts: _Optional[_Iterable[_Union[StageReceipt, _Mapping]]] = ...) -> None: ...

class LyingReport(_message.Message):
    __slots__ = ("stage", "receipts", "request")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    stage: int
    receipts: _containers.RepeatedCompositeFieldContainer[StageReceipt]
    request: StageRequest
    def __init__(self, stage: _Optional[int] = ..., receipts: _Optional[_Iterable[_Union[StageReceipt, _Mapping]]] = ..., request: _Optional[_Union[StageRequest, _Mapping]] = ...) -> None: ...
