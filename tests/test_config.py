"""`--config FILE.toml`: one definition of every setting (flags, TOML keys, docs), flags over the file over
the defaults, errors that name the key, `fedswarm config show` round-trips, and a real run configured by files."""
from __future__ import annotations

import dataclasses
import socket
import tomllib
from pathlib import Path

import pytest

from fedswarm import settings

from fedswarm.app import config_file
from fedswarm.app.cli import build_parser, main
from fedswarm.run_config import RunConfig
from fedswarm.sim.launcher import coordinator_argv
from fedswarm.sim.processes import READY, Proc, fedswarm_cmd, fetch_status, wait_until

ROOT = Path(__file__).resolve().parents[1]


def parse(command: str, argv: list[str], config: Path | None = None):
    parser = build_parser(only=command)
    if config is not None:
        config_file.apply(parser.commands[command], command, str(config))
    return parser.parse_args([command, *argv])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = write(tmp_path, '[run]\nrounds = 9\nstrategy = "diloco"\nformat = "chat"\nserver_lr = 0.5\n'
                           '[coordinator]\nstate_dir = "/tmp/x"\nmax_sessions = 7\n[client]\nname = "ignored"\n')
    args = parse("coordinator", ["--rounds", "12"], path)
    cfg = settings.from_args(RunConfig, args)
    assert (cfg.rounds, cfg.strategy, cfg.data_format, cfg.server_lr) == (12, "diloco", "chat", 0.5)
    assert cfg.seq_len == RunConfig.seq_len and args.state_dir == "/tmp/x" and args.max_sessions == 7


@pytest.mark.parametrize("text, says", [
    ('[run]\nrounds = "five"\n', "[run] rounds = 'five': expected an integer"),
    ('[run]\nroundz = 5\n', "[run] roundz: not a setting of `fedswarm coordinator` (did you mean rounds?)"),
    ('[coordinator]\nrounds = 5\n', "[coordinator] rounds is a run setting: put it under [run]"),
    ('[run]\nlisten = "0.0.0.0:1"\n', "[run] listen is not a run setting: put it under [coordinator]"),
    ('rounds = 5\n', "'rounds' at the top level"),
    ('[run]\nstrategy = "fedfoo"\n', "[run] strategy = 'fedfoo': choose one of"),
    ('[run]\nlr = true\n', "[run] lr = True: expected a number"),
    ('[coordinator]\nexit_when_done = "yes"\n', "[coordinator] exit_when_done = 'yes': expected true or false"),
    ('[run\n', "not valid TOML"),
])
def test_a_bad_file_is_refused_naming_the_key(tmp_path, capsys, text, says):
    path = write(tmp_path, text)
    assert main(["coordinator", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(path) in err, err


def test_config_show_round_trips(tmp_path, capsys):
    path = write(tmp_path, '[run]\nrounds = 9\nlr_schedule = "cosine"\n[sim]\nclients = 5\nhosts = true\n')
    assert main(["config", "show", "sim", "--config", str(path), "--seed", "3"]) == 0
    shown = capsys.readouterr().out
    data = tomllib.loads(shown)
    assert data["run"]["rounds"] == 9 and data["run"]["seed"] == 3 and data["sim"]["hosts"] is True
    assert "min_clients" not in data["run"]   # the sim sets it from --clients
    again = write(tmp_path, shown)
    assert main(["config", "show", "sim", "--config", str(again)]) == 0
    assert capsys.readouterr().out == shown


def test_the_sim_hands_every_run_setting_to_its_coordinator(tmp_path):
    """No hand-kept flag list: each run setting given to the sim reaches the coordinator's RunConfig."""
    odd = {"int": 7, "float": 0.25, "str": None, "bool": True}
    sim = parse("sim", [])
    for s in settings.settings_of(RunConfig):
        if s.name in ("min_clients", "eval_data"):
            continue
        value = s.choices[-1] if s.choices else odd[s.type.__name__] if s.type is not str else f"x-{s.name}"
        setattr(sim, s.name, value)
    argv = coordinator_argv(sim, tmp_path)
    cfg = settings.from_args(RunConfig, parse("coordinator", argv))
    for f in dataclasses.fields(RunConfig):
        derived = {"min_clients": sim.clients, "eval_data": sim.data}
        expected = derived[f.name] if f.name in derived else getattr(sim, f.name)
        assert getattr(cfg, f.name) == expected, f.name
    sim.lease = 6.0   # the sim's --lease is the coordinator's
    assert parse("coordinator", coordinator_argv(sim, tmp_path)).lease == 6.0


def test_settings_doc_is_generated_from_the_definitions(capsys):
    assert main(["config", "doc"]) == 0
    generated = capsys.readouterr().out
    assert (ROOT / "docs" / "SETTINGS.md").read_text() == generated, \
        "docs/SETTINGS.md is stale: run `fedswarm config doc > docs/SETTINGS.md`"
    for s in settings.settings_of(RunConfig):
        assert f"| `{s.key}` | `{s.flag}` |" in generated


def test_deploy_run_toml_is_a_valid_coordinator_config(capsys):
    assert main(["config", "show", "coordinator", "--config", str(ROOT / "deploy" / "run.toml")]) == 0
    data = tomllib.loads(capsys.readouterr().out)
    RunConfig(**{s.name: data["run"][s.key] for s in settings.settings_of(RunConfig) if s.key in data["run"]}).check()


def _after_round_1(status: dict) -> dict | None:
    return status if len(status["rounds"]) > 1 else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_a_coordinator_and_two_clients_start_from_toml_files_alone(tmp_path):
    """Real processes whose command lines are `--config FILE` and nothing else."""
    address = f"127.0.0.1:{_free_port()}"
    coordinator_toml = tmp_path / "coordinator.toml"
    coordinator_toml.write_text(f'[run]\nrounds = 1\nmin_clients = 2\nlocal_steps = 2\nbatch_size = 2\n'
                                f'seq_len = 32\neval_windows = 4\nupload_codec = "int4"\n'
                                f'[coordinator]\nlisten = "{address}"\nstate_dir = "{tmp_path / "state"}"\n')
    procs = [Proc("coordinator", fedswarm_cmd("coordinator", "--config", str(coordinator_toml)),
                  tmp_path / "coordinator.log")]
    try:
        procs[0].wait_for_line(READY, 120)
        for i in range(2):
            path = tmp_path / f"client-{i}.toml"
            path.write_text(f'[client]\ncoordinator = "{address}"\nname = "site-{i}"\npartition = "{i}/2"\n'
                            f'threads = 1\n')
            procs.append(Proc(f"client-{i}", fedswarm_cmd("client", "--config", str(path)), tmp_path / f"c{i}.log"))
        status = wait_until("round 1", lambda: _after_round_1(fetch_status(address)), 240, watch=procs)
    finally:
        for proc in procs:
            proc.stop()
    assert status["config"]["upload_codec"] == "int4" and status["config"]["local_steps"] == 2
    assert sorted(status["rounds"][1]["clients"]) == ["site-0", "site-1"], status["rounds"]
    assert (tmp_path / "state").is_dir()
