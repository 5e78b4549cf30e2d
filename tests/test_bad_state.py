"""Bad state on disk and bad files or flags: each is refused naming the file and the problem on one line (the
commands exit 2 with it: tests/test_exits.py runs them), and the coordinator's store falls back to the newest
checkpoint that loads. In-process: every case here is a function call."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch

from fedswarm.app.cli import main
from fedswarm import settings
from fedswarm.client import daemon, preflight
from fedswarm.client.options import ClientOptions
from fedswarm.app.config_file import ConfigError, read
from fedswarm.coordinator.downloads import ServedVersions
from fedswarm.coordinator.store import CheckpointError, StateError, Store, check_state_dir
from fedswarm.errors import BadInput
from fedswarm.models import check_model
from fedswarm.proto import codec as C
from fedswarm.run_config import RunConfig
from fedswarm.sim.tiny_hf import save_tiny_hf
from fedswarm.tokenized import client_tokens

SHAPES = {"w": (2, 3), "b": (3,)}


def commit(store: Store, rounds: range) -> None:
    for rnd in rounds:
        state = {"w": torch.full((2, 3), float(rnd)), "b": torch.zeros(3), "strategy/m_t/w": torch.ones(2, 3)}
        store.commit_round({"round": rnd, "clients": []}, state)


def one_line_naming(err: BaseException, *parts: str) -> str:
    text = str(err)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


# ---- the store ----------------------------------------------------------------------------------------------

def test_the_store_falls_back_to_the_newest_checkpoint_that_loads(tmp_path, caplog):
    store = Store(tmp_path)
    commit(store, range(4))
    latest = store.ckpt_dir / "round-000003.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])            # truncated mid-tensor
    with caplog.at_level(logging.WARNING, "fedswarm.coordinator.store"):
        assert store.resume_point(SHAPES) == 2
    assert str(latest) in caplog.text and "cannot be used" in caplog.text
    assert "dropped round(s) 3" in caplog.text
    assert [r["round"] for r in store.rounds()] == [0, 1, 2] and store.last_round() == 2
    assert not latest.exists()
    assert float(store.load_checkpoint(2)["w"][0, 0]) == 2.0   # what resume_point loaded, handed out once
    commit(store, range(3, 4))                                 # the dropped round runs again
    store.close()
    reopened = Store(tmp_path)
    assert reopened.resume_point(SHAPES) == 3 and float(reopened.load_checkpoint(3)["w"][0, 0]) == 3.0
    reopened.close()


def test_a_checkpoint_holding_nan_in_its_strategy_state_is_not_resumed_from(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    store = Store(tmp_path)
    commit(store, range(3))
    latest = store.ckpt_dir / "round-000002.safetensors"
    tampered = load_file(str(latest))
    tampered["strategy/m_t/w"][0, 1] = float("nan")   # the outer momentum, not the weights
    save_file(tampered, str(latest))
    with caplog.at_level(logging.WARNING, "fedswarm.coordinator.store"):
        assert store.resume_point(SHAPES) == 1
    assert "'strategy/m_t/w' holds NaN or Inf" in caplog.text and "dropped round(s) 2" in caplog.text
    store.close()


def test_no_loadable_checkpoint_is_refused_naming_each_and_dropping_nothing(tmp_path):
    store = Store(tmp_path)
    commit(store, range(3))
    store.commit_round({"round": 3, "clients": []}, {"w": torch.zeros(3, 2), "b": torch.zeros(3)})  # another model
    ckpt = store.ckpt_dir                                     # kept: rounds 1, 2 and 3
    (ckpt / "round-000002.safetensors").unlink()
    (ckpt / "round-000001.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError) as err:
        store.resume_point(SHAPES)
    one_line_naming(err.value, "round-000003.safetensors ('w' has shape (3, 2), the model (2, 3))",
                    "round-000002.safetensors (missing)", "round-000001.safetensors (SafetensorError", "restore")
    assert [r["round"] for r in store.rounds()] == [0, 1, 2, 3]
    assert (ckpt / "round-000003.safetensors").exists()
    store.close()


def test_a_new_state_dir_has_no_resume_point(tmp_path):
    store = Store(tmp_path)
    assert store.resume_point(SHAPES) is None
    store.close()


def test_a_corrupt_database_is_named(tmp_path):
    Store(tmp_path).close()
    db = tmp_path / "fedswarm.sqlite3"
    db.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StateError) as err:
        Store(tmp_path)
    one_line_naming(err.value, str(db), "is not a usable SQLite database", "move it")


def test_a_state_dir_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError) as err:
        check_state_dir(blocker / "state")
    one_line_naming(err.value, "--state-dir", "cannot write")
    check_state_dir(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").rglob("*")) == ["checkpoints"]   # the probes are gone


def test_a_corrupt_download_cache_is_dropped_and_rebuilt(tmp_path, caplog):
    cache = tmp_path / "served.safetensors"
    cache.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!")
    codec = C.codec_by_name("int8")
    with caplog.at_level(logging.WARNING, "fedswarm.coordinator.downloads"):
        versions = ServedVersions(codec, persist=cache)
    assert str(cache) in caplog.text and "rebuilt" in caplog.text
    assert versions.digest(0) is None and not cache.exists()
    served = versions.served(0, {"w": torch.ones(4, 4)})
    assert cache.exists() and ServedVersions(codec, persist=cache).digest(0) == served.digest


# ---- files on the command line ----------------------------------------------------------------------------------

def test_a_config_that_is_not_a_toml_file_is_named(tmp_path):
    binary = tmp_path / "run.toml"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError) as err:
        read(str(binary))
    one_line_naming(err.value, str(binary), "not a TOML file")
    with pytest.raises(ConfigError) as err:
        read(str(tmp_path))
    one_line_naming(err.value, str(tmp_path), "is a folder")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    texts = [f"line {i} of a tiny corpus with some words" for i in range(200)]
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny", "gpt2", texts, vocab_size=300, layers=1, hidden=32)


def _broken(tmp_path, hf_folder, how: str):
    if how == "empty folder":
        (tmp_path / "m").mkdir()
        return tmp_path / "m"
    if how == "missing path":
        return tmp_path / "nowhere"
    if how == "binary config JSON":
        (tmp_path / "m.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
        return tmp_path / "m.json"
    folder = tmp_path / "m"
    shutil.copytree(hf_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if how in ("n_embd % n_head", "n_layer -1"):
        cfg.update({"n_embd": 33} if how == "n_embd % n_head" else {"n_layer": -1})
        (folder / "config.json").write_text(json.dumps(cfg))
    elif how == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "corrupt tokenizer.json":
        (folder / "tokenizer.json").write_bytes(bytes(range(256)))
    elif how == "broken config.json":
        (folder / "config.json").write_text('{"model_type": "gpt2",')
    return folder


@pytest.mark.parametrize("how, says", [
    ("empty folder", "the folder has no config.json"),
    ("missing path", "no such preset, file or folder"),
    ("binary config JSON", "m.json is not a JSON file"),
    ("n_embd % n_head", "n_embd = 33 is not a multiple of n_head = 4"),
    ("n_layer -1", "n_layer = -1; it must be an integer >= 1"),
    ("truncated weights", "model.safetensors is not a complete safetensors file"),
    ("corrupt tokenizer.json", "tokenizer.json is not a JSON file"),
    ("broken config.json", "config.json is not valid JSON"),
])
def test_a_bad_model_is_named(tmp_path, hf_folder, how, says):
    model = _broken(tmp_path, hf_folder, how)
    with pytest.raises(BadInput) as err:
        check_model(str(model))
    one_line_naming(err.value, says, str(model))


def test_a_good_model_passes(hf_folder):
    check_model(str(hf_folder))
    check_model("gpt2-tiny")


# ---- the client, before it connects -----------------------------------------------------------------------------

def client_options(*argv: str) -> ClientOptions:
    parser = argparse.ArgumentParser()
    daemon.add_arguments(parser)
    return settings.from_args(ClientOptions, parser.parse_args(argv))


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:", ":7000", "127.0.0.1:0", "127.0.0.1:70000",
                                     "host:port", "::1:7000", "[zz]:7000"])
def test_a_bad_coordinator_address_is_refused(address):
    with pytest.raises(BadInput) as err:
        preflight.check_address(address)
    one_line_naming(err.value, "--coordinator", repr(address))


@pytest.mark.parametrize("address", ["127.0.0.1:7000", "[::1]:7000", "coordinator.example:443"])
def test_a_good_coordinator_address_passes(address):
    preflight.check_address(address)


@pytest.mark.parametrize("content, flags, says", [
    ("", [], "is empty"),
    ("\n\n", [], "holds no records"),
    ('{"text": "a"}\n{"text": \n', [], "data.jsonl:2 is not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', [], "data.jsonl:2 is a JSON list"),
    ('{"body": "a"}\n', ["--text-field", "text"], "data.jsonl:1 has no text field 'text' (it has: body)"),
    (None, [], "no such file or folder"),
])
def test_bad_client_data_is_refused_before_connecting(tmp_path, content, flags, says):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    with pytest.raises(BadInput) as err:
        preflight.check_options(client_options("--coordinator", "127.0.0.1:7000", "--data", str(data), *flags))
    one_line_naming(err.value, "--data", str(data), says)


def test_a_field_only_the_run_names_is_refused_after_the_join(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"body": f"record {i}"}) + "\n" for i in range(50)))
    options = client_options("--coordinator", "127.0.0.1:7000", "--data", str(data), "--cache-dir",
                             str(tmp_path / "c"))
    preflight.check_options(options)   # the run's field is not known before the join
    run = RunConfig(model="gpt2-tiny", text_field="text", data_format="text")
    with pytest.raises(BadInput) as err:
        client_tokens(options.data_spec(run), run.model, 0, 1, options.cache_dir)
    one_line_naming(err.value, "has no text field 'text'", str(data))


def test_the_cli_exits_2_with_one_line_for_bad_flags(tmp_path, capsys):
    """In-process: the same code path as the CLI (test_exits.py runs some as real processes)."""
    binary = tmp_path / "run.toml"
    binary.write_bytes(bytes(range(128, 256)))
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"model_type": "gpt2", "n_embd": 30, "n_head": 4, "n_layer": 1, "vocab_size": 256}))
    cases = [
        (["coordinator", "--state-dir", str(tmp_path / "s"), "--config", str(binary)], str(binary)),
        (["coordinator", "--state-dir", str(tmp_path / "s"), "--model", str(model)], "n_embd = 30 is not a multiple"),
        (["client", "--coordinator", "127.0.0.1"], "expected HOST:PORT"),
        (["client", "--coordinator", "127.0.0.1:7000", "--data", str(tmp_path / "none.jsonl")], "no such file"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (argv, lines)
    assert not (tmp_path / "s").exists(), "a refused new run makes nothing on disk"
