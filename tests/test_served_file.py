"""The as-served state on disk (coordinator/served_file.py): safetensors on disk, the same digest as in memory,
a reader that keeps its version after a newer one replaces the file, and no second copy held in memory."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedswarm.coordinator.downloads import ServedVersions
from fedswarm.coordinator.served_file import ServedFile
from fedswarm.proto import codec as C
from fedswarm.proto import wire

STATE = {"w": torch.randn(30, 7), "b": torch.randn(7), "empty": torch.zeros(0, 3)}


def test_written_tensor_by_tensor_read_back_alike(tmp_path):
    path, made = tmp_path / "served.safetensors", []

    def tensor_of(name):
        made.append(name)
        return STATE[name]
    shapes = {n: tuple(t.shape) for n, t in STATE.items()}
    digest = ServedFile.write(path, shapes, tensor_of, {"version": "3", "codec": "int8"})
    assert made == sorted(STATE) and digest == wire.state_digest(STATE)
    stock = load_file(str(path))                   # a standard safetensors file
    assert all(torch.equal(stock[n], STATE[n]) for n in STATE)
    served = ServedFile(path)
    assert served.metadata == {"version": "3", "codec": "int8"} and set(served) == set(STATE)
    assert all(torch.equal(served[n], STATE[n]) for n in STATE) and served.digest() == digest


def test_a_reader_keeps_its_version_after_the_file_is_replaced(tmp_path):
    path = tmp_path / "served.safetensors"
    shapes = {n: tuple(t.shape) for n, t in STATE.items()}
    ServedFile.write(path, shapes, STATE.__getitem__, {})
    old = ServedFile(path)
    ServedFile.write(path, shapes, lambda n: STATE[n] + 1, {})
    assert torch.equal(old["w"], STATE["w"]) and torch.equal(ServedFile(path)["w"], STATE["w"] + 1)


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "served.safetensors"
    ServedFile.write(path, {"w": (1000,)}, lambda n: torch.ones(1000), {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="'w'"):
        ServedFile(path)


def test_a_persisted_chain_holds_its_state_in_the_file_alone(tmp_path):
    """With a state dir the served state is the file: each version's is a ServedFile, and what a client
    reconstructs matches it bit for bit, as in memory."""
    walk = [STATE, {n: t + 0.01 for n, t in STATE.items()}, {n: t - 0.02 for n, t in STATE.items()}]
    disk = ServedVersions(C.codec_by_name("int8"), persist=tmp_path / "served.safetensors")
    memory = ServedVersions(C.codec_by_name("int8"))
    for v, g in enumerate(walk):
        on_disk, in_memory = disk.served(v, g), memory.served(v, g)
        assert isinstance(on_disk.state, ServedFile) and isinstance(in_memory.state, dict)
        assert on_disk.digest == in_memory.digest
        assert all(torch.equal(on_disk.state[n], in_memory.state[n]) for n in STATE)
