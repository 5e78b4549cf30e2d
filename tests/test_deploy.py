"""deploy/ checked by what can run here: files parse, reference what exists, give each container only its
own keys, run as non-root; the commands they run parse with fedswarm's own CLI; systemd-analyze verify."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedswarm.app import config_file
from fedswarm.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
FEDSWARM = Path(sys.executable).parent / "fedswarm"


MOUNTED_CONFIG = {"/etc/fedswarm/run.toml": DEPLOY / "run.toml"}   # the k8s ConfigMap made from deploy/run.toml


def parses(argv: list[str]):
    """The argv a container runs is accepted by `fedswarm` (flags exist, values have the right types), with the
    config file it names read from deploy/ the way the container sees it."""
    parser = build_parser(only=argv[0])
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        assert path in MOUNTED_CONFIG, f"{path}: not a file deploy/ provides"
        config_file.apply(parser.commands[argv[0]], argv[0], str(MOUNTED_CONFIG[path]))
    return parser.parse_args(argv)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_mounts_each_container_only_its_own_keys():
    doc = compose()
    services, volumes = doc["services"], set(doc["volumes"])
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            assert mount.split(":")[0] in volumes, f"{name} mounts an undeclared volume {mount}"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    coordinator = services["coordinator"]
    assert [m.split(":")[0] for m in coordinator["volumes"]] == ["coordinator-keys", "state"]
    parses(coordinator["command"])
    clients = [n for n in services if n.startswith("client-")]
    assert clients == ["client-0", "client-1"]
    for name in clients:
        svc = services[name]
        assert [m.split(":") for m in svc["volumes"]] == [[f"{name}-keys", "/keys", "ro"]]
        parses(svc["command"])
        cmd = svc["command"]
        assert cmd[cmd.index("--key") + 1] == f"/keys/{name}.key"
    script = services["keygen"]["command"][0]
    copies = [line for line in script.splitlines() if line.strip().startswith(("cp ", "for "))]
    assert copies and not any("ca.key" in line for line in copies), "the CA key must reach no container"
    assert "rm -rf /tmp/keys" in script
    coord_copy = next(line for line in copies if "/out/coordinator" in line)
    assert "client-" not in coord_copy, "the coordinator gets no client private key"
    client_copy = next(line for line in copies if "/out/client-" in line)
    assert "server.key" not in client_copy and "authorized_keys" not in client_copy
    keygen_argv = shlex.split(next(line for line in script.splitlines() if "fedswarm keygen" in line))
    parses(keygen_argv[1:])
    for name, svc in services.items():   # only the one-shot keygen starts as root
        assert svc.get("user", "10001") != "0:0" or name == "keygen"
    health = coordinator["healthcheck"]["test"]
    assert health[:2] == ["CMD", "fedswarm"]
    parses(health[2:])


def test_dockerfile_runs_as_non_root_and_copies_what_exists():
    text = (DEPLOY / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["fedswarm"]' in text


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_deployments_are_limited_probed_and_unprivileged():
    deployments = [d for d in _k8s_docs() if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} >= {"fedswarm-coordinator", "fedswarm-client-0"}
    for dep in deployments:
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        secret_files = {f"{v_mount['mountPath']}/{item['path']}"
                        for v in pod["volumes"] if "secret" in v
                        for v_mount in [next(m for c in pod["containers"] for m in c["volumeMounts"]
                                             if m["name"] == v["name"])]
                        for item in v["secret"]["items"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
            args = parses(c["args"])
            if dep["metadata"]["name"] == "fedswarm-coordinator":   # its run comes from deploy/run.toml
                assert args.config and args.rounds == 100 and args.state_dir == "/state"
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert "/etc/fedswarm" in mounts
            for arg in c["args"]:
                if arg.startswith("/secrets/"):
                    assert arg in secret_files, f"{arg} is not in the mounted secret's items"
            if dep["metadata"]["name"] == "fedswarm-coordinator":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    cmd = c[probe]["exec"]["command"]
                    assert cmd[:2] == ["fedswarm", "health"], probe
                    parses(cmd[1:])
                    assert cmd[cmd.index("--tls-ca") + 1] in secret_files
            else:
                assert not any(f.endswith(("server.key", "authorized_keys")) for f in secret_files)
    services = [d for d in _k8s_docs() if d["kind"] == "Service"]
    assert services and all(p["targetPort"] in {"grpc", "metrics"} for s in services for p in s["spec"]["ports"])


def _unit_exec_start(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return shlex.split(re.search(r"^ExecStart=(.+)$", joined, flags=re.M).group(1))


def test_systemd_unit_command_parses():
    argv = _unit_exec_start((DEPLOY / "fedswarm-client.service").read_text())
    assert argv[0].endswith("/fedswarm")
    parses(argv[1:])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point it at this venv's fedswarm instead of /opt/...
    text = (DEPLOY / "fedswarm-client.service").read_text().replace("/opt/fedswarm/venv/bin/fedswarm", str(FEDSWARM))
    unit = tmp_path / "fedswarm-client.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.integration
def test_image_entrypoint_works_in_a_plain_venv():
    """ENTRYPOINT fedswarm with CMD --help, and the probe command, from the installed console script."""
    for argv in (["--help"], ["health", "--help"]):
        proc = subprocess.run([str(FEDSWARM), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage: fedswarm" in proc.stdout


def test_grafana_dashboard_queries_metrics_that_exist():
    import json

    import fedswarm.metrics as metrics

    dash = json.loads((DEPLOY / "grafana" / "fedswarm-dashboard.json").read_text())
    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r"fedswarm_[a-z_]+", " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])))
    assert names
    for name in names:
        base = re.sub(r"_(total|sum|count)$", "", name)
        assert f'"{base}"' in source, f"the dashboard queries {name}, which fedswarm.metrics does not export"


SANE_NOFILE = 65536   # files a coordinator needs: one per connection (the common default, 1024, is a lockout)


def test_deploy_files_give_sane_open_file_limits():
    """compose: every container (the coordinator above all) gets nofile 65536; the systemd unit sets LimitNOFILE;
    the coordinator itself raises its soft limit to the hard one at start (k8s pods cannot set one)."""
    for name, svc in compose()["services"].items():
        nofile = svc["ulimits"]["nofile"]
        assert nofile["soft"] >= SANE_NOFILE and nofile["hard"] >= nofile["soft"], name
    unit = (DEPLOY / "fedswarm-client.service").read_text()
    limit = re.search(r"^LimitNOFILE=(\d+)$", unit, flags=re.M)
    assert limit and int(limit.group(1)) >= SANE_NOFILE
