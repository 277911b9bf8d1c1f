"""What rounds the online sites accept, asked at a run's start: refuse a run no site would join.

Every site checks every round against its own policy and refuses what breaks it; a coordinator
configured against those policies (a two-site pilot on the defaults: ``run.min_sites = 2``, each
site's ``[privacy] min_cohort = 3``) used to run round after round that every site refused,
"sites 0/2", the reasons in the sites' logs. At the start the coordinator now asks each online
site its floor (``query.policy``: min_cohort, allow_plain, dp required) and refuses to start,
in one line naming the setting on both sides and why it exists, when fewer than
``run.min_sites`` sites would take part::

    floors = ask_floors(run, nodes)                 # {site: SiteFloor}, sites that answered
    problem = refusal(cfg, floors, online=len(nodes))
    if problem: raise CoordinatorError(problem)

A site that does not answer (an older build, a timeout) is not counted against the run: it
still decides for itself in every round.

A run with a data contract (``[run] contract``) is refused first when a site reports that its
dataset was prepared under another contract or none (:func:`contract_refusal`: one line naming
each such site and both digests); every site also refuses a signed setup naming a contract its
dataset does not follow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedseal.crypto.keys import write_atomic
from fedseal.protocol import records
from fedseal.protocol.types import site_sort_key
from fedseal.server.config import ServerConfig

if TYPE_CHECKING:  # Flower only where a run asks (fl-server's own checks import this module)
    from fedseal.server.rundir import Run

__all__ = [
    "FLOORS_FILE",
    "FLOOR_TIMEOUT_S",
    "SiteFloor",
    "ask_floors",
    "contract_refusal",
    "enrolment_refusal",
    "read_floors",
    "refusal",
    "write_floors",
]

FLOORS_FILE = "site-floors.json"
"""In the state directory: the floors the online sites reported at the last run's start
(``fl-server status`` shows them)."""

log = logging.getLogger("fedseal.server")

FLOOR_TIMEOUT_S = 30.0
"""Longest wait for the sites' floors (capped by ``run.stage_timeout_s``)."""


@dataclass(frozen=True, slots=True)
class SiteFloor:
    """One site's floor as it reported it (``client.toml [privacy]``), and the data contract
    its dataset was prepared under: a digest in hex, ``""`` for none, ``None`` when the site
    did not say (an older build: it is not held against the run)."""

    min_cohort: int
    allow_plain: bool
    dp_required: bool
    contract: str | None = None


def ask_floors(run: Run, nodes: list[int], answered: set[str] | None = None) -> dict[str, SiteFloor]:
    """Ask every node in ``nodes`` for its floor; the sites that answered with a valid one.
    ``answered`` (if given) gets every site that answered at all (a node listed online that
    does not answer, e.g. one just stopped, is not counted as online)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedseal.server.exchange import exchange

    msgs = [
        Message(RecordDict({records.CONFIG_RECORD: ConfigRecord({})}), dst_node_id=n,
                message_type=records.message_type("query", records.POLICY))
        for n in nodes
    ]  # fmt: skip
    floors: dict[str, SiteFloor] = {}
    for reply in exchange(run.grid, msgs, min(FLOOR_TIMEOUT_S, run.cfg.run.stage_timeout_s)):
        site = run.site_of(reply.metadata.src_node_id)
        if answered is not None:
            answered.add(site)
        rec = None if reply.has_error() else reply.content.get(records.POLICY_RECORD)
        values = dict(rec) if isinstance(rec, ConfigRecord) else {}
        cohort, plain, dp = (values.get(k) for k in (records.MIN_COHORT, records.ALLOW_PLAIN, records.DP_REQUIRED))
        if not (isinstance(cohort, int) and isinstance(plain, int) and isinstance(dp, int)):
            log.info("site %s reported no policy floor; it decides per round", site)
            continue
        contract = values.get(records.CONTRACT)
        floors[site] = SiteFloor(
            cohort, bool(plain), bool(dp), _contract_hex(contract)
        )
    return floors


def write_floors(state_dir: Path, floors: Mapping[str, SiteFloor], *, now: float) -> None:
    """Record the floors the sites reported (atomically; ``asked_at``: Unix seconds)."""
    doc = {"asked_at": now, "sites": {site: dataclasses.asdict(f) for site, f in sorted(floors.items())}}
    write_atomic(state_dir / FLOORS_FILE, json.dumps(doc, indent=1).encode())


def read_floors(state_dir: Path) -> tuple[float | None, dict[str, SiteFloor]]:
    """The floors :func:`write_floors` recorded (``(None, {})`` if none or unreadable)."""
    try:
        doc = json.loads((state_dir / FLOORS_FILE).read_text())
        return float(doc["asked_at"]), {s: SiteFloor(**f) for s, f in doc["sites"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}


_TWO_SITES = "with two sites each learns the other's update from the sum"


def enrolment_refusal(cfg: ServerConfig, enrolled: int) -> str | None:
    """Why a run cannot start with ``enrolled`` active sites (one line), or ``None``."""
    if enrolled >= cfg.run.min_sites:
        return None
    why = f": a secure round needs 3 ({_TWO_SITES})" if cfg.run.secure and enrolled < 3 else ""
    return (
        f"run.min_sites = {cfg.run.min_sites} in {cfg.path.name}, but only {enrolled} sites are "
        f"enrolled and not revoked (fl-server roster): enrol more sites{why}"
    )


def _names(sites: list[str]) -> str:
    return ", ".join(sorted(sites, key=site_sort_key))


_HEX64 = frozenset("0123456789abcdef")


def _contract_hex(value: object) -> str | None:
    """A site's reported contract digest: ``""`` (none) or 64 hex characters; anything else
    (a site's text is untrusted: found by review, escape codes reached the console) counts as
    not said."""
    if not isinstance(value, str):
        return None
    value = value.lower()
    return value if value == "" or (len(value) == 64 and set(value) <= _HEX64) else None


def contract_refusal(cfg: ServerConfig, floors: Mapping[str, SiteFloor]) -> str | None:
    """Why a run with a data contract cannot start: the sites whose dataset was prepared under
    another contract or none (one line naming each site and both digests), or ``None``.

    A run without ``[run] contract`` is never refused here; nor is a site that did not report
    its contract (it still checks the digest signed into every setup, if it has one).
    """
    if not cfg.run.contract_digest:
        return None
    want = cfg.run.contract_digest.hex()
    wrong = {
        site: floor.contract
        for site, floor in floors.items()
        if floor.contract is not None and floor.contract != want
    }
    if not wrong:
        return None
    where = cfg.run.contract.name if cfg.run.contract is not None else "the run's contract"
    each = "; ".join(
        f"{site}'s dataset was prepared under {'contract ' + got if got else 'no contract'}"
        for site, got in sorted(wrong.items(), key=lambda item: site_sort_key(item[0]))
    )
    return (
        f"data contract mismatch: run.contract = {where} in {cfg.path.name} has digest {want}, "
        f"but {each} (re-run `fl-client data prepare SRC OUT --contract {where}` at "
        f"{'that site' if len(wrong) == 1 else 'those sites'} and re-enrol the new root)"
    )


def refusal(cfg: ServerConfig, floors: Mapping[str, SiteFloor], *, online: int) -> str | None:
    """Why no round of this run could gather ``run.min_sites`` willing sites among the
    ``online`` ones (one line naming the settings on both sides), or ``None``.

    Sites that did not report a floor count as willing (they decide per round). In a run with
    a data contract a site whose dataset follows another counts as unwilling (it refuses every
    setup); the refusal then names it and both digests (:func:`contract_refusal`).
    """
    mismatch = contract_refusal(cfg, floors)
    want = cfg.run.contract_digest.hex()
    unwilling: dict[str, str] = {}
    cohort_sites: list[str] = []
    plain_sites: list[str] = []
    dp_sites: list[str] = []
    for site, floor in floors.items():
        if want and floor.contract is not None and floor.contract != want:
            unwilling[site] = "contract"  # it refuses every setup of this run (counted, named)
        elif cfg.run.secure and floor.min_cohort > online:
            cohort_sites.append(site)
            unwilling[site] = "cohort"
        elif not cfg.run.secure and not floor.allow_plain:
            plain_sites.append(site)
            unwilling[site] = "plain"
        elif floor.dp_required and not cfg.dp.enabled:
            dp_sites.append(site)
            unwilling[site] = "dp"
    willing = online - len(unwilling)
    if willing >= cfg.run.min_sites:
        return None
    why: list[str] = [mismatch] if mismatch is not None else []
    if cohort_sites:
        least = min(floors[s].min_cohort for s in cohort_sites)
        why.append(
            f"{_names(cohort_sites)} join only secure rounds of at least {least} sites ([privacy] "
            f"min_cohort in client.toml; {_TWO_SITES})"
        )
    if plain_sites:
        why.append(
            f"{_names(plain_sites)} refuse plain training ([privacy] allow_plain = false in "
            "client.toml: it sends their weights in the clear), and run.secure = false"
        )
    if dp_sites:
        why.append(
            f"{_names(dp_sites)} require distributed DP ([privacy] dp = \"required\" in "
            "client.toml), and [dp] is not enabled"
        )
    return (
        f"no round can run: {willing} of {online} online sites would join (run.min_sites = "
        f"{cfg.run.min_sites} in {cfg.path.name}): " + "; ".join(why)
    )
