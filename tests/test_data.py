"""Tests for fedswarm.data: splits, determinism, batching, validation."""

import os

import numpy as np
import pytest
import torch

from fedswarm import data as D


# ---------------------------------------------------------------- stdlib

@pytest.fixture(scope="module")
def stdlib3():
    return [D.load_train_tokens("stdlib", i, 3) for i in range(3)]


def test_stdlib_groups_disjoint_and_cover():
    bins, eval_groups = D.group_assignment("stdlib", 3)
    flat = [g for b in bins for g in b]
    assert len(flat) == len(set(flat)), "a group landed in two partitions"
    assert not set(flat) & set(eval_groups), "eval group also used for training"
    assert eval_groups and all(D.is_eval_group(g) for g in eval_groups)
    assert "test" not in flat + eval_groups and "idlelib" not in flat + eval_groups
    assert "os" in flat + eval_groups and "asyncio" in flat + eval_groups


def test_stdlib_partitions_nonempty_balanced_deterministic(stdlib3):
    sizes = [len(t) for t in stdlib3]
    assert min(sizes) > 0
    assert max(sizes) <= 3 * min(sizes), sizes
    assert all(t.dtype == np.uint8 and t.ndim == 1 for t in stdlib3)
    again = D.load_train_tokens("stdlib", 1, 3)
    assert np.array_equal(again, stdlib3[1])
    assert not np.array_equal(stdlib3[0][:4096], stdlib3[1][:4096])


def test_stdlib_partition_content_matches_its_groups(stdlib3):
    bins, eval_groups = D.group_assignment("stdlib", 3)
    by_group = {}
    for f in D._stdlib_plan().files:
        by_group.setdefault(f.group, []).append(f.path)
    for i, groups in enumerate(bins):
        expected = sum(os.path.getsize(p) for g in groups for p in by_group[g])
        n_files = sum(len(by_group[g]) for g in groups)
        assert len(stdlib3[i]) == expected + n_files - 1
    # a file from partition 0's largest group appears in partition 0 but not in the others
    big = max(bins[0], key=lambda g: sum(os.path.getsize(p) for p in by_group[g]))
    with open(by_group[big][0], "rb") as fh:
        snippet = fh.read()[:2000]
    if len(snippet) >= 200:
        assert snippet in stdlib3[0].tobytes()


def test_stdlib_eval_disjoint_from_train(stdlib3):
    ev = D.load_eval_tokens("stdlib", max_tokens=1 << 16)
    assert 0 < len(ev) <= 1 << 16
    assert np.array_equal(ev, D.load_eval_tokens("stdlib", max_tokens=1 << 16))
    probe = ev[:512].tobytes()
    assert all(probe not in t.tobytes() for t in stdlib3)
    info = D.describe("stdlib")
    assert info["eval_bytes"] > 0 and info["train_bytes"] == sum(len(t) for t in stdlib3) + 2
    assert info["groups"] > 50


# ---------------------------------------------------------------- file / folder

def _text(n, seed):
    rng = np.random.default_rng(seed)
    return bytes(rng.integers(32, 127, size=n, dtype=np.uint8))


def test_text_file_splits_90_10(tmp_path):
    raw = _text(100_000, 0)
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    parts = [D.load_train_tokens(str(path), i, 4) for i in range(4)]
    assert b"".join(p.tobytes() for p in parts) == raw[:90_000]
    assert D.load_eval_tokens(str(path)).tobytes() == raw[90_000:]
    capped = D.load_eval_tokens(str(path), max_tokens=1000)
    assert len(capped) == 1000 and capped.tobytes() in raw[90_000:]
    info = D.describe(str(path))
    assert info["train_bytes"] == 90_000 and info["eval_bytes"] == 10_000
    with pytest.raises(ValueError, match="fewer partitions"):
        D.load_train_tokens(str(path), 0, 200_000)


def test_folder_with_five_subfolders(tmp_path):
    for k in range(5):
        sub = tmp_path / f"part{k}"
        sub.mkdir()
        (sub / "a.txt").write_bytes(_text(5_000 + 1000 * k, k))
    (tmp_path / "part0" / "blob.bin").write_bytes(b"\xff\xfe\x00bad")  # not UTF-8: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_bytes(b"SECRET" * 100)
    train = [D.load_train_tokens(str(tmp_path), i, 2) for i in range(2)]
    ev = D.load_eval_tokens(str(tmp_path))
    blob = b"".join(t.tobytes() for t in train) + ev.tobytes()
    assert all(len(t) > 0 for t in train) and len(ev) > 0
    assert b"\xff\xfe" not in blob and b"SECRET" not in blob
    assert len(blob) >= sum(5_000 + 1000 * k for k in range(5))
    assert np.array_equal(train[0], D.load_train_tokens(str(tmp_path), 0, 2))


def test_folder_group_split_is_disjoint(tmp_path):
    names = [f"g{k}" for k in range(40)]  # enough groups that some hash into eval
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(f"<{name}>" * 50)
    bins, eval_groups = D.group_assignment(str(tmp_path), 2)
    assert eval_groups and set(bins[0]).isdisjoint(bins[1])
    ev = D.load_eval_tokens(str(tmp_path)).tobytes()
    t0 = D.load_train_tokens(str(tmp_path), 0, 2).tobytes()
    assert all(f"<{g}>".encode() in ev for g in eval_groups)
    assert all(f"<{g}>".encode() not in ev for g in bins[0])
    assert all(f"<{g}>".encode() in t0 for g in bins[0])


def test_nonexistent_path():
    with pytest.raises(ValueError, match="stdlib"):
        D.load_train_tokens("/no/such/corpus", 0, 1)


def test_assign_bins_greedy():
    bins = D.assign_bins({"a": 10, "b": 7, "c": 5, "d": 3}, 2)
    assert bins == [["a", "d"], ["b", "c"]]


# ---------------------------------------------------------------- partition spec

def test_parse_partition():
    assert D.parse_partition("0/2") == (0, 2)
    assert D.parse_partition("1/2") == (1, 2)
    for bad in ["2/2", "a/b", "-1/2", "0/0", "1", ""]:
        with pytest.raises(ValueError, match="I/N|0 <= index"):
            D.parse_partition(bad)


# ---------------------------------------------------------------- batching

def test_batch_sampler():
    toks = np.arange(1000, dtype=np.int64).astype(np.uint8)
    s = D.BatchSampler(toks, seq_len=16, batch_size=8, seed=1)
    x, y = s.sample()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 256, y)  # tokens are consecutive, so y = x + 1
    a = D.BatchSampler(toks, 16, 8, seed=7)
    b = D.BatchSampler(toks, 16, 8, seed=7)
    c = D.BatchSampler(toks, 16, 8, seed=8)
    for _ in range(3):
        xa, _ = a.sample()
        xb, _ = b.sample()
        xc, _ = c.sample()
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)
    with pytest.raises(ValueError, match="too few"):
        D.BatchSampler(toks[:16], 16, 8, seed=0)


def test_eval_windows():
    toks = np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)
    w = D.eval_windows(toks, seq_len=31, max_windows=50)
    assert w.shape == (50, 32) and w.dtype == torch.int64
    assert torch.equal(w, D.eval_windows(toks, 31, 50))
    assert D.eval_windows(toks, 31, 10**6).shape == (10_000 // 32, 32)
    view = np.lib.stride_tricks.sliding_window_view(toks, 32)
    starts = [int(np.flatnonzero((view == row.numpy()).all(axis=1))[0]) for row in w]
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:])), "windows overlap"
    assert starts[-1] - starts[0] > 10_000 // 2, "windows not spread over the tokens"
    with pytest.raises(ValueError, match="too few"):
        D.eval_windows(toks[:10], 31, 4)
