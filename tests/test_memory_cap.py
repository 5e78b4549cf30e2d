"""A client under a memory cap trains on a text corpus three times larger than the cap: the corpus is
memory-mapped, never read into RAM, and the client's anonymous memory stays flat across rounds.

The cap is a memory cgroup (v2 or v1) when one can be made here, else RLIMIT_DATA (`prlimit --data`),
which counts private memory such as a corpus read into a buffer but not read-only file mappings.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from fedswarm.sim.processes import Proc, coordinator_process, fedswarm_cmd, fetch_status, wait_until

CAP = 640 << 20
CORPUS = 3 * CAP


def _memory_cgroup() -> tuple[Path, str] | None:
    """(a new cgroup folder, the file that caps it), or None where none can be made."""
    name = f"fedswarm-hf-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text():
        candidates = [(v2 / name, "memory.max")]
    else:
        own = re.search(r"^\d+:memory:(.*)$", Path("/proc/self/cgroup").read_text(), re.M)
        root = Path("/sys/fs/cgroup/memory")
        candidates = [(root / own.group(1).lstrip("/") / name, "memory.limit_in_bytes")] if own else []
        candidates.append((root / name, "memory.limit_in_bytes"))
    for folder, cap_file in candidates:
        try:
            folder.mkdir()
            (folder / cap_file).write_text(str(CAP))
            return folder, cap_file
        except OSError:
            if folder.is_dir():
                folder.rmdir()
    return None


def _write_corpus(path: Path) -> None:
    """Real text (the stdlib's sources, over and over) until CORPUS bytes."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    block = b"\n".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:60])
    with open(path, "wb") as fh:
        for _ in range(CORPUS // len(block) + 1):
            fh.write(block)


def _rss_anon_kb(pid: int) -> int:
    return int(re.search(r"RssAnon:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_capped_client_trains_on_a_corpus_larger_than_its_memory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus)
    eval_file = tmp_path / "eval.txt"
    with open(corpus, "rb") as fh:
        eval_file.write_bytes(fh.read(1 << 20))
    client = fedswarm_cmd("client", "--data", str(corpus), "--name", "capped", "--threads", "1", "--device", "cpu")
    cgroup = _memory_cgroup()
    rounds = 3
    args = ["--state-dir", str(tmp_path / "state"), "--rounds", str(rounds), "--min-clients", "1", "--local-steps", "15",
            "--seq-len", "64", "--batch-size", "8", "--eval-data", str(eval_file)]
    try:
        with coordinator_process(tmp_path, args) as (coordinator, address):
            argv = [*client[:3], "client", "--coordinator", address, *client[4:]]
            if cgroup:
                folder, _ = cgroup
                argv = ["sh", "-c", f"echo $$ > {folder}/cgroup.procs && exec {shlex.join(argv)}"]
            else:
                argv = ["prlimit", f"--data={CAP}", *argv]
            proc = Proc("capped", argv, tmp_path / "capped.log")
            try:
                samples = {}

                def progress():
                    status = fetch_status(address)
                    if status["round"] >= 1 and status["round"] not in samples and proc.popen.poll() is None:
                        samples[status["round"]] = _rss_anon_kb(proc.pid)
                    return status["state"] == "done" and status

                status = wait_until("the capped client's rounds", progress, 300, watch=[coordinator, proc])
            finally:
                proc.stop()
        assert [r["round"] for r in status["rounds"]] == list(range(rounds + 1))
        assert "capped" in status["rounds"][-1]["clients"]
        assert os.path.getsize(corpus) > 3 * CAP * 0.99
        grown = max(samples.values()) - min(samples.values())
        assert len(samples) >= 2 and grown < 32 << 10, f"anonymous memory grew {grown} KiB across rounds: {samples}"
        if cgroup:
            folder, cap_file = cgroup
            peak = folder / ("memory.peak" if cap_file == "memory.max" else "memory.max_usage_in_bytes")
            if peak.is_file():
                assert int(peak.read_text()) <= CAP
    finally:
        if cgroup:
            cgroup[0].rmdir()
        print(f"cap: {'cgroup ' + str(cgroup[0]) if cgroup else 'RLIMIT_DATA'}", file=sys.stderr)
