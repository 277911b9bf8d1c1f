"""Dockerfiles, the compose file, their helper scripts and the container health check.

No Docker engine runs here: Dockerfiles are linted with hadolint and checked structurally, the
compose file is validated by ``docker-compose config`` (the compose spec schema plus
interpolation, no engine needed), and the entrypoints are checked to be the real CLI commands.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploytools import DEPLOY, REPO, VENV_BIN, require_tool, run, tls_handshake_server

DOCKER = DEPLOY / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
HEALTHCHECK = DOCKER / "healthcheck.py"
COMPOSE = DEPLOY / "compose.yaml"
SHELL_SCRIPTS = [
    DEPLOY / "pki" / "fedseal-pki",
    *sorted((DEPLOY / "compose").glob("*.sh")),
    *sorted((DEPLOY / "netns").glob("*.sh")),
    REPO / "bench" / "gpu_check.sh",
]
ROLE = {"Dockerfile.coordinator": "server", "Dockerfile.site": "client", "Dockerfile.site-cuda": "client"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_there_are_three_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == sorted(ROLE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    proc = run([hadolint, "--no-color", str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_cli_as_a_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    words = [w for w, _ in final]
    user = [a for w, a in final if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in words
    health = next(a for w, a in final if w == "HEALTHCHECK")
    assert "healthcheck.py" in health
    cli = ROLE[dockerfile.name]
    assert next(a for w, a in final if w == "ENTRYPOINT") == f'["fl-{cli}"]'
    assert next(a for w, a in final if w == "CMD") == f'["run", "--config", "/etc/fedseal/{cli}.toml"]'
    exposed = {int(p) for w, a in final if w == "EXPOSE" for p in a.split()}
    assert exposed == ({9092, 9095, 9464} if cli == "server" else set())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_path_a_dockerfile_copies_from_the_build_context_exists(dockerfile: Path) -> None:
    for word, args in instructions(dockerfile):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"


@pytest.mark.parametrize(("cli", "args"), [("fl-server", ["run"]), ("fl-client", ["run"])])
def test_container_entrypoints_are_real_cli_commands_with_the_flags_the_images_pass(
    cli: str, args: list[str]
) -> None:
    exe = VENV_BIN / cli
    if not exe.exists():
        pytest.skip(f"{cli} is not installed in this venv")
    proc = run([str(exe), *args, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout
    if cli == "fl-server":
        assert "--resume" in proc.stdout


def test_compose_file_validates_with_docker_compose() -> None:
    compose = require_tool("docker-compose")
    proc = run([compose, "-p", "fedseal", "-f", str(COMPOSE), "config", "-q"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_everything_non_root_read_only_and_publishes_only_the_coordinator_ports() -> None:
    services = load_compose()["services"]
    assert {"coordinator", "site-a", "site-b", "site-c", "pki", "enrol", "consortium"} <= services.keys()
    for name, svc in services.items():
        assert svc["read_only"] is True, name
        assert svc["user"] == "10001:10001", name
        assert svc["cap_drop"] == ["ALL"], name
        if name != "coordinator":
            assert "ports" not in svc, f"{name} must not publish ports"
    assert services["coordinator"]["ports"] == ["9092:9092", "9095:9095", "127.0.0.1:9464:9464"]
    assert services["coordinator"]["command"] == ["run", "--config", "/etc/fedseal/server.toml", "--resume"]


def test_compose_sites_reach_only_the_internal_fleet_network_and_mount_data_read_only() -> None:
    doc = load_compose()
    assert doc["networks"]["fleet"]["internal"] is True
    for site in ("site-a", "site-b", "site-c"):
        svc = doc["services"][site]
        assert svc["networks"] == ["fleet"]
        assert f"{site}-data:/data:ro" in svc["volumes"]
        assert f"{site}-keys:/etc/fedseal/keys:ro" in svc["volumes"]
        assert svc["command"] == ["run", "--config", "/var/lib/fedseal/client.toml"]
    for job in ("pki", "enrol", "site-a-init", "consortium"):
        assert doc["services"][job]["network_mode"] == "none"


def test_compose_consortium_job_signs_the_roster_that_sites_pin_and_alone_holds_the_authority_key() -> None:
    services = load_compose()["services"]
    job = services["consortium"]
    # The site image (fl-client roster ...), hardened like every service, after every site-init.
    assert job["image"] == services["site-a"]["image"]
    assert job["entrypoint"] == ["/bin/sh", "/opt/fedseal-compose/bootstrap-consortium.sh"]
    assert job["command"] == ["site-a", "site-b", "site-c"]
    assert job["restart"] == "no"
    assert {f"site-{s}-init": {"condition": "service_completed_successfully"} for s in "abc"} == job["depends_on"]
    assert "consortium-keys:/consortium-keys" in job["volumes"]
    assert "consortium:/consortium" in job["volumes"]
    assert "enrolment:/enrolment:ro" in job["volumes"]
    # The authority key stands in for the consortium's offline key: no other service mounts it.
    for name, svc in services.items():
        mounts = [v.split(":")[0] for v in svc.get("volumes", [])]
        if name != "consortium":
            assert "consortium-keys" not in mounts, f"{name} must not mount the roster authority's key"
    for site in ("site-a", "site-b", "site-c"):
        svc = services[site]
        assert "consortium:/etc/fedseal/consortium:ro" in svc["volumes"]
        assert svc["depends_on"]["consortium"] == {"condition": "service_completed_successfully"}
        assert svc["depends_on"]["coordinator"] == {"condition": "service_healthy"}


def test_compose_server_toml_is_accepted_by_the_coordinator_config_loader() -> None:
    config = pytest.importorskip("fedseal.server.config")
    cfg = config.load_server_config(DEPLOY / "compose" / "server.toml")
    assert cfg.tls.insecure is False
    assert cfg.network.fleet_port == 9092
    assert cfg.coordinator.state_dir == Path("/var/lib/fedseal")


def test_client_toml_written_by_the_compose_site_bootstrap_is_accepted_by_the_site_config_loader(
    tmp_path: Path,
) -> None:
    config = pytest.importorskip("fedseal.client.config")
    script = (DEPLOY / "compose" / "bootstrap-site.sh").read_text()
    body = re.search(r"<<TOML\n(.*?)\nTOML\n", script, re.S)
    assert body is not None
    text = body.group(1)
    for var, value in {"SITE": "site-b", "KEYS": "/etc/fedseal/keys", "STATE": "/var/lib/fedseal", "ROOT": "cd" * 32}.items():
        text = text.replace(f"${var}", value)
    assert "$" not in text
    (tmp_path / "client.toml").write_text(text)
    cfg = config.load_client_config(tmp_path / "client.toml")
    assert cfg.name == "site-b" and cfg.superlink == "coordinator:9092" and cfg.approved_root == "cd" * 32
    assert cfg.coordinator_key == Path("/etc/fedseal/keys/coordinator.pub")
    # The trust anchor: the roster the `consortium` job signs, under its pinned authority key.
    assert cfg.roster == Path("/etc/fedseal/consortium/roster.json")
    assert cfg.roster_authority == Path("/etc/fedseal/consortium/authority.key.pub")
    # No privacy opt-out: the product's defaults hold.
    assert cfg.privacy.allow_plain is False and cfg.privacy.min_cohort == 3


def test_compose_consortium_job_signs_a_roster_of_the_enrolled_keys_idempotently(tmp_path: Path) -> None:
    """The job's script, run outside a container (its volume paths moved under tmp_path)."""
    fl_client = VENV_BIN / "fl-client"
    if not fl_client.exists():
        pytest.skip("fl-client is not installed in this venv")
    require_tool("openssl")
    keys, out, enrolment, bin_dir = (tmp_path / d for d in ("consortium-keys", "consortium", "enrolment", "bin"))
    for d in (keys, out, enrolment, bin_dir):
        d.mkdir()
    (bin_dir / "fedseal-pki").symlink_to(DEPLOY / "pki" / "fedseal-pki")
    script = (DEPLOY / "compose" / "bootstrap-consortium.sh").read_text()
    for old, new in {"/consortium-keys": str(keys), "OUT=/consortium": f"OUT={out}", "/enrolment": str(enrolment),
                     "/tmp/roster.json": str(tmp_path / "show.json")}.items():
        assert old in script
        script = script.replace(old, new)
    (tmp_path / "job.sh").write_text(script)
    env = {"PATH": f"{VENV_BIN}:{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def site_key(name: str) -> None:
        run([str(fl_client), "keys", "init", "--out", str(tmp_path / f"{name}.key")], check=True, timeout=120)
        (enrolment / f"{name}.pub").write_bytes((tmp_path / f"{name}.key.pub").read_bytes())

    def job(*sites: str) -> subprocess.CompletedProcess[str]:
        return run(["sh", str(tmp_path / "job.sh"), *sites], env=env, timeout=300)

    def roster() -> dict[str, Any]:
        proc = run([str(fl_client), "roster", "show", "--roster", str(out / "roster.json"),
                    "--authority", str(out / "authority.key.pub"), "--json"], check=True, timeout=120)
        return json.loads(proc.stdout)

    for name in ("site-a", "site-b", "site-c"):
        site_key(name)
    first = job("site-a", "site-b", "site-c")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (keys / "authority.key").stat().st_mode & 0o077 == 0
    assert not (out / "authority.key").exists(), "the authority's private key never leaves its volume"
    doc = roster()
    assert doc["version"] == 1 and [s["site"] for s in doc["sites"]] == ["site-a", "site-b", "site-c"]
    again = job("site-a", "site-b", "site-c")
    assert again.returncode == 0, again.stdout + again.stderr
    assert roster()["version"] == 1, "an unchanged site set keeps the roster as it is"
    site_key("site-d")
    grown = job("site-a", "site-b", "site-c", "site-d")
    assert grown.returncode == 0, grown.stdout + grown.stderr
    doc = roster()
    assert doc["version"] == 2 and [s["site"] for s in doc["sites"]][-1] == "site-d"
    # A listed site whose key changed is the authority's decision, not the job's.
    (enrolment / "site-b.pub").write_bytes((tmp_path / "site-d.key.pub").read_bytes())
    rekeyed = job("site-a", "site-b", "site-c", "site-d")
    assert rekeyed.returncode == 1 and "site-b is in the roster" in rekeyed.stderr
    assert roster()["version"] == 2


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_passes_shellcheck(script: Path) -> None:
    if not script.exists():
        pytest.skip(f"{script.relative_to(REPO)} not present")
    shellcheck = require_tool("shellcheck")
    proc = run([shellcheck, "-x", str(script)])
    assert proc.returncode == 0, proc.stdout


def test_deployment_yaml_passes_yamllint() -> None:
    yamllint = require_tool("yamllint")
    files = [COMPOSE, DEPLOY / "helm" / "fedseal-coordinator" / "values.yaml", DEPLOY / "helm" / "fedseal-site" / "values.yaml",
             DEPLOY / "helm" / "fedseal-coordinator" / "Chart.yaml", DEPLOY / "helm" / "fedseal-site" / "Chart.yaml"]
    proc = run([yamllint, "-c", str(DEPLOY / ".yamllint.yaml"), "--strict", *map(str, files)])
    assert proc.returncode == 0, proc.stdout


# --- the health check --------------------------------------------------------------------


def healthcheck(role: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(HEALTHCHECK), role], env={"PATH": "/usr/bin:/bin", **env}, timeout=30)


@pytest.fixture
def metrics_server() -> Iterator[tuple[int, list[bytes]]]:
    body: list[bytes] = [b"# HELP fedseal_rounds_committed_total Rounds\nfedseal_rounds_committed_total 3.0\n"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body[0])

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1], body
    srv.shutdown()
    srv.server_close()


def test_coordinator_health_check_needs_the_fleet_listener_and_fedseal_metrics(
    metrics_server: tuple[int, list[bytes]],
) -> None:
    port, body = metrics_server
    fleet = socket.create_server(("127.0.0.1", 0))
    try:
        env = {
            "FEDSEAL_FLEET_ADDR": f"127.0.0.1:{fleet.getsockname()[1]}",
            "FEDSEAL_METRICS_URL": f"http://127.0.0.1:{port}/metrics",
        }
        ok = healthcheck("coordinator", env)
        assert ok.returncode == 0, ok.stderr
        body[0] = b"python_info 1\n"
        no_metrics = healthcheck("coordinator", env)
        assert no_metrics.returncode == 1 and "no fedseal_ metric" in no_metrics.stderr
    finally:
        fleet.close()
    closed = healthcheck("coordinator", env)
    assert closed.returncode == 1 and "fleet" in closed.stderr


def test_site_health_check_completes_tls_with_the_pinned_ca_and_checks_the_name(tmp_path: Path) -> None:
    require_tool("openssl")
    pki = DEPLOY / "pki" / "fedseal-pki"
    run(["bash", str(pki), "ca-init", "--ca", str(tmp_path / "ca")], check=True)
    run(["bash", str(pki), "server-cert", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"),
         "--san", "ip:127.0.0.1"], check=True)
    with tls_handshake_server(tmp_path / "srv" / "server-chain.pem", tmp_path / "srv" / "server.key") as port:
        target = f"127.0.0.1:{port}"
        ca = str(tmp_path / "ca" / "ca.pem")
        ok = healthcheck("site", {"FEDSEAL_SUPERLINK": target, "FEDSEAL_CA": ca})
        assert ok.returncode == 0, ok.stderr
        wrong = healthcheck("site", {"FEDSEAL_SUPERLINK": target, "FEDSEAL_CA": ca, "FEDSEAL_TLS_SERVER_NAME": "fl.example.org"})
        assert wrong.returncode == 1 and "not trusted" in wrong.stderr
        unset = healthcheck("site", {"FEDSEAL_CA": ca})
        assert unset.returncode == 1 and "FEDSEAL_SUPERLINK" in unset.stderr


def test_health_check_usage_error_exits_2() -> None:
    assert healthcheck("bogus", {}).returncode == 2

