"""``fl-client roster ...``: the consortium roster authority's tooling.

The roster authority key is the consortium's, not a site's and not the coordinator's: keep
its private key offline (governance), give every site its public key (``authority.key.pub``,
pinned in ``client.toml``) and the signed roster file.

    fl-client roster authority-init --out authority.key [--passphrase-env VAR]
    fl-client roster create --authority-key authority.key --consortium NAME --out roster.json \\
        [--site NAME=SITE.pub ...]
    fl-client roster add    --roster roster.json --authority-key authority.key --site NAME --key SITE.pub
    fl-client roster revoke --roster roster.json --authority-key authority.key --site NAME
    fl-client roster show   --roster roster.json --authority authority.key.pub [--json]

Exit codes: 0 success; 1 the roster was refused (malformed, edited by hand, not signed by
this authority); 2 bad usage (missing or unusable key file, bad site name, site already
there or not there).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedseal.protocol.consortium import ConsortiumRoster

__all__ = ["EXIT_REFUSED", "EXIT_USAGE", "register"]

EXIT_REFUSED = 1
EXIT_USAGE = 2

console = Console(stderr=True)

PASSPHRASE_OPT = typer.Option(
    "--passphrase-env", help="The authority key's passphrase is in this environment variable."
)
AUTHORITY_KEY_OPT = typer.Option(
    "--authority-key", help="The roster authority's private key (PEM, mode 0600)."
)


T = TypeVar("T")


def _fail(code: int, message: str) -> NoReturn:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _passphrase(env: str | None) -> bytes | None:
    if not env:
        return None
    value = os.environ.get(env)
    if not value:
        _fail(EXIT_USAGE, f"environment variable {env} is empty or unset")
    return value.encode()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _private_key(path: Path, passphrase_env: str | None) -> ec.EllipticCurvePrivateKey:
    from fedseal.crypto.keys import load_private_key

    return _read_key(path, "authority key", lambda p: load_private_key(p, _passphrase(passphrase_env)))


def _public_key_der(path: Path) -> bytes:
    from fedseal.crypto.keys import load_public_key, public_key_to_der

    return _read_key(path, "public key", lambda p: public_key_to_der(load_public_key(p)))


def _read_key(path: Path, what: str, load: Callable[[Path], T]) -> T:
    """``load(path)``, or exit 2 with a line saying why the key file cannot be used."""
    from fedseal.crypto.errors import KeyFormatError

    try:
        return load(path)
    except FileNotFoundError:
        _fail(EXIT_USAGE, f"{path}: {what} not found")
    except OSError as exc:
        _fail(EXIT_USAGE, f"{path}: cannot read: {exc.strerror or exc}")
    except KeyFormatError as exc:
        _fail(EXIT_USAGE, f"{path}: {exc}")


def _load_verified(roster_path: Path, authority: ec.EllipticCurvePublicKey) -> ConsortiumRoster:
    from fedseal.client.trust import TrustError, read_roster_file
    from fedseal.protocol.consortium import ConsortiumRosterError

    if not roster_path.exists():
        _fail(EXIT_USAGE, f"{roster_path}: roster not found")
    try:
        return read_roster_file(roster_path).verify(authority)
    except TrustError as exc:
        _fail(EXIT_REFUSED, f"refused: {exc}")
    except ConsortiumRosterError as exc:
        _fail(EXIT_REFUSED, f"refused: {roster_path}: {exc}")


def _save(roster: ConsortiumRoster, key: ec.EllipticCurvePrivateKey, out: Path) -> None:
    from fedseal.crypto.keys import write_atomic
    from fedseal.protocol.consortium import SignedConsortiumRoster

    text = SignedConsortiumRoster.sign(roster, key).to_json()
    try:
        write_atomic(out, text.encode("utf-8"), 0o644)
    except OSError as exc:
        _fail(EXIT_USAGE, f"{out}: cannot write: {exc.strerror or exc}")


def _edit(
    roster_path: Path,
    authority_key: Path,
    passphrase_env: str | None,
    change: str,
    site: str,
    public_key_der: bytes | None,
) -> None:
    from fedseal.protocol.consortium import RosterContentError, with_revoked, with_site

    key = _private_key(authority_key, passphrase_env)
    roster = _load_verified(roster_path, key.public_key())
    try:
        if public_key_der is not None:
            new = with_site(roster, site, public_key_der, _now_ms())
        else:
            new = with_revoked(roster, site, _now_ms())
    except RosterContentError as exc:
        _fail(EXIT_USAGE, str(exc))
    _save(new, key, roster_path)
    entry = new.site(site)
    kid = entry.key_id.hex() if entry is not None else "?"
    typer.echo(f"version {new.version}")
    console.print(
        f"{change} {site} (key id {kid}); wrote {roster_path} version "
        f"{new.version}: give it to every site",
        highlight=False,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    roster_app = typer.Typer(
        help="The consortium roster: sites and keys, signed by the offline roster authority.",
        no_args_is_help=True,
    )

    @roster_app.command("authority-init")
    def authority_init(
        out: Annotated[
            Path, typer.Option(help="Authority private key path (PEM PKCS8, mode 0600).")
        ] = Path("authority.key"),
        passphrase_env: Annotated[str | None, PASSPHRASE_OPT] = None,
        force: Annotated[bool, typer.Option(help="Overwrite an existing key.")] = False,
    ) -> None:
        """Create the roster authority key (OUT, 0600) and its public key (OUT.pub)."""
        from fedseal.crypto.keys import (
            generate_identity_key,
            key_id,
            save_private_key,
            save_public_key,
        )

        if out.exists() and not force:
            _fail(EXIT_USAGE, f"{out} exists (use --force to replace it)")
        passphrase = _passphrase(passphrase_env)
        key = generate_identity_key()
        pub = out.with_name(out.name + ".pub")
        try:
            save_private_key(key, out, passphrase)
            save_public_key(key.public_key(), pub)
        except OSError as exc:
            _fail(EXIT_USAGE, f"cannot write the authority key: {exc.strerror or exc}")
        typer.echo(f"authority key id {bytes(key_id(key.public_key())).hex()}")
        console.print(
            f"wrote {out} (0600) and {pub}. Keep {out} OFFLINE, away from the coordinator "
            f"(it must never hold it); give {pub} to every site to pin in client.toml.",
            highlight=False,
            markup=False,
        )

    @roster_app.command("create")
    def create(
        authority_key: Annotated[Path, AUTHORITY_KEY_OPT],
        consortium: Annotated[str, typer.Option(help="The consortium's name.")],
        out: Annotated[Path, typer.Option(help="Roster file to write.")] = Path("roster.json"),
        site: Annotated[
            list[str] | None,
            typer.Option("--site", help="NAME=SITE.pub: a site and its public key (repeatable)."),
        ] = None,
        passphrase_env: Annotated[str | None, PASSPHRASE_OPT] = None,
        force: Annotated[bool, typer.Option(help="Overwrite an existing roster file.")] = False,
    ) -> None:
        """Create version 1 of a consortium roster, signed by the authority key."""
        from fedseal.protocol.consortium import ConsortiumRoster, ConsortiumSite, RosterContentError

        if out.exists() and not force:
            _fail(
                EXIT_USAGE,
                f"{out} exists (use add/revoke to edit it; --force starts again at version 1, "
                "which sites that saw a later version refuse)",
            )
        entries: list[tuple[str, Path]] = []
        for spec in site or []:
            name, sep, pem = spec.partition("=")
            if not sep or not name or not pem:
                _fail(EXIT_USAGE, f"--site {spec!r}: expected NAME=PUBLIC_KEY.pem")
            entries.append((name, Path(pem)))
        key = _private_key(authority_key, passphrase_env)
        try:
            roster = ConsortiumRoster(
                consortium,
                1,
                _now_ms(),
                tuple(ConsortiumSite(name, _public_key_der(pem), True) for name, pem in entries),
            )
        except RosterContentError as exc:
            _fail(EXIT_USAGE, str(exc))
        _save(roster, key, out)
        typer.echo("version 1")
        console.print(
            f"wrote {out}: consortium {consortium!r}, {len(roster.sites)} site(s), version 1",
            highlight=False,
            markup=False,
        )

    @roster_app.command("add")
    def add(
        roster: Annotated[Path, typer.Option(help="Roster file (rewritten in place).")],
        authority_key: Annotated[Path, AUTHORITY_KEY_OPT],
        site: Annotated[str, typer.Option(help="The site's name.")],
        key: Annotated[Path, typer.Option(help="The site's public key (PEM, SITE.key.pub).")],
        passphrase_env: Annotated[str | None, PASSPHRASE_OPT] = None,
    ) -> None:
        """Add a site (or re-add a revoked one with a new key); re-sign as version + 1."""
        _edit(roster, authority_key, passphrase_env, "added", site, _public_key_der(key))

    @roster_app.command("revoke")
    def revoke(
        roster: Annotated[Path, typer.Option(help="Roster file (rewritten in place).")],
        authority_key: Annotated[Path, AUTHORITY_KEY_OPT],
        site: Annotated[str, typer.Option(help="The site to revoke.")],
        passphrase_env: Annotated[str | None, PASSPHRASE_OPT] = None,
    ) -> None:
        """Revoke a site (it stays listed, inactive); re-sign as version + 1."""
        _edit(roster, authority_key, passphrase_env, "revoked", site, None)

    @roster_app.command("show")
    def show(
        roster: Annotated[Path, typer.Option(help="Roster file.")],
        authority: Annotated[
            Path, typer.Option(help="The roster authority's public key (PEM) to verify with.")
        ],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    ) -> None:
        """Verify a roster under the authority's public key and print it."""
        from fedseal.crypto.errors import KeyFormatError
        from fedseal.crypto.keys import key_id, load_public_key
        from fedseal.protocol.consortium import format_time_ms

        try:
            authority_key = load_public_key(authority)
        except FileNotFoundError:
            _fail(EXIT_USAGE, f"{authority}: authority public key not found")
        except OSError as exc:
            _fail(EXIT_USAGE, f"{authority}: cannot read: {exc.strerror or exc}")
        except KeyFormatError as exc:
            _fail(EXIT_USAGE, f"{authority}: {exc}")
        verified = _load_verified(roster, authority_key)
        doc = {
            "consortium": verified.consortium,
            "version": verified.version,
            "issued_at_ms": verified.issued_at_ms,
            "issued_at": format_time_ms(verified.issued_at_ms),
            "authority_key_id": bytes(key_id(authority_key)).hex(),
            "sites": [
                {"site": s.site, "key_id": s.key_id.hex(), "status": s.status}
                for s in verified.sites
            ],
        }
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        typer.echo(f"consortium   {verified.consortium}")
        typer.echo(f"version      {verified.version}")
        typer.echo(f"issued       {doc['issued_at']}")
        typer.echo(f"authority    {doc['authority_key_id']}")
        typer.echo(f"sites        {len(verified.sites)}")
        width = max((len(s.site) for s in verified.sites), default=4)
        for s in verified.sites:
            typer.echo(f"  {s.site:<{width}}  {s.key_id.hex()}  {s.status}")
        console.print(f"{roster}: signature verified", highlight=False, markup=False)

    app.add_typer(roster_app, name="roster")
