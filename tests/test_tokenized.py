"""Data as people keep it, tokenized once with the model's tokenizer into memory-mapped shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hf_fixtures import records, tiny_model, write_jsonl

from fedswarm import data as D
from fedswarm import formats, tokenized
from fedswarm.formats import DataSpec
from fedswarm.run_config import RunConfig
from fedswarm.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model") / "gpt2", "gpt2", records("add", 100, 3))


def test_stdlib_bytes_unchanged():
    spec, tok = DataSpec("stdlib"), ByteTokenizer()
    np.testing.assert_array_equal(tokenized.train_tokens(spec, tok, 1, 3).ids, D.load_train_tokens("stdlib", 1, 3))
    np.testing.assert_array_equal(tokenized.eval_tokens(spec, tok).ids, D.load_eval_tokens("stdlib"))


def test_single_text_file_is_mapped_in_place(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i} of a plain text corpus\n" for i in range(2000)))
    got = tokenized.train_tokens(DataSpec(str(path)), ByteTokenizer(), 1, 2).ids
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, D.load_train_tokens(str(path), 1, 2))
    batch = tokenized.sampler(tokenized.Tokens(got), 16, 4, 0).sample()
    np.testing.assert_array_equal(batch[0], D.BatchSampler(D.load_train_tokens(str(path), 1, 2), 16, 4, 0).sample()[0])


def _write_all_formats(root, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(root / "j" / "rows.jsonl", rows)
    (root / "p").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "p" / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "ds"))
    return jsonl, root / "p" / "rows.parquet", root / "ds"


def test_jsonl_parquet_and_datasets_read_the_same(tmp_path, gpt2_dir):
    rows = records("color", 300, 5)
    tok = load_tokenizer(str(gpt2_dir))
    sources = _write_all_formats(tmp_path, rows)
    assert [formats.source_kind(str(s)) for s in sources] == ["jsonl", "parquet", "datasets"]
    results = []
    for source in sources:
        spec = DataSpec(str(source))
        parts = [tokenized.train_tokens(spec, tok, i, 2).ids for i in range(2)]
        results.append((parts, tokenized.eval_tokens(spec, tok).ids))
        assert parts[0].dtype == np.uint16
    for parts, held_out in results[1:]:
        for a, b in zip(parts + [held_out], results[0][0] + [results[0][1]]):
            np.testing.assert_array_equal(a, b)
    # every record lands in exactly one split: the token counts add up to the whole file's
    whole = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    parts, held_out = results[0]
    assert len(parts[0]) + len(parts[1]) + len(held_out) == whole
    assert 0 < len(held_out) < whole * 0.25


def test_shards_are_cached_and_keyed_by_content(tmp_path, gpt2_dir, monkeypatch):
    path = write_jsonl(tmp_path / "d" / "rows.jsonl", records("add", 200, 1))
    spec, tok = DataSpec(str(path)), load_tokenizer(str(gpt2_dir))
    first = tokenized.train_tokens(spec, tok, 0, 1)
    assert isinstance(first.ids, np.memmap)
    assert list((tmp_path / "d" / tokenized.CACHE_DIRNAME).iterdir()), "the shard sits beside the data"

    def no_tokenizing(*_a, **_k):
        raise AssertionError("re-tokenized although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(tokenized, "_write_shard", no_tokenizing)
        np.testing.assert_array_equal(tokenized.train_tokens(spec, tok, 0, 1).ids, first.ids)
    write_jsonl(path, records("add", 200, 2))  # new content: a new key, tokenized again
    assert len(list((tmp_path / "d" / tokenized.CACHE_DIRNAME).iterdir())) == 1
    tokenized.train_tokens(spec, tok, 0, 1)
    assert len(list((tmp_path / "d" / tokenized.CACHE_DIRNAME).iterdir())) == 2


@pytest.mark.integration
def test_stdlib_with_a_tokenizer_caches_outside_the_stdlib(tmp_path, gpt2_dir, monkeypatch):
    monkeypatch.setenv("FEDSWARM_CACHE", str(tmp_path / "cache"))
    tokens = tokenized.eval_tokens(DataSpec("stdlib"), load_tokenizer(str(gpt2_dir)))
    assert len(tokens) > 1000 and tokens.ids.max() < 400
    assert list((tmp_path / "cache").iterdir())


def test_chat_loss_only_on_responses(tmp_path, gpt2_dir):
    rows = records("add", 50, 4)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    tok = load_tokenizer(str(gpt2_dir))
    got = tokenized.train_tokens(DataSpec(str(path), "chat"), tok, 0, 1)
    text = tok.decode(got.ids[got.targets.astype(bool)])
    trained = [r for r in rows if not formats.is_eval_record(r)]
    assert text == "".join(r["response"] + "<|end|>" for r in trained)
    x, y = tokenized.sampler(got, 24, 8, 0).sample()
    assert bool((y == -100).any()) and bool((y >= 0).any())
    w = tokenized.windows(got, 24, 4)
    assert w.shape == (4, 2, 25)


def test_bad_data_is_refused_clearly(tmp_path, gpt2_dir):
    tok = load_tokenizer(str(gpt2_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        tokenized.train_tokens(DataSpec(str(bad)), tok, 0, 1)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"body": "no text field here"}] * 20)
    with pytest.raises(ValueError, match="--text-field"):
        tokenized.train_tokens(DataSpec(str(rows)), tok, 0, 1)
    with pytest.raises(ValueError, match="chat template"):
        tokenized.train_tokens(DataSpec(str(rows), "chat"), ByteTokenizer(), 0, 1)
    with pytest.raises(ValueError, match="--format"):
        DataSpec.from_run(str(rows), RunConfig(data_format="poetry"))
    assert not list(tmp_path.glob(f"{tokenized.CACHE_DIRNAME}/*.tmp-*")), "a failed tokenization leaves no temp shard"


def test_model_folders_without_a_matching_tokenizer_are_refused(tmp_path, gpt2_dir):
    import shutil

    from fedswarm.models import build_model

    bare = tmp_path / "bare"
    shutil.copytree(gpt2_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no tokenizer"):
        RunConfig(model=str(bare)).check()
    small = tmp_path / "small"
    shutil.copytree(gpt2_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model has 100 embeddings"):
        build_model(str(small))


@pytest.mark.integration
def test_read_only_data_is_cached_in_the_cache_dir(tmp_path, gpt2_dir):
    """Data on a read-only mount (a private mount namespace): the shard goes to --cache-dir instead."""
    import shlex
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a private read-only bind mount")
    ro = tmp_path / "ro"
    data = write_jsonl(ro / "rows.jsonl", records("add", 100, 1))
    cache = tmp_path / "cache"
    script = ("from fedswarm import tokenized; from fedswarm.formats import DataSpec; "
              "from fedswarm.tokenizer import load_tokenizer; "
              f"t = tokenized.train_tokens(DataSpec({str(data)!r}), load_tokenizer({str(gpt2_dir)!r}), 0, 1, "
              f"cache_dir={str(cache)!r}); print('tokens', len(t))")
    shell = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
             f"exec {shlex.quote(sys.executable)} -c {shlex.quote(script)}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens" in proc.stdout
    assert not (ro / tokenized.CACHE_DIRNAME).exists(), "nothing may be written beside read-only data"
    assert [p for p in cache.iterdir() if (p / "meta.json").is_file()], "the shard is in the cache dir"


def test_a_folder_cut_into_more_partitions_than_entries_splits_alike_for_every_tokenizer(tmp_path, gpt2_dir):
    """Byte path and tokenizer path read one split: with more partitions than top-level entries, every
    partition still gets its own contiguous piece, and the tokenizer's tokens decode to the bytes' text."""
    for name in ("g0", "g1", "g4"):   # g4 is held out (data.is_eval_group): two train entries, four partitions
        (tmp_path / "corpus" / name).mkdir(parents=True)
        (tmp_path / "corpus" / name / "text.txt").write_text("".join(f"{name} line {i}\n" for i in range(400)))
    data, tok = str(tmp_path / "corpus"), load_tokenizer(str(gpt2_dir))
    for i in range(4):
        raw = D.load_train_tokens(data, i, 4).tobytes().decode()
        ids = tokenized.train_tokens(DataSpec(data), tok, i, 4, str(tmp_path / "cache")).ids
        assert len(ids) > 0 and tok.decode(list(map(int, ids))) == raw
