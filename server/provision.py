"""``fl-server provision``: one start-up kit per partner site, and one for the coordinator.

Usage::

    from fedseal.server.provision import provision
    kits = provision(cfg, ["hospital-a", "hospital-b"], address="coord.example.org",
                     out=Path("kits"), roster=Path("roster.json"),
                     authority=Path("authority.key.pub"), now=datetime.now(UTC))

A site kit is a directory ``OUT/<site>/``::

    client.toml              [site] name, [coordinator] superlink/audit_address (address + the
                             ports of server.toml), ca_cert, public_key, [data] (the site
                             completes it), [trust] roster + roster_authority (when given),
                             a commented [limits] allowed_models (how to allow the site's own
                             recipe), [runtime] port (:func:`site_runtime_ports`: one per kit,
                             so sites sharing a host for a trial do not clash)
    ca.pem                   the CA that signed the coordinator's TLS certificate
    coordinator.pub          the coordinator's signing key, pinned by the site
    consortium-roster.json   the signed consortium roster, and the roster authority's public
    roster-authority.pub       key the site pins (only with ``roster``/``authority``)
    start.sh                 POSIX sh: site key (if none), dataset root, enrolment request,
                             then ``fl-client run``
    README.txt               the same in plain words, with the fingerprints to confirm by phone

and ``OUT/coordinator/`` holds ``README.txt`` (what each site sends back, the ``fl-server enroll``
command per site, the fingerprints to read out to the sites) and ``kits.json`` (the same,
machine-readable). Kits are directories, not archives: a site's operator reads README.txt and
checks the fingerprints before running anything, start.sh keeps its execute bit, and the
coordinator keeps the very tree it sent; ``tar czf SITE.tar.gz -C OUT SITE`` packs one for the
way. The whole ``OUT`` is written in a temporary directory beside it and renamed into place, so
a refusal or a crash leaves nothing behind.

No private key ever goes in a kit: every file is text written here or re-encoded from a parsed
public object (the CA certificate, the coordinator's and the roster authority's public keys,
the signed roster after it verified under that authority), so a key block sitting in an input
file (a ``ca.pem`` concatenated with its key) cannot be copied along. Each site creates its own
key with ``fl-client keys init``; it never leaves the site.

Refusals (:class:`ProvisionError`, one line): TLS off (``tls.insecure``), a site name that is not
a valid site id or is given twice, an address with a port or that is no host name, an address
the CA-signed server certificate does not cover (checked as a TLS client checks it: chain to
``tls.ca_cert``, validity, subject alternative names), a roster without its authority key (or
the other way round) or one that does not verify under it, a missing coordinator public key,
an existing non-empty output directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from fedseal.crypto.errors import KeyFormatError
from fedseal.crypto.keys import key_id, load_private_key, load_public_key, public_key_to_der
from fedseal.protocol.consortium import (
    MAX_ROSTER_JSON_BYTES,
    ConsortiumRosterError,
    SignedConsortiumRoster,
    validate_site_id,
)
from fedseal.server.config import ServerConfig
from fedseal.server.errors import CoordinatorError

__all__ = [
    "APPROVED_ROOT_PLACEHOLDER",
    "COORDINATOR_KIT",
    "FIRST_RUNTIME_PORT",
    "KIT_FILES",
    "Kits",
    "ProvisionError",
    "provision",
    "site_runtime_ports",
]

COORDINATOR_KIT = "coordinator"
FIRST_RUNTIME_PORT = 9094
"""The first kit's ``[runtime] port``; the next kits count up from it (:func:`site_runtime_ports`)."""
"""The coordinator's own kit directory in ``OUT`` (so no site may be called that)."""
APPROVED_ROOT_PLACEHOLDER = "filled-in-by-start.sh"
"""``[data] approved_root`` in a new kit: not 64 hex, so ``fl-client run`` refuses it by name
until ``start.sh`` writes the root of the site's own dataset there."""
ROSTER_FILE = "consortium-roster.json"
AUTHORITY_FILE = "roster-authority.pub"
KIT_FILES = ("client.toml", "ca.pem", "coordinator.pub", "start.sh", "README.txt")
"""Every site kit's files; with a roster also :data:`ROSTER_FILE` and :data:`AUTHORITY_FILE`."""

_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class ProvisionError(CoordinatorError):
    """A kit cannot be made as asked (one line naming the input and why)."""


@dataclass(frozen=True, slots=True)
class Kits:
    """What :func:`provision` wrote.

    Attributes:
        out: The output directory.
        sites: Each site's kit directory, in the order given.
        coordinator: The coordinator's kit directory.
        notes: Lines the operator should read (a run setting the sites cannot meet, no audit
            address, no roster).
    """

    out: Path
    sites: tuple[Path, ...]
    coordinator: Path
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Inputs:
    """Everything a kit is made of, read and checked before anything is written."""

    ca_pem: bytes
    ca_fingerprint: str
    coordinator_pub_pem: bytes
    coordinator_key_id: str
    roster_json: bytes | None
    authority_pub_pem: bytes | None
    authority_key_id: str | None
    roster_summary: str | None


def _check_signing_key(key_path: Path, pub_path: Path, pub: ec.EllipticCurvePublicKey) -> None:
    """Refuse to pin a ``.pub`` that is not the coordinator's signing key (a stale copy beside
    the key: every site would then refuse everything; found by review). An encrypted key
    (``FEDSEAL_COORDINATOR_PASSPHRASE``) cannot be opened here and is not compared."""
    try:
        private = load_private_key(key_path, None)
    except (OSError, ValueError, TypeError, KeyFormatError):
        return
    if public_key_to_der(private.public_key()) != public_key_to_der(pub):
        raise ProvisionError(
            f"{pub_path} is not the public half of {key_path} (the key the coordinator signs "
            "with): kits would pin a key the coordinator does not use; restore the matching .pub"
        )


def provision(
    cfg: ServerConfig,
    sites: Sequence[str],
    *,
    address: str,
    out: Path,
    now: datetime,
    roster: Path | None = None,
    authority: Path | None = None,
) -> Kits:
    """Write a kit per site and the coordinator's kit into ``out`` (module docstring).

    Args:
        cfg: The coordinator's configuration (``server.toml``).
        sites: Site names (valid site ids, each once).
        address: The DNS name or IP address the sites reach the coordinator by (no port).
        out: Output directory: must not exist, or be empty.
        now: The time the kits are made (recorded; the server certificate must be valid then).
        roster: The signed consortium roster to pin (with ``authority``).
        authority: The roster authority's public key (PEM).

    Raises:
        ProvisionError: One line naming the input and why (module docstring).
    """
    names = _check_sites(sites)
    host = _check_address(address)
    _check_out(out)
    inputs = _read_inputs(cfg, host, now, roster, authority)
    notes = _notes(cfg, len(names), roster is not None)
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # noqa: S103 (kits hold no secret; mkdtemp makes it 0700)
        for name, port in zip(names, site_runtime_ports(cfg, len(names)), strict=True):
            _write_site_kit(tmp / name, cfg, name, host, inputs, now, port)
        _write_coordinator_kit(tmp / COORDINATOR_KIT, cfg, names, host, inputs, notes, now, out)
        if out.exists():
            out.rmdir()  # empty (checked above); a file appearing since makes this fail
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Kits(out, tuple(out / n for n in names), out / COORDINATOR_KIT, notes)


# -- checks ------------------------------------------------------------------------------------
def _check_sites(sites: Sequence[str]) -> list[str]:
    if not sites:
        raise ProvisionError("name at least one site (--site NAME)")
    seen: list[str] = []
    for name in sites:
        try:
            validate_site_id(name)
        except ConsortiumRosterError as exc:
            raise ProvisionError(f"--site {name!r}: {exc}") from None
        if name == COORDINATOR_KIT:
            raise ProvisionError(f"--site {name!r}: reserved for the coordinator's own kit")
        if name in seen:
            raise ProvisionError(f"--site {name!r} is given twice")
        seen.append(name)
    return seen


def _check_address(address: str) -> str:
    host = address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or "/" in host:
        raise ProvisionError(
            f"--address {address!r}: give the host name or IP address only (the ports come "
            "from server.toml [network])"
        )
    if not _HOST.fullmatch(host):
        raise ProvisionError(f"--address {address!r} is not a DNS name or an IP address")
    return host.lower().rstrip(".")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(
            f"{out} exists and is not an empty directory; refusing to write kits over it"
        )


def _read(path: Path | None, what: str, limit: int = 1 << 20) -> bytes:
    if path is None:
        raise ProvisionError(f"{what}: not set in server.toml")
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ProvisionError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ProvisionError(f"{what} {path}: larger than {limit} bytes")
    return data


def _certificates(path: Path | None, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ProvisionError(f"{what} {path}: no PEM certificate in it")
    return certs


def _public_key(path: Path, what: str) -> ec.EllipticCurvePublicKey:
    try:
        return load_public_key(path)
    except FileNotFoundError:
        raise ProvisionError(f"{what} {path}: not found") from None
    except OSError as exc:
        raise ProvisionError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    except KeyFormatError as exc:
        raise ProvisionError(f"{what} {path}: {exc}") from None


def _pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]  # fmt: skip


def _check_server_certificate(cfg: ServerConfig, host: str, now: datetime) -> bytes:
    """As a site's TLS client will: the server certificate chains to ``tls.ca_cert``, is valid
    ``now`` and names ``host``. Returns the CA certificate(s) as PEM, re-encoded."""
    cas = _certificates(cfg.tls.ca_cert, "tls.ca_cert")
    chain = _certificates(cfg.tls.server_cert, "tls.server_cert")
    try:
        subject: x509.DNSName | x509.IPAddress = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(cas))
        .time(now)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(chain[0], chain[1:])
    except verification.VerificationError as exc:
        names = _san_names(chain[0])
        if "subjectAltName" in str(exc):
            raise ProvisionError(
                f"--address {host}: the server certificate {cfg.tls.server_cert} does not name "
                f"it (it names {', '.join(names) or 'nothing'}), so sites would fail TLS: give "
                "one of those, or reissue the certificate for it (fl-server init --san, or your CA)"
            ) from None
        raise ProvisionError(
            f"the server certificate {cfg.tls.server_cert} does not verify under "
            f"{cfg.tls.ca_cert} for {host}, so sites would fail TLS: {exc}"
        ) from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cas)


def _read_inputs(
    cfg: ServerConfig, host: str, now: datetime, roster: Path | None, authority: Path | None
) -> _Inputs:
    if cfg.tls.insecure:
        raise ProvisionError(
            f"{cfg.path.name}: tls.insecure = true; kits are for a coordinator with TLS "
            "(set [tls] ca_cert, server_cert, server_key)"
        )
    ca_pem = _check_server_certificate(cfg, host, now)
    ca = x509.load_pem_x509_certificates(ca_pem)[0]
    fingerprint = ":".join(f"{b:02X}" for b in ca.fingerprint(hashes.SHA256()))
    pub_path = cfg.coordinator.key.with_suffix(".pub")
    coordinator = _public_key(pub_path, "coordinator public key (fl-server init writes it)")
    _check_signing_key(cfg.coordinator.key, pub_path, coordinator)
    if (roster is None) != (authority is None):
        given, missing = (
            ("--roster", "--roster-authority")
            if authority is None
            else ("--roster-authority", "--roster")
        )
        raise ProvisionError(
            f"{given} needs {missing} too: a site trusts a roster only under a pinned authority key"
        )
    roster_json = authority_pem = None
    authority_kid = summary = None
    if roster is not None and authority is not None:
        authority_key = _public_key(authority, "roster authority key")
        roster_json = _read(roster, "consortium roster", MAX_ROSTER_JSON_BYTES)
        try:
            verified = SignedConsortiumRoster.from_json(roster_json).verify(authority_key)
        except ConsortiumRosterError as exc:
            raise ProvisionError(f"consortium roster {roster}: {exc}") from None
        authority_pem = _pem(authority_key)
        authority_kid = bytes(key_id(authority_key)).hex()
        summary = (
            f"consortium {verified.consortium!r} version {verified.version}, "
            f"{len(verified.sites)} site(s)"
        )
    return _Inputs(
        ca_pem=ca_pem,
        ca_fingerprint=fingerprint,
        coordinator_pub_pem=_pem(coordinator),
        coordinator_key_id=bytes(key_id(coordinator)).hex(),
        roster_json=roster_json,
        authority_pub_pem=authority_pem,
        authority_key_id=authority_kid,
        roster_summary=summary,
    )


def _notes(cfg: ServerConfig, n_sites: int, with_roster: bool) -> tuple[str, ...]:
    notes: list[str] = []
    if n_sites < cfg.run.min_sites:
        notes.append(
            f"run.min_sites = {cfg.run.min_sites} in {cfg.path.name} but {n_sites} kit(s) made: a "
            "run starts only when that many sites are enrolled (provision more, or lower it)"
        )
    if _audit_address(cfg, "coordinator") is None:
        notes.append(
            "no audit_address in the kits (run.secure = false, or network.audit_port = 0): "
            "sites cannot check their receipts against the audit log"
        )
    if not with_roster:
        notes.append(
            "no --roster: each site must add its peers to client.toml ([trust] roster + "
            "roster_authority, or [peers]) before fl-client run accepts a secure round"
        )
    if cfg.network.fleet_host in ("127.0.0.1", "::1", "localhost"):
        notes.append(
            f"network.fleet_host = {cfg.network.fleet_host}: only this machine can reach the "
            "fleet port (set 0.0.0.0 for remote sites)"
        )
    return tuple(notes)


# -- writing -----------------------------------------------------------------------------------
def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _audit_address(cfg: ServerConfig, host: str) -> str | None:
    if not cfg.run.secure or cfg.network.audit_port == 0:
        return None
    return _hostport(host, cfg.network.audit_port)


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    # Belt and braces: nothing written here may ever carry a private key.
    if b"PRIVATE KEY" in raw:
        raise ProvisionError(f"refusing to write {path.name}: it would hold a private key")
    path.write_bytes(raw)
    os.chmod(path, mode)


def _version() -> str:
    try:
        return metadata.version("fedseal")
    except metadata.PackageNotFoundError:
        return "unknown"


def site_runtime_ports(cfg: ServerConfig, n: int) -> list[int]:
    """The ``[runtime] port`` of each of ``n`` kits: :data:`FIRST_RUNTIME_PORT` upward, one per
    kit, skipping the coordinator's own ports (``[network]``: fleet, internal, metrics, audit),
    so a trial with the coordinator and every site on one host has no clash. The port is local
    (the site's SuperNode Runtime API on 127.0.0.1): sites on separate hosts may share one."""
    taken = {
        cfg.network.fleet_port,
        cfg.network.internal_port,
        cfg.network.metrics_port,
        cfg.network.audit_port,
    }
    ports: list[int] = []
    port = FIRST_RUNTIME_PORT
    while len(ports) < n:
        if port not in taken:
            ports.append(port)
        port += 1
    return ports


def _client_toml(
    cfg: ServerConfig, site: str, host: str, inputs: _Inputs, now: datetime, port: int
) -> str:
    audit = _audit_address(cfg, host)
    lines = [
        f"# fedseal site configuration for {site}, written by `fl-server provision` on "
        f"{now:%Y-%m-%d %H:%M} UTC.",
        "# Every key: `fl-client run --help`, fedseal's client/config.py; the policy in force:",
        "#   fl-client policy show --config client.toml",
        "[site]",
        f'name = "{site}"',
        'key = "site.key"          # this site\'s own key: start.sh creates it; it never leaves',
        'state_dir = "state"',
        "",
        "[coordinator]",
        f'superlink = "{_hostport(host, cfg.network.fleet_port)}"',
        'ca_cert = "ca.pem"',
        'public_key = "coordinator.pub"',
    ]
    if audit is not None:
        lines.append(f'audit_address = "{audit}"   # receipts checked in the audit log each round')
    lines += [
        "",
        "[data]",
        'dataset_dir = "data"      # fl-client data prepare YOUR.csv data --label COLUMN',
        f'approved_root = "{APPROVED_ROOT_PLACEHOLDER}"   # start.sh writes your dataset\'s root',
        "",
        "# [privacy] (this site's own floor; the defaults are the safe ones), e.g.",
        "# min_cohort = 3            # smallest secure round this site joins",
        '# dp = "required"           # refuse rounds without differential privacy',
        "# epsilon_budget = 4.0",
        "",
        "# [limits] (this site's own caps on a coordinator's request). To allow this site's own",
        "# recipe (a package installed here: PACKAGE:recipe, e.g. fedseal_example_tabular:recipe",
        '# after pip install -e examples/tabular) beside the built-in "mlp" (the default also',
        '# lists "cnn", for square images; a model that does not fit the data is skipped):',
        '# allowed_models = ["mlp", "PACKAGE:recipe"]',
        "",
    ]
    if inputs.roster_json is not None:
        lines += [
            "[trust]                   # peers: the consortium roster, under the pinned authority",
            f'roster = "{ROSTER_FILE}"',
            f'roster_authority = "{AUTHORITY_FILE}"',
            "",
        ]
    else:
        lines += [
            "# [trust] or [peers]: which other sites this site trusts (required for secure",
            "# rounds), e.g.",
            '# roster = "consortium-roster.json"',
            '# roster_authority = "roster-authority.pub"',
            "",
        ]
    lines += [
        "[runtime]",
        f"port = {port}               # this site's SuperNode Runtime API: a local port, on "
        "127.0.0.1 only",
        "",
    ]
    return "\n".join(lines)


_START_SH = r"""#!/bin/sh
# fedseal start-up script for site @SITE@ (written by `fl-server provision`; POSIX sh).
#
#   sh start.sh --request   the site key (created if there is none), the dataset root (written
#                           into client.toml the first time), the enrolment request to send to
#                           the coordinator (enrolment-request.txt); then stop
#   sh start.sh [OPTIONS]   the same, then `fl-client run --config client.toml OPTIONS`
#                           (e.g. --re-enrol after the coordinator approved a changed dataset)
#
# FL_CLIENT: the fl-client command to use (default: fl-client on PATH).
set -eu
KIT=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
cd "$KIT"
FL_CLIENT=${FL_CLIENT:-fl-client}
SITE=@SITE@
ENROLL_CONFIG=@CONFIG@

say() { printf '%s\n' "start.sh: $*" >&2; }
command -v "$FL_CLIENT" >/dev/null 2>&1 || {
    say "$FL_CLIENT not found: install fedseal @VERSION@ at this site (README.txt step 1)"; exit 2; }

# 1. This site's identity key: made here, kept here (site.key, mode 0600), never sent.
if [ ! -f site.key ]; then
    "$FL_CLIENT" keys init --out site.key > site.key.id
    say "created this site's key site.key ($(cat site.key.id))"
fi
[ -f site.key.pub ] || { say "site.key.pub is missing (fl-client keys init writes it beside site.key)"; exit 2; }

# 2. The dataset root: what the coordinator approves, recomputed from the data each time.
DATA=$(sed -n 's/^dataset_dir *= *"\([^"]*\)".*$/\1/p' client.toml | head -n 1)
[ -n "$DATA" ] || { say "client.toml has no [data] dataset_dir"; exit 2; }
if [ ! -f "$DATA/fedseal-manifest.json" ]; then
    say "no prepared dataset in $DATA: run  $FL_CLIENT data prepare YOUR.csv $DATA --label COLUMN  first (README.txt step 2)"
    exit 2
fi
ATTEST=$("$FL_CLIENT" attest "$DATA") || { say "the dataset in $DATA does not attest (above)"; exit 1; }
ROOT=$(printf '%s\n' "$ATTEST" | awk '$1 == "root" { print $2 }')
[ -n "$ROOT" ] || { say "fl-client attest printed no root"; exit 1; }
if grep -q '^approved_root = "@PLACEHOLDER@"' client.toml; then
    sed "s/^approved_root = \"@PLACEHOLDER@\"/approved_root = \"$ROOT\"/" client.toml > client.toml.new
    mv client.toml.new client.toml
    say "wrote this dataset's root into client.toml ([data] approved_root)"
elif ! grep -q "^approved_root = \"$ROOT\"" client.toml; then
    say "the dataset's root differs from [data] approved_root in client.toml: send the request below; once approved, start with  sh start.sh --re-enrol"
fi

# 3. The enrolment request: send enrolment-request.txt to the coordinator (no secret in it).
{
    echo "fedseal enrolment request"
    echo "site          $SITE"
    if [ -f site.key.id ]; then
        echo "key id        $(awk '$1 == "key" && $2 == "id" { print $3 }' site.key.id)"
    fi
    echo "dataset root  $ROOT"
    echo ""
    echo "The coordinator confirms the key id with this site by phone, saves the public key"
    echo "below as $SITE.pub, and runs:"
    echo "  fl-server enroll --config $ENROLL_CONFIG --site $SITE --key $SITE.pub --dataset-root $ROOT"
    echo ""
    cat site.key.pub
} > enrolment-request.txt
cat enrolment-request.txt
say "send enrolment-request.txt to the coordinator@ROSTER_NOTE@"

if [ "${1:-}" = "--request" ]; then
    exit 0
fi
# 4. Join the federation: waits for the coordinator, trains when asked (Ctrl-C stops it).
exec "$FL_CLIENT" run --config client.toml "$@"
"""


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _start_sh(cfg: ServerConfig, site: str, inputs: _Inputs) -> str:
    roster_note = (
        " (and site.key.pub to the consortium's roster authority, who adds it to the roster)"
        if inputs.roster_json is not None
        else ""
    )
    return (
        _START_SH.replace("@SITE@", site)
        .replace("@CONFIG@", _sh_quote(str(cfg.path)))
        .replace("@VERSION@", _version())
        .replace("@PLACEHOLDER@", APPROVED_ROOT_PLACEHOLDER)
        .replace("@ROSTER_NOTE@", roster_note)
    )


def _site_readme(
    cfg: ServerConfig, site: str, host: str, inputs: _Inputs, now: datetime, port: int
) -> str:
    audit = _audit_address(cfg, host)
    roster = inputs.roster_json is not None
    lines = [
        f'fedseal start-up kit for site "{site}"',
        f"Made by the coordinator at {host} on {now:%Y-%m-%d %H:%M} UTC (fl-server provision).",
        "",
        "WHAT THIS IS",
        "  Everything this site needs to join the federation: its settings (client.toml), the",
        "  certificate authority of the coordinator's TLS certificate (ca.pem), the coordinator's",
        "  signing key (coordinator.pub)"
        + (", the consortium roster and its authority's key" if roster else "")
        + ", and start.sh.",
        "  There is no private key in this kit. start.sh creates this site's own key (site.key);",
        "  it never leaves this directory. Only its public half (site.key.pub) is sent.",
        "",
        "FIRST: CHECK THE KIT CAME FROM YOUR COORDINATOR",
        "  Ask the coordinator's operator, by phone or another channel than the one that brought",
        "  this kit, to read out these values, and compare:",
        f"    CA certificate SHA-256 fingerprint  {inputs.ca_fingerprint}",
        f"    coordinator key id                  {inputs.coordinator_key_id}",
    ]
    if roster:
        lines.append(f"    roster authority key id             {inputs.authority_key_id}")
    lines += [
        "  (openssl x509 -in ca.pem -noout -fingerprint -sha256 prints the first.)",
        "",
        "STEP 1. INSTALL",
        f"  Install fedseal {_version()} (the coordinator's version), so that fl-client is on PATH.",
        "",
        "STEP 2. PREPARE YOUR DATASET INTO data/",
        "    fl-client data prepare YOUR.csv data --label LABEL_COLUMN",
        "  (a .csv, .parquet or a directory of .parquet files; fl-client data prepare --help).",
        "  To keep it elsewhere, change [data] dataset_dir in client.toml.",
        "",
        "STEP 3. ASK TO BE ENROLLED",
        "    sh start.sh --request",
        "  creates this site's key if there is none, computes the dataset root (a fingerprint of",
        "  the prepared data: the coordinator approves exactly this dataset), writes it into",
        "  client.toml, and writes enrolment-request.txt. Send that file to the coordinator and",
        "  read the key id in it out to them by phone.",
    ]
    if roster:
        lines += [
            "  Send site.key.pub to the consortium's roster authority too: it adds this site to the",
            f"  consortium roster. Every new roster they send replaces {ROSTER_FILE} here.",
        ]
    else:
        lines += [
            "  This kit names no peers: before step 4 add [trust] (a consortium roster and its",
            "  authority's key) or [peers] to client.toml, or no secure round will be accepted.",
        ]
    lines += [
        "",
        "STEP 4. START",
        "  When the coordinator confirms the enrolment"
        + (f" (and you have the roster that lists this site as {ROSTER_FILE}):" if roster else ":"),
        "    sh start.sh",
        "  repeats the checks, then runs fl-client run --config client.toml: it waits for the",
        "  coordinator, and trains only when asked and only within this site's policy. Ctrl-C",
        "  stops it. Its state (privacy ledger, receipts) is kept in state/.",
        "",
        "NETWORK",
        f"  This site connects out to {_hostport(host, cfg.network.fleet_port)} (the coordinator's "
        "fleet port)" + (f" and {audit} (its audit service)." if audit else "."),
        f"  It opens no port to the outside; its local Runtime API listens on 127.0.0.1:{port}",
        "  ([runtime] port in client.toml: a local port, not the coordinator's; change it if it",
        "  is taken on this host, e.g. by another site's kit).",
        "",
        "POLICY",
        "  What this site accepts is decided here, in client.toml ([privacy], [limits]), never by",
        "  the coordinator. The defaults are the safe ones (secure rounds of at least 3 sites, no",
        "  plain training). See them with: fl-client policy show --config client.toml",
        "",
        "IF THE DATASET CHANGES",
        "  Prepare it again, run sh start.sh --request and send the new request; once the",
        "  coordinator approved the new root, start with: sh start.sh --re-enrol",
        "",
    ]
    return "\n".join(lines)


def _write_site_kit(
    kit: Path, cfg: ServerConfig, site: str, host: str, inputs: _Inputs, now: datetime, port: int
) -> None:
    kit.mkdir(mode=0o755)
    _write(kit / "client.toml", _client_toml(cfg, site, host, inputs, now, port))
    _write(kit / "ca.pem", inputs.ca_pem)
    _write(kit / "coordinator.pub", inputs.coordinator_pub_pem)
    if inputs.roster_json is not None and inputs.authority_pub_pem is not None:
        _write(kit / ROSTER_FILE, inputs.roster_json)
        _write(kit / AUTHORITY_FILE, inputs.authority_pub_pem)
    _write(kit / "start.sh", _start_sh(cfg, site, inputs), 0o755)
    _write(kit / "README.txt", _site_readme(cfg, site, host, inputs, now, port))


def _enroll_command(cfg: ServerConfig, site: str) -> str:
    return (
        f"fl-server enroll --config {_sh_quote(str(cfg.path))} --site {site} "
        f"--key {site}.pub --dataset-root <dataset root from {site}'s request>"
    )


def _write_coordinator_kit(
    kit: Path,
    cfg: ServerConfig,
    sites: list[str],
    host: str,
    inputs: _Inputs,
    notes: tuple[str, ...],
    now: datetime,
    out: Path,
) -> None:
    kit.mkdir(mode=0o755)
    config = _sh_quote(str(cfg.path))
    lines = [
        f"fedseal provisioning record: {len(sites)} site kit(s) for the coordinator at {host}",
        f"Made on {now:%Y-%m-%d %H:%M} UTC with fl-server provision --config {cfg.path}.",
        "",
        "1. SEND EACH SITE ITS KIT",
        f"  One directory per site beside this one: {', '.join(sites)}. A kit holds no secret;",
        "  send it by any channel, packed for example with",
        f"    tar czf {sites[0]}.tar.gz -C {_sh_quote(str(out))} {sites[0]}",
        "  Then read these values out to each site's operator by phone (or another channel), so",
        "  they can tell the kit was not changed on the way:",
        f"    CA certificate SHA-256 fingerprint  {inputs.ca_fingerprint}",
        f"    coordinator key id                  {inputs.coordinator_key_id}",
    ]
    if inputs.authority_key_id is not None:
        lines.append(f"    roster authority key id             {inputs.authority_key_id}")
    lines += [
        "",
        "2. WHAT COMES BACK",
        "  Each site runs `sh start.sh --request` and sends enrolment-request.txt: its name, its",
        "  key id, the root of its prepared dataset, and its public key (PEM). Confirm the key id",
        "  with the site by phone, save the PEM block as SITE.pub, and enrol it:",
        "",
    ]
    for site in sites:
        lines += [f"  {site}:", f"    {_enroll_command(cfg, site)}", ""]
    if inputs.roster_summary is not None:
        lines += [
            f"  Consortium roster (the kits pin {inputs.roster_summary}): the roster authority",
            "  adds each site's key, and gives the new roster to every site (it replaces",
            f"  {ROSTER_FILE} in their kit) and to this coordinator (server.toml [consortium]):",
        ]
        lines += [
            f"    fl-client roster add --roster ROSTER --authority-key AUTHORITY.key --site {s} "
            f"--key {s}.pub"
            for s in sites
        ]
        lines.append("")
    lines += [
        "3. RUN",
        f"    fl-server roster --config {config}    # every site enrolled",
        f"    fl-server run --config {config}",
        f"    fl-server status --config {config}    # sites online, their floors, the run",
        "",
    ]
    if notes:
        lines += ["NOTES", *(f"  - {n}" for n in notes), ""]
    _write(kit / "README.txt", "\n".join(lines) + "\n")
    doc = {
        "format": 1,
        "created_at": now.astimezone(UTC).isoformat(),
        "fedseal": _version(),
        "server_toml": str(cfg.path),
        "address": host,
        "superlink": _hostport(host, cfg.network.fleet_port),
        "audit_address": _audit_address(cfg, host),
        "ca_sha256": inputs.ca_fingerprint,
        "coordinator_key_id": inputs.coordinator_key_id,
        "roster_authority_key_id": inputs.authority_key_id,
        "roster": inputs.roster_summary,
        "sites": [
            {"site": s, "kit": s, "runtime_port": port, "enroll": _enroll_command(cfg, s)}
            for s, port in zip(sites, site_runtime_ports(cfg, len(sites)), strict=True)
        ],
        "notes": list(notes),
    }
    _write(kit / "kits.json", json.dumps(doc, indent=1) + "\n")
