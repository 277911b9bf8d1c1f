"""``fl-server provision``: what a site kit and the coordinator's kit hold, that no private key
ever gets in, that a kit's client.toml loads once the site's key and data exist, and every
refusal (one line, nothing written)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from typer.testing import CliRunner

from fedseal.client.config import ClientConfig, ClientConfigError, load_client_config
from fedseal.crypto.keys import (
    generate_identity_key,
    load_public_key,
    public_key_to_der,
    save_private_key,
    save_public_key,
)
from fedseal.protocol.consortium import ConsortiumRoster, ConsortiumSite, SignedConsortiumRoster
from fedseal.server.config import load_server_config
from fedseal.server.pki import create_ca, issue_server_certificate
from fedseal.server.provision import APPROVED_ROOT_PLACEHOLDER, KIT_FILES, ProvisionError, provision
from fedseal.sim.commands import app

runner = CliRunner()


def _now() -> datetime:
    """The time of the call: a certificate that fl-server init makes mid-suite is valid from
    five minutes before it was made, so a time taken at collection can precede it."""
    return datetime.now(UTC)


@pytest.fixture
def server_toml(tmp_path: Path) -> Path:
    res = runner.invoke(
        app, ["init", str(tmp_path / "coord"), "--san", "coord.example.org", "--san", "10.0.0.5"]
    )
    assert res.exit_code == 0, res.output
    return tmp_path / "coord" / "server.toml"


def _authority(tmp_path: Path, *sites: str) -> tuple[Path, Path]:
    key = generate_identity_key()
    pub = tmp_path / "authority.pub"
    save_public_key(key.public_key(), pub)
    members = tuple(
        ConsortiumSite(s, public_key_to_der(generate_identity_key().public_key())) for s in sites
    )
    roster = tmp_path / "roster.json"
    roster.write_text(
        SignedConsortiumRoster.sign(ConsortiumRoster("pilot", 1, 1, members), key).to_json()
    )
    return roster, pub


def _provision(server_toml: Path, out: Path, *args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["provision", "--config", str(server_toml), "--out", str(out), *args])
    return res.exit_code, res.output


def _all_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_each_site_gets_its_client_toml_ca_coordinator_key_roster_pin_start_script_and_readme(
    server_toml: Path, tmp_path: Path
) -> None:
    roster, pub = _authority(tmp_path)
    code, out = _provision(
        server_toml, tmp_path / "kits", "--site", "hospital-a", "--site", "hospital-b", "--site", "hospital-c",
        "--address", "coord.example.org", "--roster", str(roster), "--roster-authority", str(pub),
    )  # fmt: skip
    assert code == 0, out
    kits = tmp_path / "kits"
    assert sorted(p.name for p in kits.iterdir()) == [
        "coordinator",
        "hospital-a",
        "hospital-b",
        "hospital-c",
    ]
    coord = server_toml.parent
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        kit = kits / site
        assert sorted(p.name for p in kit.iterdir()) == sorted(
            [*KIT_FILES, "consortium-roster.json", "roster-authority.pub"]
        )
        text = (kit / "client.toml").read_text()
        assert f'name = "{site}"' in text
        assert 'superlink = "coord.example.org:9092"' in text  # server.toml's fleet port
        assert 'audit_address = "coord.example.org:9095"' in text  # and its audit port
        assert (kit / "ca.pem").read_bytes() == (coord / "tls" / "ca.pem").read_bytes()
        assert public_key_to_der(load_public_key(kit / "coordinator.pub")) == public_key_to_der(
            load_public_key(coord / "coordinator.pub")
        )
        assert (kit / "consortium-roster.json").read_bytes() == roster.read_bytes()
        assert public_key_to_der(
            load_public_key(kit / "roster-authority.pub")
        ) == public_key_to_der(load_public_key(pub))
        start = (kit / "start.sh").read_text()
        assert (
            start.startswith("#!/bin/sh\n")
            and stat.S_IMODE((kit / "start.sh").stat().st_mode) == 0o755
        )
        assert f"SITE={site}" in start and "keys init" in start and 'exec "$FL_CLIENT" run' in start
        readme = (kit / "README.txt").read_text()
        assert site in readme and "fingerprint" in readme and "sh start.sh --request" in readme
    record = json.loads((kits / "coordinator" / "kits.json").read_text())
    assert [s["site"] for s in record["sites"]] == ["hospital-a", "hospital-b", "hospital-c"]
    assert record["superlink"] == "coord.example.org:9092"
    assert record["sites"][0]["enroll"].startswith(
        f"fl-server enroll --config '{server_toml.resolve()}' --site hospital-a"
    )
    ca = x509.load_pem_x509_certificate((coord / "tls" / "ca.pem").read_bytes())
    assert record["ca_sha256"].replace(":", "").lower() == ca.fingerprint(hashes.SHA256()).hex()
    readme = (kits / "coordinator" / "README.txt").read_text()
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        assert f"--site {site} --key {site}.pub --dataset-root" in readme
        assert (
            f"fl-client roster add --roster ROSTER --authority-key AUTHORITY.key --site {site}"
            in readme
        )


def test_no_kit_file_holds_a_private_key_even_when_the_ca_file_carries_one(
    server_toml: Path, tmp_path: Path
) -> None:
    coord = server_toml.parent
    # An operator concatenated the CA key into ca.pem: the kit must not carry it along.
    ca_pem = coord / "tls" / "ca.pem"
    ca_pem.write_bytes(ca_pem.read_bytes() + (coord / "tls" / "ca.key").read_bytes())
    code, out = _provision(server_toml, tmp_path / "kits", "--site", "a", "--address", "10.0.0.5")
    assert code == 0, out
    files = _all_bytes(tmp_path / "kits")
    assert files and not [name for name, data in files.items() if b"PRIVATE" in data]
    assert x509.load_pem_x509_certificates(files["a/ca.pem"])  # the certificate itself is there


def test_a_kits_client_toml_is_refused_until_start_sh_fills_in_the_dataset_root_then_loads(
    server_toml: Path, tmp_path: Path
) -> None:
    roster, pub = _authority(tmp_path)
    cfg = load_server_config(server_toml)
    kits = provision(cfg, ["site-a"], address="coord.example.org", out=tmp_path / "kits", now=_now(),
                     roster=roster, authority=pub)  # fmt: skip
    toml = kits.sites[0] / "client.toml"
    with pytest.raises(ClientConfigError, match=r"data\.approved_root: must be 64 hex"):
        load_client_config(toml)
    # What start.sh does at the site: a key of its own, its dataset's root in [data].
    save_private_key(generate_identity_key(), kits.sites[0] / "site.key")
    toml.write_text(toml.read_text().replace(APPROVED_ROOT_PLACEHOLDER, "ab" * 32))
    loaded = load_client_config(toml)
    assert loaded.name == "site-a" and loaded.superlink == "coord.example.org:9092"
    assert loaded.audit_address == "coord.example.org:9095"
    assert (
        loaded.ca_cert == kits.sites[0] / "ca.pem"
        and loaded.coordinator_key == kits.sites[0] / "coordinator.pub"
    )
    assert loaded.roster == kits.sites[0] / "consortium-roster.json"
    assert loaded.roster_authority == kits.sites[0] / "roster-authority.pub"
    assert loaded.dataset_dir == kits.sites[0] / "data" and loaded.approved_root == "ab" * 32


def test_an_ipv6_address_is_bracketed_in_the_kit(tmp_path: Path) -> None:
    assert runner.invoke(app, ["init", str(tmp_path / "c"), "--san", "::1"]).exit_code == 0
    cfg = load_server_config(tmp_path / "c" / "server.toml")
    kits = provision(cfg, ["site-a"], address="[::1]", out=tmp_path / "kits", now=_now())
    toml = kits.sites[0] / "client.toml"
    toml.write_text(toml.read_text().replace(APPROVED_ROOT_PLACEHOLDER, "cd" * 32))
    assert load_client_config(toml).superlink == "[::1]:9092"


def test_a_kit_without_a_roster_says_the_site_needs_peers(
    server_toml: Path, tmp_path: Path
) -> None:
    cfg = load_server_config(server_toml)
    kits = provision(
        cfg,
        ["site-a", "site-b", "site-c"],
        address="coord.example.org",
        out=tmp_path / "k",
        now=_now(),
    )
    assert "[trust]\n" not in (kits.sites[0] / "client.toml").read_text()
    assert any("no --roster" in n for n in kits.notes)
    assert "[peers]" in (kits.sites[0] / "README.txt").read_text()


def test_an_empty_output_directory_is_used(server_toml: Path, tmp_path: Path) -> None:
    (tmp_path / "kits").mkdir()
    code, out = _provision(
        server_toml, tmp_path / "kits", "--site", "a", "--address", "coord.example.org"
    )
    assert code == 0, out
    assert (tmp_path / "kits" / "a" / "client.toml").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "Hospital A", "--address", "coord.example.org"], "site id 'Hospital A' is invalid"),
        (["--site", "a", "--site", "a", "--address", "coord.example.org"], "--site 'a' is given twice"),
        (["--site", "coordinator", "--address", "coord.example.org"], "reserved for the coordinator's own kit"),
        (["--site", "a", "--address", "other.example.org"],
         "--address other.example.org: the server certificate"),
        (["--site", "a", "--address", "10.0.0.6"], "does not name it (it names coord.example.org, 10.0.0.5)"),
        (["--site", "a", "--address", "coord.example.org:9092"], "give the host name or IP address only"),
        (["--site", "a", "--address", "coord example"], "is not a DNS name or an IP address"),
    ],
)  # fmt: skip
def test_a_bad_site_name_or_address_is_refused_in_one_line_and_nothing_is_written(
    server_toml: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, out = _provision(server_toml, tmp_path / "kits", *args)
    assert code == 2
    assert message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "kits").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["coord"]  # no temporary directory left


def test_an_unknown_config_is_refused(tmp_path: Path) -> None:
    code, out = _provision(
        tmp_path / "nowhere.toml", tmp_path / "kits", "--site", "a", "--address", "x.org"
    )
    assert code == 2 and "nowhere.toml" in out and "cannot read" in out
    assert not (tmp_path / "kits").exists()


def test_an_existing_non_empty_output_directory_is_refused_and_left_alone(
    server_toml: Path, tmp_path: Path
) -> None:
    (tmp_path / "kits").mkdir()
    (tmp_path / "kits" / "mine.txt").write_text("keep")
    code, out = _provision(
        server_toml, tmp_path / "kits", "--site", "a", "--address", "coord.example.org"
    )
    assert code == 2 and "exists and is not an empty directory" in out
    assert [p.name for p in (tmp_path / "kits").iterdir()] == ["mine.txt"]


def test_a_roster_needs_its_authority_key_and_must_verify_under_it(
    server_toml: Path, tmp_path: Path
) -> None:
    roster, _ = _authority(tmp_path)
    code, out = _provision(server_toml, tmp_path / "k", "--site", "a", "--address", "coord.example.org",
                           "--roster", str(roster))  # fmt: skip
    assert code == 2 and "--roster needs --roster-authority too" in out
    other = tmp_path / "other.pub"
    save_public_key(generate_identity_key().public_key(), other)
    code, out = _provision(server_toml, tmp_path / "k", "--site", "a", "--address", "coord.example.org",
                           "--roster", str(roster), "--roster-authority", str(other))  # fmt: skip
    assert code == 2 and "not by the pinned authority key" in out
    assert not (tmp_path / "k").exists()


def test_a_server_certificate_from_another_ca_or_expired_is_refused(
    server_toml: Path, tmp_path: Path
) -> None:
    coord = server_toml.parent
    other = create_ca("someone else", now=_now())
    cert, _ = issue_server_certificate(other, ["coord.example.org"], now=_now())
    (coord / "tls" / "server.pem").write_bytes(cert)
    cfg = load_server_config(server_toml)
    with pytest.raises(
        ProvisionError, match=r"does not verify under .*ca\.pem for coord\.example\.org"
    ):
        provision(cfg, ["a"], address="coord.example.org", out=tmp_path / "k", now=_now())
    assert (
        runner.invoke(app, ["init", str(tmp_path / "c2"), "--san", "coord.example.org"]).exit_code
        == 0
    )
    later = load_server_config(tmp_path / "c2" / "server.toml")
    with pytest.raises(ProvisionError, match="does not verify"):  # the init certificate, a year on
        provision(
            later,
            ["a"],
            address="coord.example.org",
            out=tmp_path / "k",
            now=_now() + timedelta(days=400),
        )


def test_a_coordinator_without_tls_is_refused(server_toml: Path, tmp_path: Path) -> None:
    server_toml.write_text(server_toml.read_text().replace("[tls]\n", "[tls]\ninsecure = true\n"))
    code, out = _provision(
        server_toml, tmp_path / "k", "--site", "a", "--address", "coord.example.org"
    )
    assert code == 2 and "tls.insecure = true" in out


def test_start_sh_makes_the_key_fills_in_the_root_and_prints_the_enrolment_command(
    server_toml: Path, tmp_path: Path
) -> None:
    from fedseal.client.data.prepare import prepare_dataset

    cfg = load_server_config(server_toml)
    kit = provision(
        cfg, ["site-a"], address="coord.example.org", out=tmp_path / "k", now=_now()
    ).sites[0]
    csv = tmp_path / "d.csv"
    csv.write_text("x,y,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    root = prepare_dataset(str(csv), kit / "data", label_column="label").root.hex()
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    first = subprocess.run(["sh", str(kit / "start.sh"), "--request"], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((kit / "site.key").stat().st_mode) == 0o600
    assert f"dataset root  {root}" in first.stdout
    assert (f"fl-server enroll --config {server_toml.resolve()} --site site-a --key site-a.pub "
            f"--dataset-root {root}") in first.stdout  # fmt: skip
    assert "-----BEGIN PUBLIC KEY-----" in first.stdout and "PRIVATE" not in first.stdout
    assert load_client_config(kit / "client.toml").approved_root == root
    key = (kit / "site.key").read_bytes()
    again = subprocess.run(["sh", str(kit / "start.sh"), "--request"], env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (kit / "site.key").read_bytes() == key  # the key is made once, never replaced


def test_start_sh_without_a_prepared_dataset_says_how_to_make_one(
    server_toml: Path, tmp_path: Path
) -> None:
    cfg = load_server_config(server_toml)
    kit = provision(
        cfg, ["site-a"], address="coord.example.org", out=tmp_path / "k", now=_now()
    ).sites[0]
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    res = subprocess.run(
        ["sh", str(kit / "start.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert "no prepared dataset in data: run  fl-client data prepare YOUR.csv data" in res.stderr


def test_a_stale_coordinator_pub_beside_the_key_is_refused_not_pinned(
    server_toml: Path, tmp_path: Path
) -> None:
    pub = server_toml.parent / "coordinator.pub"
    save_public_key(
        generate_identity_key().public_key(), pub
    )  # not the key the coordinator signs with
    code, out = _provision(
        server_toml, tmp_path / "kits", "--address", "coord.example.org", "--site", "site-a"
    )
    assert code == 2, out
    assert "is not the public half of" in " ".join(out.split())
    assert not (tmp_path / "kits").exists()


def test_each_kit_gets_its_own_local_runtime_port_clear_of_the_coordinators_ports(
    server_toml: Path, tmp_path: Path
) -> None:
    cfg = load_server_config(server_toml)
    sites = ["site-a", "site-b", "site-c"]
    kits = provision(cfg, sites, address="coord.example.org", out=tmp_path / "k", now=_now())
    ports = []
    for kit in kits.sites:
        save_private_key(generate_identity_key(), kit / "site.key")
        toml = kit / "client.toml"
        toml.write_text(toml.read_text().replace(APPROVED_ROOT_PLACEHOLDER, "ab" * 32))
        port = load_client_config(toml).runtime_port
        ports.append(port)
        readme = (kit / "README.txt").read_text()
        assert f"127.0.0.1:{port}" in readme and "a local port" in readme
    coordinator = {cfg.network.fleet_port, cfg.network.internal_port, cfg.network.metrics_port,
                   cfg.network.audit_port}  # fmt: skip
    assert len(set(ports)) == 3 and not set(ports) & coordinator
    assert ports == [9094, 9096, 9097]  # 9095 is the audit port of fl-server init's server.toml
    record = json.loads((kits.coordinator / "kits.json").read_text())
    assert [s["runtime_port"] for s in record["sites"]] == ports


def test_a_kits_client_toml_says_how_to_allow_the_sites_own_recipe(
    server_toml: Path, tmp_path: Path
) -> None:
    cfg = load_server_config(server_toml)
    kit = provision(
        cfg, ["site-a"], address="coord.example.org", out=tmp_path / "k", now=_now()
    ).sites[0]
    save_private_key(generate_identity_key(), kit / "site.key")
    toml = kit / "client.toml"
    text = toml.read_text().replace(APPROVED_ROOT_PLACEHOLDER, "ab" * 32)
    commented = '# allowed_models = ["mlp", "PACKAGE:recipe"]'
    assert commented in text and "[limits]" in text
    _load(toml, text)  # the kit loads as written (the line is a comment)
    # Uncommented, under its table, the line is what the site means.
    allowed = text.replace("# [limits] (", "[limits]\n# (").replace(commented, commented[2:])
    allowed = allowed.replace("PACKAGE:recipe", "fedseal_example_tabular:recipe")
    assert _load(toml, allowed).allowed_models == ("mlp", "fedseal_example_tabular:recipe")


def _load(path: Path, text: str) -> ClientConfig:
    path.write_text(text)
    return load_client_config(path)
