"""What ``fl-audit show``, ``report`` and ``export`` present: a lenient view of a log (decoded
without verdict), the self-contained HTML report with hand-made SVG plots, and JSON lines.

A view checks nothing (``fl-audit verify`` does): entries that do not decode are listed, and
only the entries a signed tree head covers are shown.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import html
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import (
    AuditEntry,
    Checkpoint,
    ConsortiumRosterRecord,
    DpRound,
    EnvelopeRecord,
    Evaluation,
    Genesis,
    RosterChange,
    RoundRecord,
    RunEnd,
    RunStart,
)
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import SignedTreeHead
from fedseal.audit.witness import WitnessResult
from fedseal.protocol.errors import ProtocolError

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


@dataclass
class ReportView:
    entries: int = 0  # shown: those the latest signed tree head covers
    total: int = 0  # in the file, signed or not
    undecodable: list[int] = field(default_factory=list)
    genesis: Genesis | None = None
    rounds: list[_RoundView] = field(default_factory=list)
    runs: list[tuple[str, str]] = field(default_factory=list)
    roster: dict[str, str] = field(default_factory=dict)
    rejections: list[tuple[int, str, int, str, str, str]] = field(default_factory=list)
    # (site, (run number, round)) -> "accepted" / "rejected"
    inputs: dict[tuple[str, tuple[int, int]], str] = field(default_factory=dict)
    checkpoints: list[tuple[str, int, str]] = field(default_factory=list)
    tree_heads: list[tuple[int, int, str, int]] = field(default_factory=list)
    consortium: list[_ConsortiumView] = field(default_factory=list)
    # run (first 8 hex) -> (DP rounds logged, epsilon so far, delta, target epsilon): DP runs
    dp: dict[str, tuple[int, float, float, float]] = field(default_factory=dict)


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
    current = ""
    for stored in store.iter_entries(0, min(signed, view.total)):
        view.entries += 1
        try:
            entry = decode_entry(stored.data)
        except ProtocolError:
            view.undecodable.append(stored.index)
            continue
        if isinstance(entry, Genesis):
            view.genesis = entry
        elif isinstance(entry, RosterChange):
            view.roster[entry.site] = entry.action.name.lower()
        elif isinstance(entry, RunStart):
            current = entry.run_id.hex()
            view.runs.append((current, "open"))
            if entry.dp_budget is not None:
                target, delta = entry.dp_budget
                view.dp[current[:8]] = (0, 0.0, delta, target)
        elif isinstance(entry, DpRound):
            for r in reversed(view.rounds):
                if r.run == current[:8] and r.round == entry.round:
                    r.dp_rho, r.dp_epsilon = entry.rho, entry.epsilon_so_far
                    break
            rounds, _, _, target = view.dp.get(current[:8], (0, 0.0, entry.delta, 0.0))
            view.dp[current[:8]] = (rounds + 1, entry.epsilon_so_far, entry.delta, target)
        elif isinstance(entry, EnvelopeRecord):
            label = f"{current[:8]}/{entry.round}"
            if entry.accepted:
                if entry.message_type.endswith("masked-input"):
                    view.inputs[(entry.site, (len(view.runs), entry.round))] = "accepted"
            else:
                view.rejections.append(
                    (stored.index, label, entry.round, entry.site, entry.stage, entry.reason)
                )
                if entry.message_type.endswith("masked-input"):
                    view.inputs.setdefault((entry.site, (len(view.runs), entry.round)), "rejected")
        elif isinstance(entry, RoundRecord):
            view.rounds.append(
                _RoundView(
                    current[:8],
                    entry.round,
                    stored.index,
                    entry.status.name.lower(),
                    entry.survivors,
                    entry.metric_values,
                    entry.new_model_digest.hex(),
                )
            )
        elif isinstance(entry, Checkpoint):
            view.checkpoints.append((entry.name, entry.round, entry.model_digest.hex()))
        elif isinstance(entry, Evaluation):
            for r in reversed(view.rounds):
                if r.run == current[:8] and r.round == entry.round:
                    r.eval_metrics = entry.metric_values
                    r.eval_examples = entry.num_examples
                    r.eval_sites = entry.sites
                    break
        elif isinstance(entry, RunEnd) and view.runs:
            view.runs[-1] = (view.runs[-1][0], entry.status.name.lower())
            current = ""
        elif isinstance(entry, ConsortiumRosterRecord):
            roster = entry.roster
            active = sum(1 for s in roster.sites if s.active)
            view.consortium.append(
                _ConsortiumView(
                    stored.index, current[:8], entry.consortium, entry.version, active,
                    len(roster.sites) - active, entry.roster_digest.hex(),
                    entry.authority_key_id.hex(),
                )
            )  # fmt: skip
    return view


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
            '<div style="display:flex;gap:8px">'
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


def _svg_lines(series: dict[str, list[tuple[int, float]]], title: str, *, width: int = 560) -> str:
    w, h, pad = width, 260, 40
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{html.escape(title)}: no metrics recorded.</p>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="12">round</text>',
        f'<text x="4" y="{pad - 8}" font-size="11">{y1:.3g}</text>',
        f'<text x="4" y="{h - pad}" font-size="11">{y0:.3g}</text>',
    ]
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        pts = sorted(pts)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for x, y in pts:
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                f"<title>{html.escape(name)}, round {x}: {y:.4g}</title></circle>"
            )
        parts.append(
            f'<text x="{w - pad - 110}" y="{pad + 14 * i}" fill="{color}" font-size="12">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_participation(view: ReportView) -> str:
    sites = sorted({s for s, _ in view.inputs} | set(view.roster))
    rounds = sorted({r for _, r in view.inputs})
    if not sites or not rounds:
        return "<p>No masked inputs recorded.</p>"
    cell, left, top = 22, 120, 30
    w, h = left + cell * len(rounds) + 20, top + cell * len(sites) + 20
    color = {"accepted": "#2ca02c", "rejected": "#d62728"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append("<title>participation per site per round</title>")
    many_runs = len({run for run, _ in rounds}) > 1
    for j, (run, rnd) in enumerate(rounds):
        label = f"{run}/{rnd}" if many_runs else str(rnd)
        parts.append(
            f'<text x="{left + cell * j + cell / 2}" y="{top - 8}" font-size="10" '
            f'text-anchor="middle">{label}</text>'
        )
    for i, s in enumerate(sites):
        y = top + cell * i
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">{html.escape(s)}</text>'
        )
        for j, r in enumerate(rounds):
            state = view.inputs.get((s, r), "absent")
            parts.append(
                f'<rect x="{left + cell * j}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{color.get(state, "#ccc")}"><title>{html.escape(s)} round {r[1]}: {state}'
                "</title></rect>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(counts: Counter[str], title: str) -> str:
    if not counts:
        return "<p>No rejections.</p>"
    items = counts.most_common()
    bar, left, w = 22, 260, 640
    h = bar * len(items) + 20
    top = max(counts.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append(f"<title>{html.escape(title)}</title>")
    for i, (reason, n) in enumerate(items):
        y = 10 + bar * i
        length = (w - left - 60) * n / top
        parts.append(
            f'<text x="{left - 6}" y="{y + 15}" font-size="11" text-anchor="end">'
            f"{html.escape(reason[:40])}</text>"
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


def render_report(
    view: ReportView, title: str, verdict: str, witnesses: Sequence[WitnessResult] = ()
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no external resources)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for idx, r in enumerate(view.rounds, 1):
        for name, value in r.eval_metrics.items():
            series.setdefault(name, []).append((idx, value))
    loss = {k: v for k, v in series.items() if "loss" in k}
    acc = {k: v for k, v in series.items() if "loss" not in k}
    reasons = Counter(reason for *_, reason in view.rejections)
    rows = "".join(
        f"<tr><td>{html.escape(r.run)}</td><td>{r.round}</td><td>{r.status}</td>"
        f"<td>{html.escape(', '.join(r.survivors))}</td><td>{format_metric(r.eval_metrics.get('accuracy'))}</td>"
        f"<td>{format_metric(r.eval_metrics.get('loss'))}</td>"
        f"<td>{format_metric(r.eval_metrics.get('macro-f1'))}</td>"
        f"<td>{'' if r.eval_examples is None else r.eval_examples}</td>"
        f"<td>{r.new_model[:16]}</td></tr>"
        for r in view.rounds
    )
    rej = "".join(
        f"<tr><td>{i}</td><td>{html.escape(lbl)}</td><td>{html.escape(s)}</td>"
        f"<td>{html.escape(st)}</td><td>{html.escape(reason)}</td></tr>"
        for i, lbl, _, s, st, reason in view.rejections
    )
    consortium = "".join(
        f"<tr><td>{c.index}</td><td>{html.escape(c.run)}</td><td>{html.escape(c.consortium)}</td>"
        f"<td>{c.version}</td><td>{c.sites}</td><td>{c.revoked}</td><td>{c.digest[:16]}</td>"
        f"<td>{c.authority_key_id[:16]}</td></tr>"
        for c in view.consortium
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
    dp_plots = ""
    if view.dp:
        dp_plots = (
            _dp_plots(view) + f"<p>{html.escape(DP_PROTECTS)}</p><p>{html.escape(DP_DOES_NOT)}</p>"
        )
    unsigned = ""
    if view.total > view.entries:
        unsigned = f' <b class="bad">({html.escape(unsigned_note(view))})</b>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}
.ok{{color:#2ca02c}}.bad{{color:#d62728}}</style></head><body>
<h1>fedseal audit report</h1>
<p>{html.escape(title)}: {view.entries} signed entries{unsigned}, {len(view.tree_heads)} signed tree heads.</p>
<p><b>Verification:</b> {html.escape(verdict)}</p>
<h2>Witnesses</h2>{_witness_rows(witnesses)}
<h2>Accuracy and macro-F1 per round</h2>{_svg_lines(acc, "accuracy per round")}
<h2>Loss per round</h2>{_svg_lines(loss, "loss per round")}
<h2>Participation per site per round</h2>
<p>green: masked input accepted; red: rejected; grey: none.</p>{_svg_participation(view)}
<h2>Rejection reasons</h2>{_svg_bars(reasons, "rejection reasons")}
<h2>Consortium rosters</h2><table><tr><th>entry</th><th>run</th><th>consortium</th>
<th>version</th><th>sites</th><th>revoked</th><th>digest</th><th>authority</th></tr>{consortium}</table>
<h2>Differential privacy</h2>
<p>Per DP run, the privacy of the sums the coordinator unmasked (distributed discrete Gaussian
noise inside the secure sum; zCDP ρ per round composed and converted by the RDP accountant), as
its DP accounting entries state them (<code>fl-audit verify</code> recomputes each from the
logged parameters).</p>{dp}{dp_plots}
<h2>Rounds</h2>
<p>Accuracy, loss and macro-F1: the federated evaluation of the round's new model, from its
evaluation entry: the coordinator's claim (signed by it; no site's signature backs them).</p>
<table><tr><th>run</th><th>round</th><th>status</th><th>survivors</th><th>accuracy</th>
<th>loss</th><th>macro-F1</th><th>eval examples</th><th>new model</th></tr>{rows}</table>
<h2>Rejected envelopes</h2><table><tr><th>entry</th><th>run/round</th><th>site</th><th>stage</th>
<th>reason</th></tr>{rej}</table>
</body></html>
"""


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
