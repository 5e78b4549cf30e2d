"""Data tokenized once with the model's tokenizer into memory-mapped token shards.

A split (train partition I/N, or eval) of a corpus is tokenized in bounded
batches straight to disk: ``ids.bin`` (uint16 or uint32) and, for chat data,
``targets.bin`` (uint8, 1 where a token carries loss). Shards live beside the
data in ``.fedswarm-tokens/<key>/`` (or in the cache dir when that folder is not
writable), keyed by the tokenizer's fingerprint, the format and the hashes of
the data files, so a restart maps them again instead of re-tokenizing, and a
corpus larger than RAM trains with flat memory (pages come and go with the
page cache).

The byte tokenizer on plain text keeps `fedswarm.data` exactly (same tokens,
same splits); a single text file is memory-mapped in place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedswarm import data as D
from fedswarm import formats as F
from fedswarm.errors import BadInput, one_line

log = logging.getLogger(__name__)
CACHE_DIRNAME = ".fedswarm-tokens"
_TEXT_CHUNK = 1 << 20          # bytes of plain text tokenized per batch
_RECORD_BATCH = 256            # records tokenized per batch


@dataclass
class Tokens:
    """A token stream: ids (maybe memory-mapped) and, for chat data, which tokens carry loss."""

    ids: np.ndarray
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDSWARM_CACHE") or Path.home() / ".cache" / "fedswarm" / "tokens")


# ---------------------------------------------------------------- entry points

def train_tokens(spec: F.DataSpec, tokenizer, index: int, num_partitions: int,
                 cache_dir: str | Path | None = None) -> Tokens:
    """Tokens of train partition `index` of `num_partitions`."""
    D._check_partition(index, num_partitions)
    return _tokens(spec, tokenizer, ("train", index, num_partitions), cache_dir)


def eval_tokens(spec: F.DataSpec, tokenizer, cache_dir: str | Path | None = None) -> Tokens:
    """Tokens of the held-out split."""
    return _tokens(spec, tokenizer, ("eval",), cache_dir)


def sampler(tokens: Tokens, seq_len: int, batch_size: int, seed: int) -> D.BatchSampler:
    return D.BatchSampler(tokens.ids, seq_len, batch_size, seed, targets=tokens.targets)


def windows(tokens: Tokens, seq_len: int, max_windows: int) -> torch.Tensor:
    """Eval windows: [N, T+1], or [N, 2, T+1] with a labels row (-100 off target) for chat data."""
    return D.eval_windows(tokens.ids, seq_len, max_windows, targets=tokens.targets)


# ---------------------------------------------------------------- dispatch

def _tokens(spec: F.DataSpec, tokenizer, split: tuple, cache_dir) -> Tokens:
    kind = F.source_kind(spec.data)
    if spec.format == "chat":
        if kind == "text":
            raise ValueError(f"--format chat reads prompt/response records: point --data at JSON Lines, Parquet or "
                             f"a datasets folder, not {spec.data!r}")
        if getattr(tokenizer, "is_bytes", False) or not getattr(tokenizer, "chat_template", None):
            raise ValueError("--format chat needs a tokenizer with a chat template: use a Hugging Face model folder "
                             "whose tokenizer has one (tokenizer.chat_template), or --format text")
    if kind == "text" and getattr(tokenizer, "is_bytes", False):
        return _byte_text(spec.data, split)
    return _cached(spec, kind, tokenizer, split, cache_dir)


def _byte_text(data: str, split: tuple) -> Tokens:
    """fedswarm.data's tokens unchanged; a single text file is mapped in place instead of read."""
    plan = D._plan(data)
    single = not plan.by_groups and len(plan.files) == 1
    if split[0] == "eval":
        return Tokens(D.load_eval_tokens(data))
    if not single:
        return Tokens(D.load_train_tokens(data, split[1], split[2]))
    train_len = plan.total * 9 // 10
    lo, hi = split[1] * train_len // split[2], (split[1] + 1) * train_len // split[2]
    if hi <= lo:
        raise D._no_data(data, split[1], split[2])
    return Tokens(np.memmap(plan.files[0].path, dtype=np.uint8, mode="r", offset=lo, shape=(hi - lo,)))


# ---------------------------------------------------------------- the cache

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(spec: F.DataSpec, kind: str, tokenizer, split: tuple) -> str:
    if spec.data == D.STDLIB:
        files = [Path(f.path) for f in D._plan(spec.data).files]
    else:
        files = F.source_files(spec.data)
    root = Path(spec.data) if spec.data != D.STDLIB else Path("/")
    described = {
        "v": 1, "tokenizer": tokenizer.fingerprint(), "kind": kind, "split": list(split),
        "format": spec.format, "fields": [spec.text_field, spec.prompt_field, spec.response_field],
        "files": [[str(p.relative_to(root)) if root in p.parents else p.name, _file_digest(p)] for p in files],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def _cache_root(data: str, cache_dir) -> Path:
    """Beside the data when a folder can be made there, else the cache dir (read-only data, the stdlib)."""
    if data != D.STDLIB:
        base = Path(data) if Path(data).is_dir() else Path(data).parent
        try:
            (base / CACHE_DIRNAME).mkdir(exist_ok=True)
            return base / CACHE_DIRNAME
        except OSError as err:
            log.info("cannot cache tokens beside %s (%s); using the cache dir", data, err.strerror)
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _open_shard(folder: Path) -> Tokens:
    meta = json.loads((folder / "meta.json").read_text())
    n = int(meta["tokens"])
    if n == 0:
        return Tokens(np.zeros(0, dtype=meta["dtype"]))
    ids = np.memmap(folder / "ids.bin", dtype=meta["dtype"], mode="r", shape=(n,))
    targets = np.memmap(folder / "targets.bin", dtype=np.uint8, mode="r", shape=(n,)) if meta["targets"] else None
    return Tokens(ids, targets)


def _cached(spec: F.DataSpec, kind: str, tokenizer, split: tuple, cache_dir) -> Tokens:
    root = _cache_root(spec.data, cache_dir)
    folder = root / cache_key(spec, kind, tokenizer, split)
    if (folder / "meta.json").is_file():
        log.info("using tokenized shard %s", folder)
        tokens = _open_shard(folder)
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            pieces = _text_pieces(spec.data, tokenizer, split) if kind == "text" else \
                _record_pieces(spec, kind, tokenizer, split)
            count = _write_shard(tmp, pieces, len(tokenizer), chat=spec.format == "chat")
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same shard first: use theirs
                if not (folder / "meta.json").is_file():
                    raise
            log.info("tokenized %s (%s) into %d tokens at %s", spec.data, "/".join(map(str, split)), count, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tokens = _open_shard(folder)
    if len(tokens) == 0:
        where = "eval split" if split[0] == "eval" else f"partition {split[1]}/{split[2]}"
        raise ValueError(f"the {where} of {spec.data!r} has no tokens; use fewer partitions or more data")
    return tokens


def _write_shard(folder: Path, pieces: Iterator[tuple[list[int], list[int] | None]], vocab: int, chat: bool) -> int:
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    count = 0
    with open(folder / "ids.bin", "wb") as ids_out, open(folder / "targets.bin", "wb") as tgt_out:
        for ids, targets in pieces:
            ids_out.write(np.asarray(ids, dtype=dtype).tobytes())
            if chat:
                tgt_out.write(np.asarray(targets, dtype=np.uint8).tobytes())
            count += len(ids)
        for fh in (ids_out, tgt_out):
            fh.flush()
            os.fsync(fh.fileno())
    (folder / "meta.json").write_text(json.dumps({"tokens": count, "dtype": np.dtype(dtype).name, "targets": chat}))
    return count


# ---------------------------------------------------------------- tokenizing

def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if getattr(tokenizer, "is_bytes", False):
        return [tokenizer.encode(t) for t in texts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _text_span(data: str, split: tuple) -> tuple[tuple, int, int]:
    if split[0] == "eval":
        return D._eval_bytes(D._plan(data))
    return D.train_span(data, split[1], split[2])


def _text_pieces(data: str, tokenizer, split: tuple) -> Iterator[tuple[list[int], None]]:
    """Plain text tokenized in ~1 MiB pieces cut at line ends (so no token straddles a cut)."""
    files, lo, hi = _text_span(data, split)
    carry = b""
    for block in D.iter_span(files, lo, hi, _TEXT_CHUNK):
        carry += block
        if len(carry) < _TEXT_CHUNK:
            continue
        cut = carry.rfind(b"\n") + 1 or len(carry)
        text, carry = carry[:cut], carry[cut:]
        yield _encode_batch(tokenizer, [text.decode("utf-8", errors="replace")])[0], None
    if carry:
        yield _encode_batch(tokenizer, [carry.decode("utf-8", errors="replace")])[0], None


def _record_pieces(spec: F.DataSpec, kind: str, tokenizer, split: tuple) -> Iterator[tuple[list[int], list[int] | None]]:
    records = F.split_records(F.iter_records(spec.data, kind), split)
    batch: list[tuple[str, dict]] = []
    for item in records:
        batch.append(item)
        if len(batch) >= _RECORD_BATCH:
            yield from _tokenize_records(spec, tokenizer, batch)
            batch = []
    if batch:
        yield from _tokenize_records(spec, tokenizer, batch)


def _tokenize_records(spec: F.DataSpec, tokenizer, batch: list[tuple[str, dict]]):
    if spec.format == "chat":
        yield from _chat_records(spec, tokenizer, batch)
        return
    sep = getattr(tokenizer, "eos_token_id", None)
    sep = 10 if sep is None else sep  # the byte tokenizer ends a document with "\n"
    texts = [F.field(r, spec.text_field, where, "--text-field") for where, r in batch]
    for ids in _encode_batch(tokenizer, texts):
        yield list(ids) + [sep], None


def _chat_records(spec: F.DataSpec, tokenizer, batch: list[tuple[str, dict]]):
    """Prompt and response through the chat template; only the response's tokens (and its end) carry loss."""
    prompts = [[{"role": "user", "content": F.field(r, spec.prompt_field, w, "--prompt-field")}] for w, r in batch]
    replies = [F.field(r, spec.response_field, w, "--response-field") for w, r in batch]
    heads = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=False)
    fulls = tokenizer.apply_chat_template([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, replies)],
                                          tokenize=True, return_dict=False)
    for (where, _), head, full in zip(batch, heads, fulls):
        head, full = list(head), list(full)
        if full[:len(head)] != head:
            raise ValueError(f"{where}: the chat template renders the prompt differently once a response follows, so "
                             f"the response's tokens cannot be told apart; use a template whose prompt is a prefix")
        yield full, [0] * len(head) + [1] * (len(full) - len(head))


# ---------------------------------------------------------------- a participant's data

PREFLIGHT_BYTES = 64 << 20   # JSON Lines bytes check_source reads line by line (the rest: checked as tokenized)


def check_source(data: str, fields: list[tuple[str, str]] = ()) -> None:
    """Fail fast, before connecting or tokenizing: BadInput naming the file and the problem when `data` is
    missing, empty or unreadable, or its records (JSON Lines: the first PREFLIGHT_BYTES; Parquet: the columns)
    are not JSON objects or lack a (field, flag) of `fields`."""
    try:
        _check_source(data, list(fields))
    except BadInput:
        raise
    except ValueError as err:
        raise BadInput(f"--data: {one_line(err)}") from None


def _check_source(data: str, fields: list[tuple[str, str]]) -> None:
    if data == D.STDLIB:
        return
    path = Path(data)
    if not path.exists():
        raise BadInput(f"--data {data}: no such file or folder; pass an existing file or folder, or stdlib "
                       f"(the running Python's own sources)")
    kind = F.source_kind(data)
    if kind == "datasets":
        return   # datasets.load_from_disk checks its own folder when it is read
    files = F.source_files(data)
    if not files:
        raise BadInput(f"--data {data}: the folder holds no files")
    for file in files:
        try:
            with open(file, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise BadInput(f"--data: {file} cannot be read ({err.strerror or err})") from None
    if path.is_file() and path.stat().st_size == 0:
        raise BadInput(f"--data {data} is empty: point --data at a file with text or records in it")
    if kind == "text":
        D._plan(data)   # a folder must hold UTF-8 text
    budget = PREFLIGHT_BYTES
    for file in files:
        if kind == "jsonl" and budget > 0:
            budget -= F.check_jsonl(file, fields, budget)
        elif kind == "parquet":
            F.check_parquet(file, fields)


def client_tokens(spec: F.DataSpec, model: str, index: int, num_partitions: int,
                  cache_dir: str | None = None) -> Tokens:
    """A client's train tokens: its data (`spec`: its --data with the run's format or its own flags), tokenized
    with the tokenizer of its copy of the run's model; BadInput if they cannot be."""
    from fedswarm.tokenizer import load_tokenizer

    try:
        return train_tokens(spec, load_tokenizer(model), index, num_partitions, cache_dir)
    except BadInput:
        raise
    except ValueError as err:
        raise BadInput(one_line(err)) from None
