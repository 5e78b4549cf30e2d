"""Record data as people keep it: JSON Lines, Parquet, and `datasets` save_to_disk folders.

Records stream (a file is never read whole into memory). The held-out split is
deterministic: about 1 record in 10, chosen by a stable hash of its content, is
eval, wherever that record appears (a client's own file, or the coordinator's folder
of everyone's files: no eval record is ever trained on); train record j (in order,
eval ones skipped) belongs to partition j % N.
Plain text (a file, a folder of text files, or ``stdlib``) keeps the rules of
`fedswarm.data`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # fedswarm.run_config imports this module (check_format)
    from fedswarm.run_config import RunConfig

FORMATS = ("text", "chat")
RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_BATCH = 512


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose text (one document per record or plain text files) or chat "
                         f"(prompt/response records, loss on the response only)")


@dataclass(frozen=True)
class DataSpec:
    """Where a participant's data is and how its records read."""

    data: str
    format: str = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"

    @classmethod
    def from_run(cls, data: str, cfg: RunConfig, format: str | None = None,  # noqa: A002
                 text_field: str | None = None, prompt_field: str | None = None,
                 response_field: str | None = None) -> "DataSpec":
        """The run's format and field names, each replaced by a non-empty override (a client's own flags)."""
        spec = cls(data, format or cfg.data_format, text_field or cfg.text_field, prompt_field or cfg.prompt_field,
                   response_field or cfg.response_field)
        check_format(spec.format)
        return spec


def source_kind(data: str) -> str:
    """'text' (stdlib, a text file or a folder of text), 'jsonl', 'parquet' or 'datasets'."""
    if data == "stdlib" or not os.path.exists(data):
        return "text"  # fedswarm.data reports a missing path
    path = Path(data)
    if path.is_file():
        return RECORD_SUFFIXES.get(path.suffix.lower(), "text")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "datasets"
    kinds = {RECORD_SUFFIXES.get(f.suffix.lower()) for f in _visible_files(path)}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    return "text"


def _visible_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / n for n in sorted(filenames) if not n.startswith(".")]
    return out


def source_files(data: str) -> list[Path]:
    """The files whose bytes make up the data (the key of its tokenized cache)."""
    path = Path(data)
    return [path] if path.is_file() else _visible_files(path)


def is_eval_record(record: dict) -> bool:
    """Stable hold-out rule for records: about 1 in 10, by content, goes to eval."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(b"record:" + canonical.encode("utf-8")).digest()[0] % 10 == 0


def iter_records(data: str, kind: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record, in a fixed order; ValueError naming the bad line or file."""
    if kind == "datasets":
        yield from _dataset_records(data)
        return
    for path in source_files(data):
        yield from (_jsonl_records(path) if kind == "jsonl" else _parquet_records(path))


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    for lineno, _size, record in _jsonl_lines(path):
        yield f"{path}:{lineno}", record


def _jsonl_lines(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(line number, bytes, record) of each non-blank line; ValueError naming the line that is not a JSON object."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno} is not UTF-8 text; JSON Lines hold one JSON object a line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno} is a JSON {type(record).__name__}, not an object with named fields")
            yield lineno, len(raw), record


def check_jsonl(path: Path, fields: list[tuple[str, str]], budget: int) -> int:
    """Read records of `path` until `budget` bytes: each must be a JSON object holding every (field, flag) of
    `fields` (ValueError naming the line otherwise); the bytes read. ValueError if it holds no record at all."""
    used, records = 0, 0
    for lineno, size, record in _jsonl_lines(path):
        for name, flag in fields:
            field(record, name, f"{path}:{lineno}", flag)
        used, records = used + size, records + 1
        if used >= budget:
            break
    if not records:
        raise ValueError(f"{path} holds no records (every line is blank): put one JSON object on each line")
    return used


def check_parquet(path: Path, fields: list[tuple[str, str]]) -> None:
    """ValueError unless `path` is a readable Parquet file whose columns include every (field, flag) of `fields`."""
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from None
    for name, flag in fields:
        if name not in names:
            raise ValueError(f"{path} has no column {name!r} (it has: {', '.join(names[:8])}); name the right one "
                             f"with {flag}")


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from None
    row = 0
    for batch in reader.iter_batches(batch_size=_BATCH):
        for record in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", record


def _dataset_records(data: str) -> Iterator[tuple[str, dict]]:
    import datasets

    loaded = datasets.load_from_disk(data)
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else sorted(loaded)[0]
        loaded = loaded[split]
    for start in range(0, len(loaded), _BATCH):
        batch = loaded[start:start + _BATCH]  # dict of columns
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            yield f"{data} row {start + i + 1}", {n: batch[n][i] for n in names}


def split_records(records: Iterator[tuple[str, dict]], split: tuple) -> Iterator[tuple[str, dict]]:
    """Records of `split`: ("eval",) or ("train", index, num_partitions)."""
    train_seen = 0
    for where, record in records:
        held_out = is_eval_record(record)
        if split[0] == "eval":
            if held_out:
                yield where, record
            continue
        if held_out:
            continue
        if train_seen % split[2] == split[1]:
            yield where, record
        train_seen += 1


def field(record: dict, name: str, where: str, flag: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        have = ", ".join(sorted(map(str, record))[:8])
        raise ValueError(f"{where} has no text field {name!r} (it has: {have}); name the right one with {flag}")
    return value
