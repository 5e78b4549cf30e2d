"""Byte-level corpora for fedswarm: loading, deterministic splits, batching.

Tokens are raw UTF-8 bytes (vocab 256). A corpus is named by ``data``:

* ``"stdlib"`` -- the ``*.py`` sources of the running Python's standard library
  (no download needed). Groups are top-level modules; ~10% of groups (by a
  stable hash) are held out for eval, the rest are binned greedily by size
  into balanced but non-IID train partitions (with more partitions than groups, the
  train groups in path order are cut into equal contiguous pieces instead).
* a path to a text file -- eval is the last 10% of its bytes, train is the
  first 90% cut into equal contiguous pieces.
* a path to a folder -- UTF-8 files under it, grouped by top-level entry, then
  the stdlib rules (falls back to the file rule when that cannot work).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

VOCAB_SIZE = 256
STDLIB = "stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SKIP_STDLIB_TOP = {"test", "idlelib"}
_EVAL_CHUNK = 8192


@dataclass(frozen=True)
class _File:
    path: str
    group: str
    size: int


@dataclass(frozen=True)
class _Plan:
    """How a corpus splits: by groups, or as one contiguous byte stream."""

    source: str
    files: tuple[_File, ...]  # sorted by relative path
    by_groups: bool

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files) + max(len(self.files) - 1, 0)


# ---------------------------------------------------------------- discovery

def is_eval_group(name: str) -> bool:
    """Stable hold-out rule: about 1 group in 10 goes to eval."""
    return hashlib.sha256(name.encode("utf-8")).digest()[0] % 10 == 0


def _walk(root: str):
    """Yield (relative path, absolute path) of regular files, sorted, skipping hidden/cache dirs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield os.path.relpath(full, root).replace(os.sep, "/"), full


def _group_of(rel: str) -> str:
    """Top-level entry of a relative path, ``.py`` stripped (``os.py`` -> ``os``)."""
    top = rel.split("/", 1)[0]
    return top[:-3] if top.endswith(".py") else top


@functools.lru_cache(maxsize=None)
def _stdlib_plan() -> _Plan:
    root = sysconfig.get_paths()["stdlib"]
    files = [
        _File(full, _group_of(rel), os.stat(full).st_size)
        for rel, full in sorted(_walk(root))
        if rel.endswith(".py") and rel.split("/", 1)[0] not in _SKIP_STDLIB_TOP
    ]
    if not files:
        raise ValueError(f"no .py files found under {root}; pass a text file or folder as --data")
    return _fallback_if_needed(_Plan(f"stdlib ({root})", tuple(files), True))


def _is_utf8(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read().decode("utf-8")
        return True
    except (OSError, UnicodeDecodeError):
        return False


def _folder_plan(root: str) -> _Plan:
    files = [
        _File(full, rel.split("/", 1)[0], os.path.getsize(full))
        for rel, full in sorted(_walk(root))
        if _is_utf8(full)
    ]
    if not files:
        raise ValueError(f"folder {root} holds no UTF-8 text files; point --data at text, or use 'stdlib'")
    return _fallback_if_needed(_Plan(root, tuple(files), True))


def _fallback_if_needed(plan: _Plan) -> _Plan:
    """Use the contiguous file rule when groups cannot give both a train and an eval split."""
    groups = {f.group for f in plan.files}
    n_eval = sum(is_eval_group(g) for g in groups)
    if len(groups) < 2 or n_eval == 0 or n_eval == len(groups):
        return _Plan(plan.source, plan.files, False)
    return plan


def _plan(data: str) -> _Plan:
    if data == STDLIB:
        return _stdlib_plan()
    if not os.path.exists(data):
        raise ValueError(f"data path {data!r} does not exist; pass an existing text file or folder, "
                         f"or use 'stdlib' (the built-in default: Python's own standard library sources)")
    if os.path.isdir(data):
        return _folder_plan(data)
    return _Plan(data, (_File(data, os.path.basename(data), os.path.getsize(data)),), False)


# ---------------------------------------------------------------- splitting

def assign_bins(sizes: dict[str, int], num_partitions: int) -> list[list[str]]:
    """Greedy balance: largest group first into the currently smallest bin (ties: lowest index)."""
    bins: list[list[str]] = [[] for _ in range(num_partitions)]
    totals = [0] * num_partitions
    for name in sorted(sizes, key=lambda g: (-sizes[g], g)):
        i = min(range(num_partitions), key=lambda b: (totals[b], b))
        bins[i].append(name)
        totals[i] += sizes[name]
    return [sorted(b) for b in bins]


def group_assignment(data: str, num_partitions: int) -> tuple[list[list[str]], list[str]]:
    """(train groups per partition, eval groups); empty lists when ``data`` splits contiguously."""
    _check_partition(0, num_partitions)
    plan = _plan(data)
    if not plan.by_groups:
        return [[] for _ in range(num_partitions)], []
    sizes: dict[str, int] = {}
    for f in plan.files:
        sizes[f.group] = sizes.get(f.group, 0) + f.size
    train = {g: s for g, s in sizes.items() if not is_eval_group(g)}
    return assign_bins(train, num_partitions), sorted(g for g in sizes if is_eval_group(g))


def iter_span(files, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Bytes [start, end) of the files joined by b"\\n", in pieces of at most ``chunk``, reading only what is needed."""
    pos = 0
    for i, f in enumerate(files):
        if pos >= end:
            break
        lo, hi = max(start, pos), min(end, pos + f.size)
        if lo < hi:
            with open(f.path, "rb") as fh:
                fh.seek(lo - pos)
                left = hi - lo
                while left > 0:
                    block = fh.read(min(chunk, left))
                    if not block:
                        break
                    left -= len(block)
                    yield block
        pos += f.size
        if i < len(files) - 1:
            if start <= pos < end:
                yield b"\n"
            pos += 1


def _read_span(files: tuple[_File, ...], start: int, end: int) -> bytearray:
    """Bytes [start, end) of the files joined by b"\\n", as one buffer."""
    return bytearray().join(iter_span(files, start, end))


def _tokens(buf: bytearray) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)


def _check_partition(index: int, num_partitions: int) -> None:
    if num_partitions < 1 or not 0 <= index < num_partitions:
        raise ValueError(f"partition {index}/{num_partitions} is invalid; need 0 <= index < num_partitions, e.g. '0/2'")


def _no_data(data: str, index: int, num_partitions: int) -> ValueError:
    return ValueError(f"partition {index}/{num_partitions} of {data!r} has no data; "
                      f"use fewer partitions or a larger corpus")


def train_span(data: str, index: int, num_partitions: int) -> tuple[tuple[_File, ...], int, int]:
    """(files, start, end) of train partition ``index`` of ``num_partitions``: the one split that both the
    byte path and the tokenizer path read."""
    _check_partition(index, num_partitions)
    plan = _plan(data)
    train_files = tuple(f for f in plan.files if not is_eval_group(f.group)) if plan.by_groups else ()
    if plan.by_groups and num_partitions > len({f.group for f in train_files}):
        # More partitions than groups (a thousand-client simulation): cut the train groups, in path
        # order, into equal contiguous pieces, so each piece still comes mostly from one module.
        total = sum(f.size for f in train_files) + len(train_files) - 1
        return train_files, index * total // num_partitions, (index + 1) * total // num_partitions
    if plan.by_groups:
        mine = set(group_assignment(data, num_partitions)[0][index])
        files = tuple(f for f in plan.files if f.group in mine)
        return files, 0, sum(f.size for f in files) + len(files) - 1
    train_len = plan.total * 9 // 10
    return plan.files, index * train_len // num_partitions, (index + 1) * train_len // num_partitions


def load_train_tokens(data: str, index: int, num_partitions: int) -> np.ndarray:
    """uint8 tokens of train partition ``index`` (0-based) of ``num_partitions``."""
    files, lo, hi = train_span(data, index, num_partitions)
    buf = _read_span(files, lo, hi) if files else bytearray()
    if not buf:
        raise _no_data(data, index, num_partitions)
    return _tokens(buf)


def _eval_bytes(plan: _Plan) -> tuple[tuple[_File, ...], int, int]:
    """(files, start, end) of the eval span."""
    if plan.by_groups:
        files = tuple(f for f in plan.files if is_eval_group(f.group))
        return files, 0, sum(f.size for f in files) + len(files) - 1
    return plan.files, plan.total * 9 // 10, plan.total


def _evenly_spaced_chunks(tokens: np.ndarray, max_tokens: int) -> np.ndarray:
    """Up to ``max_tokens`` tokens as equal contiguous chunks spread evenly over ``tokens``."""
    if len(tokens) <= max_tokens:
        return tokens
    chunk = min(_EVAL_CHUNK, max_tokens)
    k = max_tokens // chunk
    return np.concatenate([tokens[i * len(tokens) // k:][:chunk] for i in range(k)])


def load_eval_tokens(data: str, max_tokens: int = 1 << 18) -> np.ndarray:
    """uint8 tokens of the held-out eval split, capped deterministically at ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    files, lo, hi = _eval_bytes(_plan(data))
    buf = _read_span(files, lo, hi)
    if not buf:
        raise ValueError(f"eval split of {data!r} is empty; use a larger corpus")
    return _evenly_spaced_chunks(_tokens(buf), max_tokens)


def parse_partition(spec: str) -> tuple[int, int]:
    """Parse a 0-based ``"I/N"`` partition spec, e.g. ``"0/2"`` -> ``(0, 2)``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise ValueError(f"partition {spec!r} is not of the form 'I/N' (0-based), e.g. '0/2' or '1/2'")
    index, n = int(m.group(1)), int(m.group(2))
    _check_partition(index, n)
    return index, n


def describe(data: str) -> dict:
    """Summary of a corpus for reports (uses file sizes only)."""
    plan = _plan(data)
    files, lo, hi = _eval_bytes(plan)
    groups = len({f.group for f in plan.files})
    if plan.by_groups:
        train_files = [f for f in plan.files if not is_eval_group(f.group)]
        train = sum(f.size for f in train_files) + len(train_files) - 1
    else:
        train = lo
    return {"source": plan.source, "groups": groups, "train_bytes": train, "eval_bytes": hi - lo}


# ---------------------------------------------------------------- batching

def _check_window(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of seq_len={seq_len}; "
                         f"use a shorter seq_len or more data")


def _token_array(tokens: np.ndarray) -> np.ndarray:
    """Token ids as they are stored (uint8 bytes, uint16/uint32 tokenizer ids; a memmap stays mapped)."""
    tokens = np.asarray(tokens)
    return tokens if tokens.dtype in (np.uint8, np.uint16, np.uint32) else tokens.astype(np.uint8)


class BatchSampler:
    """Random (x, y) windows from a token array, reproducible from a seed.

    ``targets`` (uint8, 1 where a token carries loss, e.g. a chat response) sets y to -100 elsewhere."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 targets: np.ndarray | None = None):
        _check_window(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokens = _token_array(tokens)
        self.targets = targets
        self.seq_len, self.batch_size = seq_len, batch_size
        self._rng = np.random.default_rng(seed)
        self._offsets = np.arange(seq_len + 1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [B, T]; y is x shifted left by one token (-100 where it is not a target)."""
        starts = self._rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        idx = starts[:, None] + self._offsets
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        if self.targets is None:
            return w[:, :-1], w[:, 1:]
        keep = torch.from_numpy(self.targets[idx[:, 1:]].astype(bool))
        return w[:, :-1], torch.where(keep, w[:, 1:], torch.full_like(w[:, 1:], -100))


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int, targets: np.ndarray | None = None) -> torch.Tensor:
    """int64 [N, T+1] evenly spaced, non-overlapping windows; N = min(max_windows, available).

    With ``targets``: [N, 2, T+1], row 1 the labels (the ids, -100 where not a target)."""
    _check_window(tokens, seq_len)
    if max_windows < 1:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    width = seq_len + 1
    avail = len(tokens) // width
    n = min(max_windows, avail)
    starts = (np.arange(n) * avail // n) * width
    idx = starts[:, None] + np.arange(width)
    ids = torch.from_numpy(_token_array(tokens)[idx].astype(np.int64))
    if targets is None:
        return ids
    keep = torch.from_numpy(np.asarray(targets)[idx].astype(bool))
    return torch.stack([ids, torch.where(keep, ids, torch.full_like(ids, -100))], dim=1)
