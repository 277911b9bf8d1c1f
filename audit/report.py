"""What ``fl-audit show``, ``report`` and ``export`` present: a lenient view of a log (decoded
without verdict), the self-contained HTML report with hand-made SVG plots, and JSON lines.

The report is the record of processing of the runs in a log, written for a data-protection
officer: who took part with which dataset version, when, under which round parameters and
privacy budget, what was produced, and what was refused or rejected and why. Each section says
which signed entries it is read from; the last one says what the log does not record.

A view checks nothing (``fl-audit verify`` does): entries that do not decode are listed, and
only the entries a signed tree head covers are shown. Every string from the log (site ids,
reasons, names) is untrusted and reaches the page only through :func:`html.escape`; the page
has no scripts and loads nothing (inline CSS and SVG).
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import enum
import hashlib
import html
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import (
    INPUT_MESSAGE_TYPE,
    AuditEntry,
    Checkpoint,
    ConsortiumRosterRecord,
    DpRound,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RosterAction,
    RosterChange,
    RoundRecord,
    RunEnd,
    RunStart,
)
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.witness import WitnessResult
from fedseal.protocol.config import Limits
from fedseal.protocol.dp import DpParams
from fedseal.protocol.errors import ProtocolError
from fedseal.protocol.messages import RoundSetup, decode_payload
from fedseal.protocol.types import MessageKind

__all__ = [
    "ReportView",
    "collect_view",
    "dp_guarantee",
    "dp_lines",
    "dp_series",
    "export_lines",
    "format_metric",
    "render_report",
    "unsigned_note",
]

_SETUP_TYPE = MessageKind.ROUND_SETUP.type_name
_LIMITS = Limits()
_HEATMAP_MAX_SITES = 250
"""Sites drawn one row each in the participation chart; beyond it only the sites that missed a
round are drawn (the sites table lists every site)."""
_HISTORY_ROWS = 30
"""Roster changes listed in full; beyond it the enrolments fold away (one click shows them)."""
_DETAIL_ROWS = 2000
"""Rejected envelopes listed one by one; the rest are counted (``fl-audit export`` has all)."""

# A site's part in one round, as the participation chart and the sites table show it.
IN_SUM, ACCEPTED, REJECTED, ABSENT = "in-sum", "accepted", "rejected", "absent"
_STATE_WORDS = {
    IN_SUM: "masked input accepted and in the round's sum",
    ACCEPTED: "masked input accepted, but the round failed or the site is not in its sum",
    REJECTED: "rejected",
    ABSENT: "expected (in the round's cohort), sent no masked input",
}
_STATE_COLOR = {IN_SUM: "#2ca02c", ACCEPTED: "#98df8a", REJECTED: "#d62728", ABSENT: "#ff9f1c"}


@dataclass
class _SetupView:
    """A round's signed setup (its last attempt): the parameters every site of it signed for."""

    attempts: int
    cohort: tuple[str, ...]
    threshold: int
    min_survivors: int
    clip: float
    dp: bool
    noise_multiplier: float = 0.0  # DP rounds: central noise over the sensitivity (z)
    colluders: int = 0  # DP rounds: colluding sites the noise is calibrated against


@dataclass
class _RoundView:
    run: str
    round: int
    index: int
    status: str
    survivors: tuple[str, ...]
    metrics: dict[str, float]  # the round result's (training metrics, not an evaluation)
    new_model: str
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the evaluation entry's only
    eval_examples: int | None = None  # from the round's evaluation entry, if logged
    eval_sites: tuple[str, ...] = ()
    dp_rho: float | None = None  # the round's DP accounting entry, if logged (as claimed)
    dp_epsilon: float | None = None
    run_no: int = 0  # 1, 2, … in log order
    reason: str = ""  # why a failed round failed
    signed_ms: int | None = None  # timestamp of the first signed tree head covering the result
    setup: _SetupView | None = None
    expected: tuple[str, ...] = ()  # the setup's cohort, else the sites enrolled at the time
    absent: dict[str, str] = field(default_factory=dict)  # site -> why, as the result logs it


@dataclass
class _RunView:
    number: int
    run_id: str  # hex
    index: int  # its run-start entry
    config_digest: str
    roster_digest: str
    initial_model: str
    code_version: str
    started_ms: int
    planned_rounds: int
    dp_budget: tuple[float, float] | None
    settings: str = ""  # the declared run settings (canonical JSON), "" in older logs
    status: str = "open"
    ended_ms: int | None = None
    end_reason: str = ""
    final_round: int | None = None
    final_model: str = ""

    @property
    def short(self) -> str:
        return self.run_id[:8]


@dataclass
class _RosterEvent:
    index: int
    at_ms: int
    site: str
    action: str  # "enrol", "set-roots", "revoke", "withdraw-root"
    roots: tuple[str, ...]  # the site's approved roots after the change (hex)
    reason: str
    key_id: str = ""  # enrolments: SHA-256 of the site's public key (hex)
    withdrawn: tuple[str, ...] = ()  # root withdrawals: the roots withdrawn (hex)


@dataclass
class _ConsortiumView:
    index: int
    run: str  # the run open when it was logged ("" between runs)
    consortium: str
    version: int
    sites: int  # active sites
    revoked: int
    digest: str
    authority_key_id: str
    at_ms: int = 0


@dataclass
class _Checkpoint:
    run: str
    round: int
    name: str
    model: str
    file: str


@dataclass
class ReportView:
    entries: int = 0  # shown: those the latest signed tree head covers
    total: int = 0  # in the file, signed or not
    undecodable: list[int] = field(default_factory=list)
    genesis: Genesis | None = None
    rounds: list[_RoundView] = field(default_factory=list)
    runs: list[_RunView] = field(default_factory=list)
    roster: dict[str, str] = field(default_factory=dict)  # site -> its latest roster action
    roster_events: list[_RosterEvent] = field(default_factory=list)
    rejections: list[tuple[int, str, int, str, str, str]] = field(default_factory=list)
    # (site, (run number, round)) -> "accepted" / "rejected": its masked input
    inputs: dict[tuple[str, tuple[int, int]], str] = field(default_factory=dict)
    # (site, (run number, round)) -> the dataset root its masked input named (hex)
    input_roots: dict[tuple[str, tuple[int, int]], str] = field(default_factory=dict)
    # (site, (run number, round)) -> the first rejection of its envelopes ("stage: reason")
    site_rejections: dict[tuple[str, tuple[int, int]], str] = field(default_factory=dict)
    checkpoints: list[_Checkpoint] = field(default_factory=list)
    tree_heads: list[tuple[int, int, str, int]] = field(default_factory=list)
    consortium: list[_ConsortiumView] = field(default_factory=list)
    # run (first 8 hex) -> (DP rounds logged, epsilon so far, delta, target epsilon): DP runs
    dp: dict[str, tuple[int, float, float, float]] = field(default_factory=dict)


def _noise_multiplier(dp: DpParams) -> float:
    """The central noise multiplier ``z`` the honest survivors' shares reach (the inverse of
    :meth:`DpParams.from_noise_multiplier`)."""
    return float(dp.local_stddev * dp.gamma * math.sqrt(dp.honest_survivors) / dp.clip)


def _setup_view(e: EnvelopeRecord, attempts: int) -> _SetupView | None:
    """The round parameters of an accepted round-setup envelope (None: it does not decode;
    ``fl-audit verify`` names that)."""
    try:
        setup = decode_payload(MessageKind.ROUND_SETUP, e.payload, _LIMITS)
    except ProtocolError:
        return None
    if not isinstance(setup, RoundSetup):  # pragma: no cover - decode_payload's contract
        return None
    p, dp = setup.params, setup.params.dp
    return _SetupView(
        attempts,
        tuple(str(m.site) for m in setup.cohort),
        p.threshold,
        p.min_survivors,
        dp.clip if dp is not None else p.quantization.clip_micros / 1e6,
        dp is not None,
        _noise_multiplier(dp) if dp is not None else 0.0,
        dp.colluding_sites if dp is not None else 0,
    )


def collect_view(store: MerkleLogStore, signed: int | None = None) -> ReportView:
    """The entries ``[0, signed)`` (default: those the largest stored signed tree head covers),
    decoded leniently; entries after them are signed by nobody and only counted."""
    view = ReportView()
    for head in store.tree_heads():
        try:  # the signed values, not the table's unsigned copies of them
            sth = SignedTreeHead.from_bytes(head.blob)
            view.tree_heads.append((head.seq, sth.tree_size, sth.root_hash.hex(), sth.timestamp_ms))
        except ProtocolError:
            view.tree_heads.append((head.seq, -1, "undecodable", -1))
    if signed is None:
        signed = max((size for _, size, _, _ in view.tree_heads), default=0)
    view.total = store.size
    run: _RunView | None = None
    current = ""  # the open run's first 8 hex ("" between runs)
    approved: dict[str, tuple[str, ...]] = {}
    active: set[str] = set()
    setups: dict[tuple[int, int], _SetupView] = {}
    attempts: Counter[tuple[int, int]] = Counter()
    for stored in store.iter_entries(0, min(signed, view.total)):
        view.entries += 1
        try:
            entry = decode_entry(stored.data)
        except ProtocolError:
            view.undecodable.append(stored.index)
            continue
        run_no = len(view.runs)
        if isinstance(entry, Genesis):
            view.genesis = entry
        elif isinstance(entry, RosterChange):
            action = entry.action.name.lower().replace("_", "-")
            named = tuple(r.hex() for r in entry.approved_roots)
            withdrawn: tuple[str, ...] = ()
            if action == "withdraw-root":  # the entry names the roots withdrawn
                withdrawn = named
                roots = tuple(r for r in approved.get(entry.site, ()) if r not in named)
            else:
                view.roster[entry.site] = entry.action.name.lower()
                roots = () if entry.action is RosterAction.REVOKE else named
                if entry.action is RosterAction.REVOKE:
                    active.discard(entry.site)
                else:
                    active.add(entry.site)
            approved[entry.site] = roots
            key = hashlib.sha256(entry.public_key_der).hexdigest() if entry.public_key_der else ""
            view.roster_events.append(
                _RosterEvent(
                    stored.index, entry.at_ms, entry.site, action, roots, entry.reason, key,
                    withdrawn,
                )
            )  # fmt: skip
        elif isinstance(entry, RunStart):
            current = entry.run_id.hex()[:8]
            run = _RunView(
                run_no + 1, entry.run_id.hex(), stored.index, entry.config_digest.hex(),
                entry.roster_digest.hex(), entry.initial_model_digest.hex(), entry.code_version,
                entry.started_at_ms, entry.planned_rounds, entry.dp_budget, entry.settings,
            )  # fmt: skip
            view.runs.append(run)
            if entry.dp_budget is not None:
                target, delta = entry.dp_budget
                view.dp[current] = (0, 0.0, delta, target)
        elif isinstance(entry, DpRound):
            for r in reversed(view.rounds):
                if r.run == current and r.round == entry.round:
                    r.dp_rho, r.dp_epsilon = entry.rho, entry.epsilon_so_far
                    break
            rounds, _, _, target = view.dp.get(current, (0, 0.0, entry.delta, 0.0))
            view.dp[current] = (rounds + 1, entry.epsilon_so_far, entry.delta, target)
        elif isinstance(entry, EnvelopeRecord):
            col = (run_no, entry.round)
            if entry.message_type == _SETUP_TYPE and entry.accepted and not entry.site:
                attempts[col] += 1
                setup = _setup_view(entry, attempts[col])
                if setup is not None:
                    setups[col] = setup
                continue
            is_input = entry.message_type == INPUT_MESSAGE_TYPE
            if is_input and entry.dataset_root is not None:
                view.input_roots[(entry.site, col)] = entry.dataset_root.hex()
            if entry.accepted:
                if is_input:
                    view.inputs[(entry.site, col)] = "accepted"
            else:
                view.rejections.append(
                    (stored.index, f"{current}/{entry.round}", entry.round, entry.site,
                     entry.stage, entry.reason)
                )  # fmt: skip
                view.site_rejections.setdefault((entry.site, col), f"{entry.stage}: {entry.reason}")
                if is_input:
                    view.inputs.setdefault((entry.site, col), "rejected")
        elif isinstance(entry, RoundRecord):
            setup = setups.get((run_no, entry.round))
            view.rounds.append(
                _RoundView(
                    current,
                    entry.round,
                    stored.index,
                    entry.status.name.lower(),
                    entry.survivors,
                    entry.metric_values,
                    entry.new_model_digest.hex(),
                    run_no=run_no,
                    reason=entry.reason,
                    setup=setup,
                    expected=setup.cohort if setup is not None else tuple(sorted(active)),
                    absent=dict(entry.absent),
                )
            )
        elif isinstance(entry, Checkpoint):
            view.checkpoints.append(
                _Checkpoint(
                    current, entry.round, entry.name, entry.model_digest.hex(),
                    entry.file_digest.hex(),
                )
            )  # fmt: skip
        elif isinstance(entry, Evaluation):
            for r in reversed(view.rounds):
                if r.run == current and r.round == entry.round:
                    r.eval_metrics = entry.metric_values
                    r.eval_examples = entry.num_examples
                    r.eval_sites = entry.sites
                    break
        elif isinstance(entry, RunEnd):
            if run is not None:
                run.status = entry.status.name.lower()
                run.ended_ms = entry.ended_at_ms
                run.end_reason = entry.reason
                run.final_round = entry.final_round
                run.final_model = entry.final_model_digest.hex()
            run, current = None, ""
        elif isinstance(entry, ConsortiumRosterRecord):
            roster = entry.roster
            n_active = sum(1 for s in roster.sites if s.active)
            view.consortium.append(
                _ConsortiumView(
                    stored.index, current, entry.consortium, entry.version, n_active,
                    len(roster.sites) - n_active, entry.roster_digest.hex(),
                    entry.authority_key_id.hex(), entry.at_ms,
                )
            )  # fmt: skip
    _stamp_rounds(view)
    return view


def _stamp_rounds(view: ReportView) -> None:
    """Give each round the timestamp of the first signed tree head that covers its result."""
    heads = sorted((size, ts) for _, size, _, ts in view.tree_heads if size > 0)
    sizes = [size for size, _ in heads]
    for r in view.rounds:
        i = bisect.bisect_right(sizes, r.index)
        if i < len(heads):
            r.signed_ms = heads[i][1]


def dp_guarantee(epsilon: float, delta: float, rounds: int) -> str:
    """The DP guarantee of a run's released sums in plain words."""
    return (
        f"site-level (ε, δ)-DP for the released sums: ε = {epsilon:.3g} at δ = {delta:g} "
        f"after {rounds} round{'' if rounds == 1 else 's'}"
    )


def dp_lines(view: ReportView) -> list[str]:
    """Per DP run: its guarantee, then ε after each round (as the coordinator logged them;
    ``fl-audit verify`` recomputes them)."""
    lines: list[str] = []
    for run, (rounds, eps, delta, target) in view.dp.items():
        budget = f" (budget ε = {target:g})" if target else ""
        lines.append(f"run {run}: {dp_guarantee(eps, delta, rounds)}{budget}")
        lines.extend(
            f"  round {r.round}: ρ = {r.dp_rho:.4g}, ε so far = {r.dp_epsilon:.4g}"
            for r in view.rounds
            if r.run == run and r.dp_rho is not None and r.dp_epsilon is not None
        )
    return lines


DP_PROTECTS = (
    "What it protects: whether any one site took part with its data, or what its update was, "
    "cannot be told apart from the released sums (and every model, metric or file computed "
    "from them alone) beyond the factor e^ε, except with probability δ; each record of a site "
    "is protected at least as well. It assumes at most the colluding sites the round's "
    "parameters allow for (their noise is discounted) and honest sites that add their noise."
)
DP_DOES_NOT = (
    "What it does not protect: anything released outside the noisy sums (that a site took "
    "part, the survivor lists, dataset roots, timings, the evaluation metrics below), other "
    "runs over the same sites (ε is per run), facts about the population the model is meant to "
    "learn, or against poisoning by a site."
)


def dp_series(
    view: ReportView, run: str
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Per round of ``run`` (first 8 hex): the ε spent so far, from its DP accounting entries
    (failed rounds whose noisy sum was unmasked included), and the evaluated accuracy."""
    eps = [(r.round, r.dp_epsilon) for r in view.rounds if r.run == run and r.dp_epsilon]
    acc = [
        (r.round, r.eval_metrics["accuracy"])
        for r in view.rounds
        if r.run == run and "accuracy" in r.eval_metrics
    ]
    return eps, acc


def _dp_plots(view: ReportView) -> str:
    """Per DP run: ε spent and accuracy per round, two small plots side by side."""
    parts = []
    for run, (_, _, delta, target) in view.dp.items():
        eps, acc = dp_series(view, run)
        eps_series = {"ε so far": eps}
        if target and eps:
            eps_series["budget ε"] = [(eps[0][0], target), (eps[-1][0], target)]
        parts.append(
            f"<p>run {html.escape(run)}: ε spent (δ = {delta:g}) and accuracy per round</p>"
            '<div style="display:flex;gap:8px;flex-wrap:wrap">'
            + _svg_lines(eps_series, f"run {run}: epsilon spent per round", width=480)
            + _svg_lines({"accuracy": acc}, f"run {run}: accuracy per round", width=480)
            + "</div>"
        )
    return "".join(parts)


def unsigned_note(view: ReportView) -> str:
    if view.total <= view.entries:
        return ""
    return (
        f"entries {view.entries}..{view.total - 1} ({view.total - view.entries}) follow the last "
        "signed tree head: UNSIGNED (anyone who can write the file can append them), not shown"
    )


def format_metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# -- small formatting helpers -------------------------------------------------------------------


def _e(text: object) -> str:
    """Untrusted text, escaped for HTML content and attribute values alike."""
    return html.escape(str(text), quote=True)


def _when(ms: int | None) -> str:
    """A log timestamp (ms since the epoch) in UTC; "—" when the entry holds none."""
    if not ms or ms <= 0:
        return "—"
    try:
        stamp = datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"
    return f'<span class="n">{stamp}</span>'


def _duration(start: int | None, end: int | None) -> str:
    if not start or not end or end < start:
        return "—"
    s = (end - start) // 1000
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s" if m else f"{sec} s"


def _digest(hex_digest: str, n: int = 12) -> str:
    """A digest shortened for a table, the full value in its tooltip."""
    if not hex_digest:
        return "—"
    more = "…" if n < len(hex_digest) else ""
    return f'<code title="{_e(hex_digest)}">{_e(hex_digest[:n])}{more}</code>'


def _ranges(numbers: Iterable[int]) -> str:
    """1, 2, 3, 5, 7, 8 -> "1–3, 5, 7–8"."""
    out: list[str] = []
    nums = sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}–{nums[j]}")
        i = j + 1
    return ", ".join(out)


def _rounds_text(cols: Iterable[tuple[int, int]], many_runs: bool) -> str:
    """Rounds as ranges, per run when the log holds several."""
    by_run: dict[int, list[int]] = defaultdict(list)
    for run_no, rnd in cols:
        by_run[run_no].append(rnd)
    if not many_runs:
        return _ranges(r for rounds in by_run.values() for r in rounds)
    return "; ".join(f"run {n}: {_ranges(rs)}" for n, rs in sorted(by_run.items()))


_HEX_RUN = re.compile(r"[0-9a-f]{12,}")


def _reason_kind(reason: str) -> str:
    """A rejection reason with digests cut, so reasons that differ only by them group."""
    return _HEX_RUN.sub("…", reason).strip() or "(no reason given)"


_NO_REASON_LOGGED = "sent nothing (no reason logged)"
_KIND_CHARS = 60


def _why_missing(cell: _Cell) -> tuple[str, str]:
    """``(kind, reason)`` of a site that is not in a round's sum: the reason as logged (digests
    cut), and its kind (the part before the first colon: ``refused``, ``error``, ``rejected at
    masked-input``, ``dropped at advertise``, …) to count like reasons together."""
    if cell.state == ACCEPTED:
        return "accepted, round failed", "accepted (the round failed)"
    if cell.state == REJECTED:
        reason = _reason_kind(cell.reason)  # "<stage>: <reason>"
        stage, sep, _ = reason.partition(": ")
        if not sep:
            return "rejected", f"rejected: {reason}"
        return f"rejected at {stage}"[:_KIND_CHARS], f"rejected at {reason}"
    if not cell.reason:
        return _NO_REASON_LOGGED, "sent nothing"
    reason = _reason_kind(cell.reason)
    kind = reason.split(":", 1)[0].strip()
    return (kind if len(kind) <= _KIND_CHARS else kind[: _KIND_CHARS - 1] + "…"), reason


def _kind_counts(kinds: Iterable[str]) -> str:
    """``"5 refused, 2 dropped at masked-input"``, the commonest first (escaped)."""
    counted = sorted(Counter(kinds).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{n} {_e(kind)}" for kind, n in counted)


# -- plots --------------------------------------------------------------------------------------


def _ticks(lo: int, hi: int, per_unit: float) -> list[int]:
    """Integer ticks from ``lo`` to ``hi`` (``per_unit`` px apart per unit), at a round step
    that leaves a label 24 px; ``lo`` always, multiples of the step after it."""
    step = next(
        (s for s in (1, 2, 5, 10, 20, 25, 50, 100, 250, 500, 1000) if per_unit * s >= 24), 1000
    )
    first = (lo // step + 1) * step
    if (first - lo) * per_unit < 24:
        first += step
    return [lo, *range(first, hi + 1, step)]


def _svg_lines(series: dict[str, list[tuple[int, float]]], title: str, *, width: int = 560) -> str:
    w, h, left, right, top, bottom = width, 260, 48, 16, 34, 40
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no metrics recorded.</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    pw, ph = w - left - right, h - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>',
        f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle" font-size="12">round</text>',
    ]
    for t in _ticks(x0, x1, pw / (x1 - x0)):
        parts.append(
            f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle" '
            f'font-size="10">{t}</text>'
        )
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(
            f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">'
            f"{y:.3g}</text>"
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + pw}" y2="{sy(y):.1f}" '
            'stroke="#eee"/>'
        )
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        radius = 3 if len(pts) <= 60 else 1.5
        for x, y in pts:
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{color}">'
                f"<title>{html.escape(name)}, round {x}: {y:.4g}</title></circle>"
            )
        parts.append(
            f'<text x="{left + 8 + 150 * (i % 3)}" y="{14 + 13 * (i // 3)}" fill="{color}" '
            f'font-size="12">■ {html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class _Cell:
    state: str
    root: str = ""
    reason: str = ""


def _participation(view: ReportView) -> dict[tuple[str, tuple[int, int]], _Cell]:
    """Each site's part in each round: in the sum, accepted, rejected, or expected and absent
    (with the reason the round result logs for it, if any; sites neither expected, named absent
    nor heard from have no cell). A round without a result (the log ends inside it) has only
    the sites heard from, none in a sum."""
    heard: dict[tuple[int, int], set[str]] = defaultdict(set)
    for site, col in (*view.inputs, *view.site_rejections):
        heard[col].add(site)
    results = {(r.run_no, r.round): r for r in view.rounds}
    cells: dict[tuple[str, tuple[int, int]], _Cell] = {}
    for col in _round_columns(view):
        r = results.get(col)
        survivors = set(r.survivors) if r is not None and r.status == "completed" else set()
        logged = r.absent if r is not None else {}
        for site in (
            set(r.expected if r is not None else ()) | logged.keys() | heard.get(col, set())
        ):
            key = (site, col)
            root = view.input_roots.get(key, "")
            state = view.inputs.get(key)
            if state == "accepted":
                cells[key] = _Cell(IN_SUM if site in survivors else ACCEPTED, root)
            elif state == "rejected" or key in view.site_rejections:
                cells[key] = _Cell(REJECTED, root, view.site_rejections.get(key, ""))
            else:
                cells[key] = _Cell(ABSENT, reason=logged.get(site, ""))
    return cells


def _round_columns(view: ReportView) -> list[tuple[int, int]]:
    cols = {(r.run_no, r.round) for r in view.rounds}
    cols |= {c for _, c in view.inputs} | {c for _, c in view.site_rejections}
    return sorted(cols)


def _svg_participation(
    view: ReportView, cells: dict[tuple[str, tuple[int, int]], _Cell]
) -> tuple[str, str]:
    """The participation chart (one row per site, one column per round, runs of equal cells
    drawn as one bar) with the number of sites per state above each round; and a note on what
    was left out."""
    cols = _round_columns(view)
    sites = sorted({s for s, _ in cells} | {e.site for e in view.roster_events})
    if not sites or not cols:
        return "<p>No masked inputs recorded.</p>", ""
    note = ""
    if len(sites) > _HEATMAP_MAX_SITES:
        missed = sorted({s for (s, _), c in cells.items() if c.state != IN_SUM})
        note = (
            f"{len(sites)} sites: only the {len(missed)} that missed a round are drawn; the "
            "others were in the sum of every round they were expected in (the sites table "
            "lists all)."
        )
        sites = missed[:_HEATMAP_MAX_SITES]
    ncol, nrow = len(cols), len(sites)
    many_runs = len({run for run, _ in cols}) > 1
    cw = max(3, min(36, 880 // ncol))
    rh = 22 if nrow <= 20 else 14 if nrow <= 50 else 11
    font = min(11, rh - 2)
    label = min(24, max(len(s) for s in sites))
    left = 12 + int(label * font * 0.6)
    bars_h, top = 70, 8
    grid_top = top + bars_h + 22
    w = left + cw * ncol + 70
    h = grid_top + rh * nrow + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append("<title>participation per site per round</title>")
    # The sites per state above each round (stacked bars).
    counts: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for (_, col), cell in cells.items():
        counts[col][cell.state] += 1
    tallest = max((sum(c.values()) for c in counts.values()), default=1) or 1
    parts.append(
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{tallest}</text>'
        f'<text x="{left - 4}" y="{top + bars_h}" font-size="10" text-anchor="end">0</text>'
    )
    for j, col in enumerate(cols):
        x, y = left + cw * j, float(top + bars_h)
        c = counts.get(col, Counter())
        tip = f"round {col[1]}: " + ", ".join(f"{c[s]} {s}" for s in _STATE_COLOR if c[s])
        parts.append(f"<g><title>{_e(tip)}</title>")
        for state, color in _STATE_COLOR.items():
            if c[state]:
                bh = bars_h * c[state] / tallest
                y -= bh
                parts.append(
                    f'<rect x="{x}" y="{y:.1f}" width="{max(1, cw - 1)}" height="{bh:.1f}" '
                    f'fill="{color}"/>'
                )
        parts.append("</g>")
    # Round numbers (and where each run starts).
    for j, (run_no, _) in enumerate(cols):
        x = left + cw * j
        if j and cols[j - 1][0] != run_no:
            parts.append(
                f'<line x1="{x - 0.5}" y1="{top}" x2="{x - 0.5}" y2="{h - 6}" stroke="#333"/>'
            )
        if many_runs and (j == 0 or cols[j - 1][0] != run_no):
            parts.append(f'<text x="{x + 1}" y="{grid_top - 14}" font-size="9">run {run_no}</text>')
    run_ticks: dict[int, list[int]] = defaultdict(list)
    for run_no, rnd in cols:
        run_ticks[run_no].append(rnd)
    for run_no, rounds in run_ticks.items():
        shown = set(_ticks(min(rounds), max(rounds), cw))
        for j, col in enumerate(cols):
            if col[0] == run_no and col[1] in shown:
                parts.append(
                    f'<text x="{left + cw * j + cw / 2}" y="{grid_top - 4}" font-size="9" '
                    f'text-anchor="middle">{col[1]}</text>'
                )
    # One row per site; equal neighbouring cells of a run are one bar with one tooltip.
    for i, site in enumerate(sites):
        y = grid_top + rh * i
        shown_name = site if len(site) <= label else site[: label - 1] + "…"
        parts.append(
            f'<text x="{left - 4}" y="{y + rh - 3}" font-size="{font}" text-anchor="end">'
            f"<title>{_e(site)}</title>{_e(shown_name)}</text>"
        )
        if i % 2:
            parts.append(
                f'<rect x="{left}" y="{y}" width="{cw * ncol}" height="{rh}" fill="#f4f4f4"/>'
            )
        j = 0
        in_sum = 0
        expected = 0
        while j < ncol:
            here = cells.get((site, cols[j]))
            k = j
            while (
                k + 1 < ncol
                and cols[k + 1][0] == cols[j][0]
                and cells.get((site, cols[k + 1])) == here
            ):
                k += 1
            if here is not None:
                span = k - j + 1
                expected += span
                in_sum += span if here.state == IN_SUM else 0
                span_text = _ranges(c[1] for c in cols[j : k + 1])
                tip = f"{site}, round {span_text}" + (f" (run {cols[j][0]})" if many_runs else "")
                tip += f": {_STATE_WORDS[here.state]}"
                if here.reason:
                    tip += f" ({here.reason})"
                if here.root:
                    tip += f"; dataset root {here.root}"
                parts.append(
                    f'<rect x="{left + cw * j}" y="{y + 1}" width="{cw * span - 1}" '
                    f'height="{rh - 2}" fill="{_STATE_COLOR[here.state]}"><title>{_e(tip)}'
                    "</title></rect>"
                )
            j = k + 1
        parts.append(
            f'<text x="{left + cw * ncol + 6}" y="{y + rh - 3}" font-size="{font}">'
            f"{in_sum}/{expected}</text>"
        )
    parts.append("</svg>")
    return "".join(parts), note


def _svg_bars(counts: Counter[str], title: str) -> str:
    if not counts:
        return "<p>No rejections.</p>"
    items = counts.most_common(30)
    bar, left, w = 22, 330, 720
    h = bar * len(items) + 20
    top = max(counts.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append(f"<title>{html.escape(title)}</title>")
    for i, (reason, n) in enumerate(items):
        y = 10 + bar * i
        length = (w - left - 60) * n / top
        shown = reason if len(reason) <= 52 else reason[:51] + "…"
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">'
            f"<title>{html.escape(reason)}</title>{html.escape(shown)}</text>"
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar - 4}" fill="#d62728"/>'
        )
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 15}" font-size="11">{n}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _witness_rows(results: Sequence[WitnessResult]) -> str:
    if not results:
        return (
            "<p>No witnesses checked: nothing outside the log shows that it was not cut back to "
            "an earlier signed tree head, or rewritten and re-signed with the coordinator's key. "
            "Collect the sites' receipts (<code>fl-client receipts export</code>) and pass them "
            "with <code>--witness FILE</code>.</p>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(str(r.file.path))}</td><td>{html.escape(', '.join(r.file.sites))}"
        f"</td><td>{len(r.file.heads)}</td><td>{r.file.largest}</td>"
        + (
            f'<td class="ok">consistent: all {r.checked} verify under the pinned key and are '
            "prefixes of this log</td></tr>"
            if r.failure is None
            else f'<td class="bad">FAILED ({html.escape(r.failure.check)}): '
            f"{html.escape(str(r.failure))}</td></tr>"
        )
        for r in results
    )
    return (
        "<p>Signed tree heads the sites kept (their receipts), checked against this log: "
        "signature under the pinned coordinator key, log id, and consistency (a witnessed head "
        "must be a prefix of the log).</p><table><tr><th>witness file</th><th>site(s)</th>"
        f"<th>tree heads</th><th>largest size</th><th>result</th></tr>{rows}</table>"
    )


# -- the report's sections ----------------------------------------------------------------------


def _run_label(view: ReportView, run_no: int) -> str:
    if 1 <= run_no <= len(view.runs):
        return f"run {run_no} ({view.runs[run_no - 1].short})"
    return "no run open"


def _summary(view: ReportView, cells: dict[tuple[str, tuple[int, int]], _Cell]) -> str:
    if not view.runs:
        return "<p>This log records no run.</p>"
    items = []
    for run in view.runs:
        rounds = [r for r in view.rounds if r.run_no == run.number]
        done = sum(r.status == "completed" for r in rounds)
        failed = len(rounds) - done
        took_part = {s for (s, (n, _)), c in cells.items() if n == run.number and c.state == IN_SUM}
        rejected = sum(
            1 for (_, (n, _)), c in cells.items() if n == run.number and c.state == REJECTED
        )
        absent = [
            _why_missing(c)[0]
            for (_, (n, _)), c in cells.items()
            if n == run.number and c.state == ABSENT
        ]
        absences = (
            f" Expected sites sent nothing in {len(absent)} site-round"
            f"{'' if len(absent) == 1 else 's'} ({_kind_counts(absent)})."
            if absent
            else ""
        )
        ended = (
            f"to {_when(run.ended_ms)} ({_duration(run.started_ms, run.ended_ms)}): "
            f"<b>{_e(run.status)}</b>" + (f" ({_e(run.end_reason)})" if run.end_reason else "")
            if run.ended_ms is not None
            else "and has <b>not ended</b> in this log"
        )
        dp = ""
        if run.short in view.dp:
            n, eps, delta, target = view.dp[run.short]
            dp = (
                f" Distributed differential privacy: ε = {eps:.3g} at δ = {delta:g} spent over "
                f"{n} round{'' if n == 1 else 's'} (budget ε = {target:g})."
            )
        elif run.dp_budget is None:
            dp = " No differential privacy (secure aggregation only)."
        produced = (
            f" Final model {_digest(run.final_model)} after round {run.final_round}."
            if run.final_model
            else ""
        )
        items.append(
            f"<li><b>Run {run.number}</b> (<code>{_e(run.short)}</code>) ran from "
            f"{_when(run.started_ms)} {ended}. {done} of {run.planned_rounds} planned rounds "
            f"committed, {failed} failed. {len(took_part)} site"
            f"{'' if len(took_part) == 1 else 's'} contributed to at least one round's sum; "
            + (
                f"a site's message was rejected in {rejected} site-round"
                f"{'' if rejected == 1 else 's'}."
                if rejected
                else "no site's message was rejected."
            )
            + f"{absences}{dp}{produced}</li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def _no_reason(run: _RunView, rounds: int) -> str:
    if run.ended_ms is None:
        return "—"
    if rounds >= run.planned_rounds:
        return "no reason recorded (every planned round ran)"
    return "<i>no reason recorded</i>"


def _settings_text(settings: str) -> str:
    """The declared settings as ``key: value`` lines (escaped), or why there are none."""
    if not settings:
        return "not recorded (a log from before run starts carried them)"
    try:
        doc = json.loads(settings)
    except ValueError:
        return _e(settings)
    lines = []
    for key, value in sorted(doc.items()):
        shown = (
            ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
            if isinstance(value, dict)
            else value
        )
        lines.append(f"{_e(str(key))}: {_e(str(shown))}")
    return "<br>".join(lines)


def _runs_table(view: ReportView) -> str:
    """One column per run, one row per fact (a run has more facts than a line holds)."""
    if not view.runs:
        return "<p>No run in this log.</p>"
    facts: list[tuple[str, list[str]]] = [
        ("run id", []), ("started", []), ("ended", []), ("duration", []), ("outcome", []),
        ("why it ended", []), ("rounds planned / committed / failed", []), ("protection", []),
        ("settings the coordinator declared", []),
        ("configuration: SHA-256 of server.toml", []), ("roster digest at the start", []),
        ("initial model", []), ("code version", []),
    ]  # fmt: skip
    for run in view.runs:
        rounds = [r for r in view.rounds if r.run_no == run.number]
        done = sum(r.status == "completed" for r in rounds)
        budget = (
            f"secure aggregation with distributed DP, budget ε = {run.dp_budget[0]:g} at "
            f"δ = {run.dp_budget[1]:g}"
            if run.dp_budget
            else "secure aggregation, no DP"
        )
        outcome = _e(run.status)
        if run.status != "completed":
            outcome = f'<span class="bad">{outcome}</span>'
        values = [
            f"<code>{_e(run.run_id)}</code>", _when(run.started_ms),
            _when(run.ended_ms) if run.ended_ms is not None else "not ended in this log",
            _duration(run.started_ms, run.ended_ms), outcome,
            _e(run.end_reason) or _no_reason(run, len(rounds)),
            f"{run.planned_rounds} / {done} / {len(rounds) - done}", budget,
            _settings_text(run.settings),
            _digest(run.config_digest, 64), _digest(run.roster_digest, 16),
            _digest(run.initial_model, 16), _e(run.code_version),
        ]  # fmt: skip
        for (_, column), value in zip(facts, values, strict=True):
            column.append(value)
    head = "".join(f"<th>run {run.number}</th>" for run in view.runs)
    rows = "".join(
        f"<tr><th>{name}</th>{''.join(f'<td>{v}</td>' for v in values)}</tr>"
        for name, values in facts
    )
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


_ACTION_WORDS = {
    "enrol": "enrolled",
    "set-roots": "dataset roots replaced",
    "revoke": "revoked",
    "withdraw-root": "dataset root withdrawn (never accepted again)",
}


def _roster_history(view: ReportView) -> str:
    if not view.roster_events:
        return "<p>No enrolment, dataset-root change or revocation in this log.</p>"
    before: dict[str, tuple[str, ...]] = {}
    rows = []
    for ev in view.roster_events:
        old = before.get(ev.site, ())
        if ev.action == "set-roots":
            added = [r for r in ev.roots if r not in old]
            removed = [r for r in old if r not in ev.roots]
            roots = (
                "".join(f"<div>+ {_digest(r)}</div>" for r in added)
                + "".join(f"<div>− {_digest(r)}</div>" for r in removed)
                or "unchanged"
            )
        elif ev.action == "enrol":
            roots = "".join(f"<div>{_digest(r)}</div>" for r in ev.roots) or "none"
        elif ev.action == "withdraw-root":
            roots = "".join(f"<div>− {_digest(r)}</div>" for r in ev.withdrawn)
        else:
            roots = "none (no input accepted from now on)"
        before[ev.site] = ev.roots
        key = f" key {_digest(ev.key_id)}" if ev.key_id else ""
        rows.append(
            f"<tr><td>{_when(ev.at_ms)}</td><td>{ev.index}</td><td>{_e(ev.site)}</td>"
            f"<td>{_ACTION_WORDS.get(ev.action, _e(ev.action))}{key}</td><td>{roots}</td>"
            f"<td>{_e(ev.reason) if ev.reason else '<i>none recorded</i>'}</td></tr>"
        )
    head = (
        "<table><tr><th>when</th><th>entry</th><th>site</th><th>change</th>"
        "<th>approved dataset roots</th><th>reason</th></tr>"
    )
    if len(rows) <= _HISTORY_ROWS:
        return f"{head}{''.join(rows)}</table>"
    # Many enrolments: the changes after them stay in view, the whole history one click away.
    changes = [
        row for ev, row in zip(view.roster_events, rows, strict=True) if ev.action != "enrol"
    ]
    kinds = Counter(_ACTION_WORDS.get(ev.action, ev.action) for ev in view.roster_events)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    return (
        f"<p>{len(rows)} roster changes: {_e(counts)}. Every change but the enrolments:</p>"
        + (f"{head}{''.join(changes)}</table>" if changes else "<p>None.</p>")
        + f"<details><summary>the whole history, enrolments included</summary>{head}"
        f"{''.join(rows)}</table></details>"
    )


def _sites_table(view: ReportView, cells: dict[tuple[str, tuple[int, int]], _Cell]) -> str:
    sites = sorted({s for s, _ in cells} | {e.site for e in view.roster_events})
    if not sites:
        return "<p>No site in this log.</p>"
    many_runs = len(view.runs) > 1
    by_site: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    roots_used: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    reasons: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    absences: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for (site, col), cell in cells.items():
        by_site[site][cell.state].append(col)
        if cell.root and cell.state in (IN_SUM, ACCEPTED):
            roots_used[site][cell.root].append(col)
        if cell.state == REJECTED:
            reasons[site][_reason_kind(cell.reason)].append(col)
        if cell.state == ABSENT:
            absences[site][_why_missing(cell)[1]].append(col)
    enrolled: dict[str, int] = {}
    revoked: dict[str, _RosterEvent] = {}
    current: dict[str, tuple[str, ...]] = {}
    withdrawals: dict[str, list[_RosterEvent]] = defaultdict(list)
    for ev in view.roster_events:
        if ev.action == "enrol":
            enrolled.setdefault(ev.site, ev.at_ms)
            revoked.pop(ev.site, None)
        if ev.action == "revoke":
            revoked[ev.site] = ev
        if ev.action == "withdraw-root":
            withdrawals[ev.site].append(ev)
        current[ev.site] = ev.roots
    rows = []
    for site in sites:
        states = by_site.get(site, {})
        if site in enrolled:
            status = f"enrolled {_when(enrolled[site])}"
        else:
            status = '<span class="bad">never enrolled</span>'
        if site in revoked:
            ev = revoked[site]
            status += f'<div><span class="bad">revoked</span> {_when(ev.at_ms)}' + (
                f": {_e(ev.reason)}</div>" if ev.reason else "</div>"
            )
        used = "".join(
            f"<div>{_digest(root)}: {_rounds_text(cols, many_runs)}</div>"
            for root, cols in sorted(roots_used.get(site, {}).items(), key=lambda kv: min(kv[1]))
        )
        why = "".join(
            f"<div>{_rounds_text(cols, many_runs)}: {_e(kind)}</div>"
            for kind, cols in sorted(reasons.get(site, {}).items(), key=lambda kv: min(kv[1]))
        )
        other = "".join(
            f"<div>sent nothing: {_rounds_text(cols, many_runs)}</div>"
            if why == "sent nothing"
            else f"<div>sent nothing: {_rounds_text(cols, many_runs)}: {_e(why)}</div>"
            for why, cols in sorted(absences.get(site, {}).items(), key=lambda kv: min(kv[1]))
        )
        if states.get(ACCEPTED):
            other += f"<div>round failed: {_rounds_text(states[ACCEPTED], many_runs)}</div>"
        rows.append(
            f'<tr><td class="n">{_e(site)}</td><td>{status}</td>'
            f"<td>{''.join(f'<div>{_digest(r)}</div>' for r in current.get(site, ()))}"
            + "".join(
                f'<div><span class="bad">withdrawn</span> {_digest(r)} {_when(ev.at_ms)}: '
                f"{_e(ev.reason)}</div>"
                for ev in withdrawals.get(site, [])
                for r in ev.withdrawn
            )
            + f"</td><td>{used}</td><td>{len(states.get(IN_SUM, []))}</td><td>{why}</td>"
            f"<td>{other}</td></tr>"
        )
    return (
        "<table><tr><th>site</th><th>enrolment (and revocation)</th>"
        "<th>approved dataset roots (latest)</th><th>dataset root used: rounds</th>"
        "<th>rounds in the sum</th><th>rejected: rounds, why</th>"
        f"<th>otherwise not in the sum: rounds</th></tr>{''.join(rows)}</table>"
    )


def _policy(r: _RoundView) -> str:
    s = r.setup
    if s is None:
        return "<i>no signed setup logged</i>"
    text = f"cohort {len(s.cohort)}, sum ≥ {s.min_survivors}, t = {s.threshold}, clip {s.clip:g}"
    if s.dp:
        text += f", DP z = {s.noise_multiplier:.3g}, colluders {s.colluders}"
    if s.attempts > 1:
        text += f" (attempt {s.attempts})"
    return _e(text)


_MISSING_INLINE = 2
"""Sites not in a round's sum named inline in the rounds table (if that fits in
:data:`_MISSING_INLINE_CHARS`); beyond it they are counted by kind of reason, the sites of each
reason one click away (so a row stays a line or two at 100 sites)."""
_MISSING_INLINE_CHARS = 160


def _missing(cells: dict[tuple[str, tuple[int, int]], _Cell]) -> dict[tuple[int, int], str]:
    """Per round: the sites expected or heard from that are not in its sum, and why (escaped
    HTML): up to :data:`_MISSING_INLINE` named inline, else counted per kind of reason with
    the sites of each reason in a collapsed list."""
    out: dict[tuple[int, int], list[tuple[str, str, str]]] = defaultdict(list)
    for (site, col), cell in sorted(cells.items()):
        if cell.state != IN_SUM:
            out[col].append((site, *_why_missing(cell)))
    html_of: dict[tuple[int, int], str] = {}
    for col, items in out.items():
        inline = "; ".join(f"{site} ({why})" for site, _, why in items)
        if len(items) <= _MISSING_INLINE and len(inline) <= _MISSING_INLINE_CHARS:
            html_of[col] = _e(inline)
            continue
        by_reason: dict[str, list[str]] = defaultdict(list)
        for site, _, why in items:
            by_reason[why].append(site)
        listing = "".join(
            f"<div>{_e(why)} ({len(sites)}): {_e(', '.join(sites))}</div>"
            for why, sites in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        )
        html_of[col] = (
            f"<details><summary>{len(items)} sites: {_kind_counts(k for _, k, _ in items)}"
            f"</summary>{listing}</details>"
        )
    return html_of


def _rounds_table(view: ReportView, cells: dict[tuple[str, tuple[int, int]], _Cell]) -> str:
    missing = _missing(cells)
    rows = "".join(
        f"<tr><td>{_e(r.run)}</td><td>{r.round}</td>"
        + (
            f"<td>{r.status}</td>"
            if r.status == "completed"
            else f'<td><span class="bad">{r.status}</span>: {_e(r.reason)}</td>'
        )
        + f"<td>{_when(r.signed_ms)}</td><td>{_policy(r)}</td><td>{len(r.survivors)}</td>"
        f"<td>{missing.get((r.run_no, r.round), '')}</td>"
        f"<td>{format_metric(r.eval_metrics.get('accuracy'))}</td>"
        f"<td>{format_metric(r.eval_metrics.get('loss'))}</td>"
        f"<td>{format_metric(r.eval_metrics.get('macro-f1'))}</td>"
        f"<td>{'' if r.eval_examples is None else r.eval_examples}</td>"
        f"<td>{'' if r.dp_epsilon is None else f'{r.dp_epsilon:.4g}'}</td>"
        f"<td>{_digest(r.new_model)}</td></tr>"
        for r in view.rounds
    )
    return (
        "<table><tr><th>run</th><th>round</th><th>outcome</th><th>signed at</th>"
        "<th>round parameters (signed setup)</th><th>sites in the sum</th>"
        "<th>not in the sum (why)</th><th>accuracy</th><th>loss</th><th>macro-F1</th>"
        "<th>eval examples</th><th>ε so far</th><th>new model</th></tr>"
        f"{rows}</table>"
    )


def _rejection_sections(view: ReportView) -> str:
    failed = [r for r in view.rounds if r.status != "completed"]
    failed_rows = "".join(
        f"<tr><td>{_e(_run_label(view, r.run_no))}</td><td>{r.round}</td>"
        f"<td>{_when(r.signed_ms)}</td><td>{_e(r.reason) or '<i>none recorded</i>'}</td></tr>"
        for r in failed
    )
    failed_html = (
        "<table><tr><th>run</th><th>round</th><th>signed at</th><th>why</th></tr>"
        f"{failed_rows}</table>"
        if failed
        else "<p>No round failed.</p>"
    )
    ended = [run for run in view.runs if run.status == "aborted"]
    aborted = "".join(
        f"<p class='bad'>Run {run.number} ({_e(run.short)}) was aborted: "
        f"{_e(run.end_reason) or 'no reason recorded'}.</p>"
        for run in ended
    )
    shown = view.rejections[:_DETAIL_ROWS]
    rej = "".join(
        f"<tr><td>{i}</td><td>{html.escape(lbl)}</td><td>{html.escape(s)}</td>"
        f"<td>{html.escape(st)}</td><td>{html.escape(reason)}</td></tr>"
        for i, lbl, _, s, st, reason in shown
    )
    more = (
        f"<p>{len(view.rejections) - len(shown)} more rejected envelopes are not listed "
        "(<code>fl-audit export</code> lists every entry).</p>"
        if len(view.rejections) > len(shown)
        else ""
    )
    listing = (
        f"<details{' open' if len(view.rejections) <= 50 else ''}><summary>show the list"
        "</summary><table><tr><th>entry</th><th>run/round</th><th>site</th><th>stage</th>"
        f"<th>reason</th></tr>{rej}</table>{more}</details>"
        if view.rejections
        else "<p>None.</p>"
    )
    return (
        f"<h3>Failed rounds</h3>{aborted}{failed_html}"
        f"<h3>Rejected envelopes, one by one ({len(view.rejections)})</h3>{listing}"
    )


_ABSENT_SITES_SHOWN = 5
"""Sites listed open under one absence reason; beyond it the list folds away (one click)."""


def _absence_section(view: ReportView, cells: dict[tuple[str, tuple[int, int]], _Cell]) -> str:
    """Expected sites that sent nothing, one row per reason (digests cut): its kind, how many
    site-rounds, and which sites in which rounds (collapsed beyond a few)."""
    many_runs = len(view.runs) > 1
    groups: dict[tuple[str, str], dict[str, list[tuple[int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for (site, col), cell in cells.items():
        if cell.state == ABSENT:
            groups[_why_missing(cell)][site].append(col)
    total = sum(len(cols) for g in groups.values() for cols in g.values())
    head = f"<h3>Expected sites that sent nothing, by reason ({total} site-rounds)</h3>"
    if not groups:
        return f"{head}<p>None.</p>"
    ordered = sorted(
        groups.items(), key=lambda kv: (-sum(map(len, kv[1].values())), kv[0][0], kv[0][1])
    )
    rows = []
    for (kind, why), sites in ordered[:_DETAIL_ROWS]:
        n = sum(map(len, sites.values()))
        who = "".join(
            f"<div>{_e(site)}: {_rounds_text(cols, many_runs)}</div>"
            for site, cols in sorted(sites.items())
        )
        if len(sites) > _ABSENT_SITES_SHOWN:
            who = f"<details><summary>{len(sites)} sites</summary>{who}</details>"
        rows.append(f"<tr><td>{_e(kind)}</td><td>{_e(why)}</td><td>{n}</td><td>{who}</td></tr>")
    more = (
        f"<p>{len(ordered) - _DETAIL_ROWS} more reasons are not listed "
        "(<code>fl-audit export</code> lists every entry).</p>"
        if len(ordered) > _DETAIL_ROWS
        else ""
    )
    return (
        f"{head}<table><tr><th>kind</th><th>reason (as the round result gives it)</th>"
        f"<th>site-rounds</th><th>sites: rounds</th></tr>{''.join(rows)}</table>{more}"
    )


def _produced(view: ReportView) -> str:
    finals = "".join(
        f"<tr><td>{run.number}</td><td>{_digest(run.initial_model, 16)}</td>"
        f"<td>{'' if run.final_round is None else run.final_round}</td>"
        f"<td>{_digest(run.final_model, 16) if run.final_model else 'none (run open)'}</td></tr>"
        for run in view.runs
    )
    ckpts = "".join(
        f"<tr><td>{_e(c.run)}</td><td>{c.round}</td><td>{_e(c.name)}</td>"
        f"<td>{_digest(c.model, 16)}</td><td>{_digest(c.file, 16)}</td></tr>"
        for c in view.checkpoints
    )
    return (
        "<table><tr><th>run</th><th>initial model</th><th>final round</th><th>final model</th>"
        f"</tr>{finals}</table><h3>Checkpoints ({len(view.checkpoints)})</h3>"
        + (
            "<table><tr><th>run</th><th>round</th><th>file</th><th>model digest</th>"
            f"<th>file SHA-256</th></tr>{ckpts}</table>"
            if ckpts
            else "<p>No checkpoint recorded.</p>"
        )
    )


def _metric_series(
    view: ReportView,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """Evaluation metrics per round (x: the round; one series per run when there are several)."""
    many_runs = len({r.run_no for r in view.rounds}) > 1
    series: dict[str, list[tuple[int, float]]] = {}
    for r in view.rounds:
        for name, value in r.eval_metrics.items():
            key = f"{name} (run {r.run_no})" if many_runs else name
            series.setdefault(key, []).append((r.round, value))
    loss = {k: v for k, v in series.items() if "loss" in k}
    acc = {k: v for k, v in series.items() if "loss" not in k}
    return acc, loss


_NOT_LOGGED = (
    "<ul><li>Proof of the run's settings: the settings above are the coordinator's declaration in "
    "its signed run start, as are its metrics; the whole <code>server.toml</code> is signed only "
    "as its SHA-256 (<code>sha256sum server.toml</code> on the kept file must match the "
    "configuration digest above). What the sites signed for is each round's setup below.</li>"
    "<li>The sites' own policies (their minimum cohort, required DP, privacy budget): a site "
    "refuses a round its policy forbids, and the round parameters above are what each site "
    "that took part signed for.</li>"
    "<li>Proof of why an expected site sent nothing: the reason each round result gives "
    "(refused by the site's policy, an error reply, a rejected message, no reply before the "
    "stage closed) is the coordinator's account; a refusal or error is signed by no site. Logs "
    "from before round results carried these reasons say only that the site is not in the "
    "sum.</li>"
    "<li>The data itself, any individual update, or personal data: the log holds digests, "
    "site ids and signatures only. A dataset root is the digest of the data a site "
    "attested.</li></ul>"
)


def _section(anchor: str, title: str, what: str, source: str, body: str) -> str:
    """A report section: what it shows in plain words, which signed entries it is read from."""
    return (
        f'<h2 id="{anchor}">{title}</h2><p>{what}</p><p class="src">Read from: {source}.</p>{body}'
    )


_STYLE = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top}
th{background:#f2f2f2}code{font-size:12px}.src{color:#555;font-size:13px;font-style:italic}
.ok{color:#2ca02c}.bad{color:#d62728}.n{white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
nav a{margin-right:1em}details{margin:.5em 0}.scroll{overflow-x:auto}"""

_NAV = (
    ("summary", "Summary"), ("runs", "Runs"), ("participation", "Participation"),
    ("sites", "Sites"), ("rounds", "Rounds"), ("rejections", "Refused and rejected"),
    ("produced", "Produced"), ("dp", "Differential privacy"), ("consortium", "Consortium"),
    ("witnesses", "Witnesses"), ("limits", "Not in the log"),
)  # fmt: skip


def _header(view: ReportView, title: str, verdict: str) -> str:
    unsigned = ""
    if view.total > view.entries:
        unsigned = f' <b class="bad">({html.escape(unsigned_note(view))})</b>'
    stamps = [ts for _, size, _, ts in view.tree_heads if size > 0 and ts > 0]
    period = (
        f" Signed tree heads from {_when(min(stamps))} to {_when(max(stamps))}." if stamps else ""
    )
    genesis = ""
    if view.genesis is not None:
        key_id = hashlib.sha256(view.genesis.coordinator_key_der).hexdigest()
        genesis = (
            f" Log id <code>{view.genesis.log_id.hex()}</code>, created "
            f"{_when(view.genesis.created_at_ms)}, coordinator key {_digest(key_id, 16)}."
        )
    undecodable = (
        '<p class="bad">Entries that do not decode (not shown): '
        f"{', '.join(map(str, view.undecodable[:20]))}</p>"
        if view.undecodable
        else ""
    )
    nav = "".join(f'<a href="#{anchor}">{name}</a>' for anchor, name in _NAV)
    return (
        "<h1>fedseal audit report: record of processing</h1>"
        f"<p>{html.escape(title)}: {view.entries} signed entries{unsigned}, "
        f"{len(view.tree_heads)} signed tree heads.{genesis}{period}</p>"
        f"<p><b>Verification:</b> {html.escape(verdict)}</p>{undecodable}"
        "<p>This report is read from the coordinator's signed audit log: every fact in it is "
        "an entry a signed tree head covers (times are the coordinator's clock, in UTC). It "
        "records who took part in each training run with which dataset version, when, under "
        "which round parameters and privacy budget, what was produced, and what was refused "
        "or rejected and why. The log holds digests, site ids and signatures only: no data, "
        f"no individual update, no personal data.</p><nav>{nav}</nav>"
    )


def render_report(
    view: ReportView, title: str, verdict: str, witnesses: Sequence[WitnessResult] = ()
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    cells = _participation(view)
    acc, loss = _metric_series(view)
    reasons = Counter(_reason_kind(reason) for *_, reason in view.rejections)
    consortium = "".join(
        f"<tr><td>{c.index}</td><td>{_when(c.at_ms)}</td><td>{html.escape(c.run)}</td>"
        f"<td>{html.escape(c.consortium)}</td><td>{c.version}</td><td>{c.sites}</td>"
        f"<td>{c.revoked}</td><td>{_digest(c.digest, 16)}</td>"
        f"<td>{_digest(c.authority_key_id, 16)}</td></tr>"
        for c in view.consortium
    )
    consortium = (
        "<table><tr><th>entry</th><th>when</th><th>run</th><th>consortium</th><th>version</th>"
        f"<th>sites</th><th>revoked</th><th>digest</th><th>authority</th></tr>{consortium}</table>"
        if consortium
        else "<p>No consortium roster in this log.</p>"
    )
    dp = (
        "".join(
            f"<p>{html.escape(line)}</p>"
            if not line.startswith(" ")
            else f"<p style='margin:0 2em'>{html.escape(line.strip())}</p>"
            for line in dp_lines(view)
        )
        or "<p>No differentially private rounds in this log.</p>"
    )
    if view.dp:
        dp += (
            _dp_plots(view) + f"<p>{html.escape(DP_PROTECTS)}</p><p>{html.escape(DP_DOES_NOT)}</p>"
        )
    participation, left_out = _svg_participation(view, cells)
    legend = "".join(
        f'<span class="sw" style="background:{color}"></span>{_e(_STATE_WORDS[state])} '
        for state, color in _STATE_COLOR.items()
    )
    sections = [
        _section(
            "summary", "Summary", "Each run in a few lines.",
            "the entries below", _summary(view, cells),
        ),
        _section(
            "runs", "Runs: identity and timeline",
            "Each training run: when it started and ended, how many rounds it planned, "
            "committed and lost, why it ended, its protection and privacy budget, and the "
            "digest of the configuration it ran under.",
            "run-start and run-end entries; round-result entries (counts)",
            f'<div class="scroll">{_runs_table(view)}</div>',
        ),
        _section(
            "participation", "Participation per site per round",
            "One row per site, one column per round. Above each round, how many sites were in "
            "each state; at the end of each row, the rounds the site was in the sum of the "
            "rounds it had a part in. Hover a bar for its rounds, the dataset root used and "
            "the reason logged for a rejection or an absence.",
            "masked-input envelope entries (accepted or rejected, with the reason, and the "
            "dataset root), round-setup envelope entries (the cohort), round-result entries "
            "(who is in the sum, who is absent and why)",
            f"<p>{legend}</p><div class=\"scroll\">{participation}</div>"
            + (f"<p>{_e(left_out)}</p>" if left_out else ""),
        ),
        _section(
            "sites", "Sites: enrolment, dataset roots, revocation",
            "Every change to who may take part: enrolment with the site's key and its approved "
            "dataset roots (a dataset root is the digest of one version of the data a site may "
            "train on), replaced roots and revocations, each with its time and recorded reason. "
            "Then, per site, which dataset root it used in which rounds, and the rounds it was "
            "in the sum, rejected (and why), or otherwise not in the sum (and why, where the "
            "round result says).",
            "roster-change entries; masked-input envelope entries (dataset root per round); "
            "round-result entries (absent sites and why)",
            f'<h3>History</h3><div class="scroll">{_roster_history(view)}</div>'
            f'<h3>Per site</h3><div class="scroll">{_sites_table(view, cells)}</div>',
        ),
        _section(
            "rounds", "Rounds",
            "Per round: its outcome and when it was signed; the parameters its signed setup "
            "gave every site of the cohort (cohort: the sites named; sum ≥: the fewest sites "
            "the sum may hold; t: the key-share threshold; clip: the bound on one site's "
            "update; DP z: the noise multiplier the honest sites' noise reaches, against the "
            "colluding sites assumed); who is not in the sum and why (beyond a few sites, "
            "counted per kind of reason: open the cell for the sites); and the federated "
            "evaluation of the round's new model. Accuracy, loss and macro-F1: the federated "
            "evaluation of the round's new model, from its evaluation entry: the coordinator's "
            "claim (signed by it; no site's signature backs them).",
            "round-result, round-setup envelope, evaluation and DP-accounting entries",
            f'<div class="scroll">{_rounds_table(view, cells)}</div>',
        ),
        _section(
            "rejections", "What was refused or rejected, and why",
            "Every message the coordinator rejected (a sender not enrolled or revoked, a "
            "dataset root not approved, a bad signature, …), every round that failed, and "
            "every expected site that sent nothing (refused by its policy, an error, no reply "
            "in time), with the reason recorded. Reasons that differ only by a digest are "
            "counted together.",
            "envelope entries the coordinator rejected; failed round-result and run-end "
            "entries; round-result entries (absent sites and why)",
            f"<h3>Rejection reasons</h3>{_svg_bars(reasons, 'rejection reasons')}"
            + _rejection_sections(view)
            + _absence_section(view, cells),
        ),
        _section(
            "produced", "What was produced",
            "The model each run started from and ended with, every checkpoint file written "
            "(its name, the model it holds and the file's SHA-256), and the evaluated quality "
            "of each round's model.",
            "run-start, run-end, checkpoint and evaluation entries",
            _produced(view)
            + f"<h3>Accuracy and macro-F1 per round</h3>{_svg_lines(acc, 'accuracy per round')}"
            + f"<h3>Loss per round</h3>{_svg_lines(loss, 'loss per round')}",
        ),
        _section(
            "dp", "Differential privacy",
            "Per DP run, the privacy of the sums the coordinator unmasked (distributed "
            "discrete Gaussian noise inside the secure sum; zCDP ρ per round composed and "
            "converted by the RDP accountant), as its DP accounting entries state them "
            "(<code>fl-audit verify</code> recomputes each from the logged parameters).",
            "run-start entries (budget) and DP-accounting entries", dp,
        ),
        _section(
            "consortium", "Consortium rosters",
            "The consortium roster the sites ran under, as its roster authority signed it.",
            "consortium-roster entries", consortium,
        ),
        f'<a id="witnesses"></a><h2>Witnesses</h2>{_witness_rows(witnesses)}',
        f'<h2 id="limits">What this log does not record</h2>{_NOT_LOGGED}',
    ]  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + _header(view, title, verdict)
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _jsonable(entry: AuditEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": entry.KIND.label}
    for f in dataclasses.fields(entry):
        out[f.name] = _plain(getattr(entry, f.name))
    return out


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def export_lines(store: MerkleLogStore) -> Iterator[str]:
    for stored in store.iter_entries():
        record: dict[str, Any] = {"index": stored.index, "leaf_hash": stored.leaf_hash.hex()}
        try:
            record["entry"] = _jsonable(decode_entry(stored.data))
        except ProtocolError as exc:
            record["error"] = str(exc)
            record["data_b64"] = base64.b64encode(stored.data).decode()
        yield json.dumps(record)
    for head in store.tree_heads():
        try:
            sth = SignedTreeHead.from_bytes(head.blob)
            yield json.dumps(
                {
                    "tree_head": head.seq,
                    "tree_size": sth.tree_size,
                    "root_hash": sth.root_hash.hex(),
                    "timestamp_ms": sth.timestamp_ms,
                    "signature": sth.signature.hex(),
                    "log_id": sth.log_id.hex(),
                }
            )
        except ProtocolError as exc:
            yield json.dumps({"tree_head": head.seq, "error": str(exc)})
