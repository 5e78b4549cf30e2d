"""Durable coordinator state: SQLite for the run and its rounds, safetensors for checkpoints.

A checkpoint file is written to a temporary name, fsynced and renamed before
the round's row commits, so a committed row always names a complete file.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedswarm.coordinator.strategy_state import PREFIX as STRATEGY_PREFIX
from fedswarm.errors import BadInput, why

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    eval_loss REAL, train_loss REAL, clients TEXT NOT NULL,
    bytes_up INTEGER NOT NULL, bytes_up_raw INTEGER NOT NULL,
    seconds REAL NOT NULL, checkpoint TEXT NOT NULL, committed_at REAL NOT NULL
);
"""
KEEP_CHECKPOINTS = 3
DB_NAME = "fedswarm.sqlite3"
COLUMNS = ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds")
# other round-record fields (bytes_down, tokens, ...) live as JSON in rounds.extra


class StateError(BadInput):
    """A --state-dir that cannot be used (unwritable, a database that does not open): the message names it."""


class CheckpointError(StateError):
    """No committed round's checkpoint can be loaded: the message names each file and what is wrong with it."""


def check_state_dir(state_dir: str | Path) -> None:
    """StateError unless `state_dir` (made if missing) and its checkpoints folder take a file (written,
    fsynced, removed): a read-only or full disk is found before a run starts, not at its first commit."""
    root = Path(state_dir)
    for folder in (root, root / "checkpoints"):
        probe = folder / f".write-test-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"fedswarm")
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as err:
            raise StateError(f"--state-dir {state_dir}: cannot write to {folder} ({err.strerror or err}): pass a "
                             f"folder this user can write on a writable disk") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Store:
    """One run per state dir."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._resumed: tuple[int, dict[str, torch.Tensor]] | None = None   # resume_point's load, handed out once
        self.db_path = self.dir / DB_NAME
        try:
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            self._open()
        except sqlite3.DatabaseError as err:
            raise StateError(_db_problem(self.db_path, err)) from None

    def _open(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:3]))
        self._db.executescript(SCHEMA)
        if "extra" not in {row[1] for row in self._db.execute("PRAGMA table_info(rounds)")}:
            self._db.execute("ALTER TABLE rounds ADD COLUMN extra TEXT")

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def commit_round(self, record: dict, state: dict[str, torch.Tensor]) -> None:
        """Write the round's checkpoint, then its row (one transaction); prune old checkpoints."""
        rnd = int(record["round"])
        ckpt = self.ckpt_dir / f"round-{rnd:06d}.safetensors"
        write_checkpoint(ckpt, state, {"round": str(rnd)})
        with self._lock:
            self._db.execute(
                "INSERT INTO rounds(round, eval_loss, train_loss, clients, bytes_up, bytes_up_raw,"
                " seconds, checkpoint, committed_at, extra) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rnd, record.get("eval_loss"), record.get("train_loss"), json.dumps(record.get("clients", [])),
                 int(record.get("bytes_up", 0)), int(record.get("bytes_up_raw", 0)),
                 float(record.get("seconds", 0.0)), ckpt.name, time.time(),
                 json.dumps({k: v for k, v in record.items() if k not in COLUMNS})),
            )
        self._prune(rnd)

    def rounds(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round, eval_loss, train_loss, clients, bytes_up, bytes_up_raw, seconds, extra"
                " FROM rounds ORDER BY round").fetchall()
        return [
            {"round": r, "eval_loss": e, "train_loss": t, "clients": json.loads(c),
             "bytes_up": b, "bytes_up_raw": raw, "seconds": s, **json.loads(extra or "{}")}
            for r, e, t, c, b, raw, s, extra in rows
        ]

    def last_round(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return row[0]

    def load_checkpoint(self, rnd: int) -> dict[str, torch.Tensor]:
        with self._lock:
            resumed, self._resumed = self._resumed, None
            row = self._db.execute("SELECT checkpoint FROM rounds WHERE round=?", (rnd,)).fetchone()
        if row is None:
            raise KeyError(f"round {rnd} is not committed in {self.dir}")
        if resumed is not None and resumed[0] == rnd:
            return resumed[1]   # resume_point loaded (and checked) it already
        return load_file(str(self.ckpt_dir / row[0]))

    def kept_tensors(self, names) -> Iterator[dict[str, torch.Tensor]]:
        """`names` (one stage's tensors) of each kept checkpoint, newest first, read without the rest; a
        checkpoint that is gone or lacks them is skipped."""
        with self._lock:
            rows = self._db.execute("SELECT checkpoint FROM rounds ORDER BY round DESC LIMIT ?",
                                    (KEEP_CHECKPOINTS,)).fetchall()
        for (name,) in rows:
            try:
                with safe_open(str(self.ckpt_dir / name), "pt") as f:
                    yield {n: f.get_tensor(n) for n in names}
            except Exception:  # noqa: BLE001 - pruned meanwhile, or another run's layout: not that version
                continue

    def resume_point(self, expected: dict[str, tuple[int, ...]]) -> int | None:
        """The newest committed round whose checkpoint loads and holds `expected` (name -> shape; other keys
        only strategy state), or None before round 0. Newer rounds, whose checkpoints are missing or broken,
        are dropped (logged, files removed) so they run again. CheckpointError (nothing dropped) when none of
        the kept checkpoints loads, or one cannot be read at all (permissions)."""
        with self._lock:
            rows = self._db.execute("SELECT round, checkpoint FROM rounds ORDER BY round DESC LIMIT ?",
                                    (KEEP_CHECKPOINTS,)).fetchall()
        bad: list[str] = []
        for rnd, name in rows:
            path = self.ckpt_dir / name
            try:
                state = load_file(str(path))
                problem = _mismatch(state, expected)
            except PermissionError as err:
                raise CheckpointError(f"checkpoint {path} of round {rnd} cannot be read ({err.strerror}): make it "
                                      f"readable by this user") from None
            except Exception as err:  # noqa: BLE001 - missing, truncated or garbled: safetensors has its own type
                problem = "missing" if isinstance(err, FileNotFoundError) else why(err)
            if problem is None:
                self._drop_after(rnd, rows)
                with self._lock:
                    self._resumed = (rnd, state)
                return rnd
            log.error("checkpoint %s of round %d cannot be used (%s)", path, rnd, problem)
            bad.append(f"round {rnd}: {path} ({problem})")
        if rows:
            raise CheckpointError(f"no kept checkpoint of {self.dir} can be loaded: {'; '.join(bad)}: restore "
                                  f"{self.ckpt_dir} from a backup, or start a new run on an empty --state-dir")
        return None

    def _drop_after(self, good: int, rows: list[tuple[int, str]]) -> None:
        dropped = [(rnd, name) for rnd, name in rows if rnd > good]
        if not dropped:
            return
        with self._lock:
            self._db.execute("DELETE FROM rounds WHERE round > ?", (good,))
        for _, name in dropped:
            (self.ckpt_dir / name).unlink(missing_ok=True)
        log.warning("falling back to the checkpoint of round %d: dropped round(s) %s from %s; they run again",
                    good, ", ".join(str(rnd) for rnd, _ in sorted(dropped)), self.db_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _prune(self, newest: int) -> None:
        for path in sorted(self.ckpt_dir.glob("round-*.safetensors"))[:-KEEP_CHECKPOINTS]:
            if path.name != f"round-{newest:06d}.safetensors":
                path.unlink(missing_ok=True)
        for tmp in self.ckpt_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)


def _mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps `state` from being a checkpoint of the model `expected` describes (None: nothing)."""
    missing = sorted(set(expected) - set(state))
    if missing:
        return f"no tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            return f"{name!r} has shape {tuple(state[name].shape)}, the model {tuple(shape)}"
    foreign = sorted(k for k in state if k not in expected and not k.startswith(STRATEGY_PREFIX))
    if foreign:
        return f"unexpected tensor {foreign[0]!r}: it is not this run's model"
    # a commit is always finite (integrity.py), so NaN/Inf here, in the weights or the strategy's momentum, was
    # written by something else: resuming from it would poison every later round
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        return f"tensor {bad!r} holds NaN or Inf: it was not written by a commit"
    return None


def _db_problem(path: Path, err: sqlite3.DatabaseError) -> str:
    text = str(err)
    if "locked" in text:
        return (f"{path} is in use by another process (database is locked): stop the other coordinator on this "
                f"--state-dir")
    if isinstance(err, sqlite3.OperationalError) and ("readonly" in text or "unable to open" in text):
        return f"--state-dir: {path} cannot be written ({text}): pass a folder this user can write"
    return (f"{path} is not a usable SQLite database ({text}): move it (and any -wal/-shm files beside it) away "
            f"to start a new run there, or restore it from a backup")
