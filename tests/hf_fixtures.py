"""Data and tiny Hugging Face model folders for the fine-tuning tests (built on the spot, nothing downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

from fedswarm.sim.tiny_hf import fact_records as records
from fedswarm.sim.tiny_hf import save_tiny_hf

__all__ = ["records", "site_data", "tiny_model", "write_jsonl"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def site_data(root: Path, n: int = 400) -> tuple[Path, Path, Path]:
    """(site A's file, site B's file, a folder holding both: the coordinator's eval data)."""
    a = write_jsonl(root / "all" / "site-a.jsonl", records("add", n, 1))
    b = write_jsonl(root / "all" / "site-b.jsonl", records("color", n, 2))
    return a, b, root / "all"


def tiny_model(folder: Path, family: str, corpus: list[dict]) -> Path:
    return save_tiny_hf(folder, family, [r["text"] for r in corpus], vocab_size=400, layers=2, hidden=64)
