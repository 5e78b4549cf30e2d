"""Durable coordinator state: SQLite for the run and its rounds, safetensors for checkpoints.

A checkpoint file is written to a temporary name, fsynced and renamed before
the round's row commits, so a committed row always names a complete file.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
COLUMNS = ("round", "eval_loss", "train_loss", "clients", "bytes_up", "bytes_up_raw", "seconds")
# other round-record fields (bytes_down, tokens, ...) live as JSON in rounds.extra


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


class Store:
    """One run per state dir."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "fedswarm.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
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
            row = self._db.execute("SELECT checkpoint FROM rounds WHERE round=?", (rnd,)).fetchone()
        if row is None:
            raise KeyError(f"round {rnd} is not committed in {self.dir}")
        return load_file(str(self.ckpt_dir / row[0]))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _prune(self, newest: int) -> None:
        for path in sorted(self.ckpt_dir.glob("round-*.safetensors"))[:-KEEP_CHECKPOINTS]:
            if path.name != f"round-{newest:06d}.safetensors":
                path.unlink(missing_ok=True)
        for tmp in self.ckpt_dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
