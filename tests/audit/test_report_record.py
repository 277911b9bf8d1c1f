"""``fl-audit report`` as the record of processing a data-protection officer reads: the run's
identity and timeline, every site's enrolment, dataset roots (with the one it used each round),
withdrawals and revocation with time and reason, its part in every round, what was rejected or
failed and why, what was produced, and DP, at 3 sites x 5 rounds and 100 sites x 50 rounds.
Each report is written by the ``fl-audit report`` command an auditor runs, over logs written by
the coordinator's own writer (``tests/audit/reportlogs.py``), and opened in headless chromium:
the screenshots are kept as test artefacts (their paths are printed)."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from typer.testing import CliRunner

from fedseal.audit.cli import EXIT_OK, app
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import Checkpoint, RosterChange, RunEnd, RunStart
from fedseal.audit.report import collect_view, render_report
from fedseal.audit.store import MerkleLogStore
from fedseal.crypto.keys import save_public_key
from fedseal.protocol.dp import DpParams
from tests.audit.reportlogs import (
    FAILED_REASON,
    OUTSIDER,
    OUTSIDER_REASON,
    REVOKE_REASON,
    ROOT_SWITCHER,
    ROOTS_REASON,
    WITHDRAW_REASON,
    WITHDRAW_ROOT,
    ConsortiumLog,
    build_consortium_log,
)

runner = CliRunner()
STATE_OF_COLOR = {"#2ca02c": "in-sum", "#98df8a": "accepted", "#d62728": "rejected",
                  "#ff9f1c": "absent"}  # fmt: skip


@dataclass(frozen=True)
class Rendered:
    built: ConsortiumLog
    page: str
    html_path: Path
    seconds: float  # fl-audit report, verification included


def _render(tmp: Path, sites: int, rounds: int, dp: DpParams | None) -> Rendered:
    built = build_consortium_log(tmp / "audit.sqlite", sites=sites, rounds=rounds, dp=dp)
    pub = tmp / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    out = tmp / "report.html"
    start = time.perf_counter()
    result = runner.invoke(
        app, ["report", str(built.path), "--out", str(out), "--coordinator-key", str(pub)]
    )
    seconds = time.perf_counter() - start
    assert result.exit_code == EXIT_OK, result.output
    return Rendered(built, out.read_text(encoding="utf-8"), out, seconds)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """3 sites x 5 rounds, a DP run."""
    dp = DpParams.from_noise_multiplier(
        2.0, length=1000, clip=1.0, gamma=1e-3, sites=3, min_survivors=2, modulus_bits=32
    )
    return _render(tmp_path_factory.mktemp("report-3x5"), 3, 5, dp)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """100 sites x 50 rounds, secure aggregation without DP."""
    return _render(tmp_path_factory.mktemp("report-100x50"), 100, 50, None)


@pytest.fixture(params=["small", "big"])
def rendered(request: pytest.FixtureRequest) -> Rendered:
    value: Rendered = request.getfixturevalue(request.param)
    return value


def _entries(built: ConsortiumLog) -> list[object]:
    with MerkleLogStore.open(built.path, read_only=True) as store:
        return [decode_entry(e.data) for e in store.iter_entries()]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _section(page: str, anchor: str) -> str:
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2", start + 1)
    return page[start : end if end > 0 else len(page)]


def _expand(ranges: str) -> list[int]:
    out: list[int] = []
    for part in ranges.split(", "):
        lo, _, hi = part.partition("–")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _chart_cells(page: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(site, round) -> (state, tooltip) for every bar of the participation chart."""
    chart = _section(page, "participation")
    cells: dict[tuple[str, int], tuple[str, str]] = {}
    for color, tip in re.findall(r'<rect [^>]*fill="(#[0-9a-f]{6})"><title>(.*?)</title>', chart):
        site, rounds, _ = re.match(r"^(.*?), round ([0-9–, ]+): (.*)$", html.unescape(tip)).groups()
        for rnd in _expand(rounds):
            assert (site, rnd) not in cells, f"two bars for {site} round {rnd}"
            cells[(site, rnd)] = (STATE_OF_COLOR[color], html.unescape(tip))
    return cells


def _expected_cells(built: ConsortiumLog) -> dict[tuple[str, int], str]:
    want: dict[tuple[str, int], str] = {}
    for rnd in range(1, built.rounds + 1):
        want[(OUTSIDER, rnd)] = "rejected"
        for site in built.sites:
            if site == built.revoked and rnd > built.revoked_after:
                continue
            if (site, rnd) in built.absent:
                want[(site, rnd)] = "absent"
            elif (site, rnd) in built.rejected:
                want[(site, rnd)] = "rejected"
            elif rnd == built.failed_round:
                want[(site, rnd)] = "accepted"
            else:
                want[(site, rnd)] = "in-sum"
    return want


# -- the record ---------------------------------------------------------------------------------


def test_each_run_is_identified_with_its_times_rounds_configuration_and_protection(
    rendered: Rendered,
) -> None:
    entries = _entries(rendered.built)
    start = next(e for e in entries if isinstance(e, RunStart))
    end = next(e for e in entries if isinstance(e, RunEnd))
    runs = _section(rendered.page, "runs")
    rounds = rendered.built.rounds
    assert start.run_id.hex() in runs and start.config_digest.hex() in runs
    assert _utc(start.started_at_ms) in runs and _utc(end.ended_at_ms) in runs
    assert f"<td>{rounds} / {rounds - 1} / 1</td>" in runs  # planned / committed / failed
    protection = (
        "secure aggregation with distributed DP, budget ε = 64 at δ = 1e-05"
        if start.dp_budget
        else "secure aggregation, no DP"
    )
    assert protection in runs
    summary = _section(rendered.page, "summary")
    assert f"{rounds - 1} of {rounds} planned rounds committed, 1 failed" in summary
    assert f"{len(rendered.built.sites)} sites contributed" in summary


def test_the_participation_chart_shows_every_sites_part_in_every_round(
    rendered: Rendered,
) -> None:
    cells = _chart_cells(rendered.page)
    assert {k: state for k, (state, _) in cells.items()} == _expected_cells(rendered.built)
    # The bars say which dataset root was used and why an input was rejected.
    built = rendered.built
    switcher = built.sites[ROOT_SWITCHER]
    old, new = (r.hex() for r in built.roots[switcher])
    assert f"dataset root {old}" in cells[(switcher, 1)][1]
    assert f"dataset root {new}" in cells[(switcher, built.rounds)][1]
    assert "dataset root not approved" in next(
        tip for (site, rnd), (_, tip) in cells.items() if rnd == 2 and site != OUTSIDER
        and "rejected" in tip
    )  # fmt: skip
    assert OUTSIDER_REASON in cells[(OUTSIDER, 1)][1]


def test_the_100_by_50_chart_keeps_one_labelled_row_per_site_and_stays_compact(
    big: Rendered,
) -> None:
    chart = _section(big.page, "participation")
    labels = re.findall(r'text-anchor="end"><title>(.*?)</title>', chart)
    assert len(labels) == 101 and html.unescape(labels[0]) == OUTSIDER
    assert [html.unescape(x) for x in labels[1:]] == big.built.sites
    # Equal neighbouring cells are one bar: far fewer than 101 x 50 shapes.
    bars = chart.count("<rect ")
    assert bars < 1200, bars
    # Every round has its stacked count above it, and round numbers label the columns.
    assert chart.count("<g><title>round ") == 50
    assert re.search(r'font-size="9" text-anchor="middle">50</text>', chart)
    # At each row's end: the rounds the site was in the sum, of the rounds it had a part in.
    want = _expected_cells(big.built)
    totals = [
        f"{sum(s == 'in-sum' for (x, _), s in want.items() if x == site)}/"
        f"{sum(x == site for x, _ in want)}"
        for site in [OUTSIDER, *big.built.sites]
    ]
    assert re.findall(r'font-size="9">(\d+/\d+)</text>', chart) == totals
    built = big.built  # the revoked site: its absent round and the failed round are missing
    assert totals[-1] == f"{built.revoked_after - _absent(built, built.revoked) - 1}/30"
    assert len(big.page) < 1_000_000
    print(f"\n100 sites x 50 rounds: report {len(big.page) / 1e3:.0f} kB, "
          f"fl-audit report (verification included) {big.seconds:.2f} s")  # fmt: skip


def test_the_sites_section_gives_each_roster_change_with_its_time_and_reason(
    rendered: Rendered,
) -> None:
    sites = _section(rendered.page, "sites")
    built = rendered.built
    changes = [e for e in _entries(built) if isinstance(e, RosterChange)]
    assert len(changes) == len(built.sites) + 2 + (WITHDRAW_ROOT is not None)
    for change in changes:
        assert _utc(change.at_ms) in sites
    assert html.escape(REVOKE_REASON) in sites and REVOKE_REASON not in sites
    assert ROOTS_REASON in sites
    if WITHDRAW_ROOT is not None:
        assert "dataset root withdrawn (never accepted again)" in sites
        assert WITHDRAW_REASON in sites
    # Per site: enrolled when, revoked when and why, the roots approved last.
    row = re.search(rf"<tr><td class=\"n\">{built.revoked}</td>.*?</tr>", sites)
    assert row is not None
    revocation = next(c for c in changes if c.site == built.revoked and c.action.name == "REVOKE")
    assert f"revoked</span> {_n(_utc(revocation.at_ms))}" in row.group(0)


def _absent(built: ConsortiumLog, site: str) -> int:
    return sum(s == site for s, _ in built.absent)


def _n(text: str) -> str:
    return f'<span class="n">{text}</span>'


def test_each_site_row_names_the_dataset_root_it_used_in_which_rounds(rendered: Rendered) -> None:
    built = rendered.built
    switcher = built.sites[ROOT_SWITCHER]
    row = re.search(
        rf"<tr><td class=\"n\">{switcher}</td>.*?</tr>", _section(rendered.page, "sites")
    )
    assert row is not None
    old, new = (r.hex() for r in built.roots[switcher])
    half = built.rounds // 2
    used = re.findall(r'<div><code title="([0-9a-f]{64})">[0-9a-f]{12}…</code>: ([0-9–, ]+)</div>',
                      row.group(0))  # fmt: skip
    rounds = {root: _expand(r) for root, r in used}
    assert set(rounds) == {old, new}
    absent = {rnd for site, rnd in built.absent if site == switcher}
    assert rounds[old] == [r for r in range(1, half + 1) if r not in absent]
    assert rounds[new] == [r for r in range(half + 1, built.rounds + 1) if r not in absent]


def test_rejections_and_failed_rounds_are_listed_with_their_reasons(rendered: Rendered) -> None:
    section = _section(rendered.page, "rejections")
    built = rendered.built
    n_rejected = built.rounds + len(built.rejected)
    assert f"Rejected envelopes, one by one ({n_rejected})" in section
    assert f"<td>{built.failed_round}</td>" in section and FAILED_REASON in section
    # The chart counts each reason: the outsider's every round, the unapproved root once.
    assert re.search(
        rf"{re.escape(html.escape(OUTSIDER_REASON))}</text>.*?>{built.rounds}</text>", section
    )
    assert re.search(r"dataset root not approved</text>.*?>1</text>", section)
    rounds = _section(rendered.page, "rounds")
    assert f"failed</span>: {FAILED_REASON}" in rounds


def test_what_was_produced_lists_every_checkpoint_and_the_final_model(rendered: Rendered) -> None:
    entries = _entries(rendered.built)
    section = _section(rendered.page, "produced")
    checkpoints = [e for e in entries if isinstance(e, Checkpoint)]
    assert len(checkpoints) == rendered.built.rounds - 1
    for c in checkpoints:
        assert c.name in section and c.model_digest.hex() in section
        assert c.file_digest.hex() in section
    end = next(e for e in entries if isinstance(e, RunEnd))
    assert end.final_model_digest.hex() in section
    assert section.count("<polyline") == 3  # accuracy and macro-F1; loss


def test_a_dp_runs_budget_and_epsilon_per_round_are_in_the_record(small: Rendered) -> None:
    with MerkleLogStore.open(small.built.path, read_only=True) as store:
        view = collect_view(store)
    eps = [r.dp_epsilon for r in view.rounds]
    assert all(e is not None for e in eps) and eps == sorted(eps)  # type: ignore[type-var]
    rounds = _section(small.page, "rounds")
    for e in eps:
        assert f"<td>{e:.4g}</td>" in rounds
    assert "DP z = 2, colluders 0" in rounds  # the noise the sites signed for
    assert f"ε = {eps[-1]:.3g} at δ = 1e-05" in _section(small.page, "summary")


def test_untrusted_site_names_and_reasons_are_escaped_and_the_page_loads_nothing(
    rendered: Rendered,
) -> None:
    page = rendered.page
    for raw in (OUTSIDER, OUTSIDER_REASON, REVOKE_REASON):
        assert raw not in page and html.escape(raw) in page
    assert "<script" not in page.lower() and "<img" not in page.lower()
    without_ns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for loader in ("http:", "https:", "src=", "<link", "@import", "url("):
        assert loader not in without_ns.replace("src=x", ""), loader


def test_past_250_sites_the_chart_draws_the_sites_that_missed_a_round_and_says_so(
    tmp_path: Path,
) -> None:
    rendered = _render(tmp_path, 300, 2, None)
    chart = _section(rendered.page, "participation")
    labels = [
        html.unescape(x) for x in re.findall(r'text-anchor="end"><title>(.*?)</title>', chart)
    ]
    missed = {
        site for (site, _), state in _expected_cells(rendered.built).items() if state != "in-sum"
    }
    assert labels == sorted(missed) and 10 < len(labels) < 300
    assert f"301 sites: only the {len(labels)} that missed a round are drawn" in chart
    assert "hospital-300" in _section(rendered.page, "sites")  # the table lists every site


def test_a_log_without_a_run_renders_a_record_that_says_so(tmp_path: Path) -> None:
    from fedseal.audit.writer import AuditLog
    from fedseal.crypto.keys import generate_identity_key

    log = AuditLog.open(tmp_path / "a.sqlite", signer=generate_identity_key(), now_ms=1,
                        log_id=bytes(16))  # fmt: skip
    log.sign_tree_head(2)
    log.close()
    with MerkleLogStore.open(tmp_path / "a.sqlite", read_only=True) as store:
        page = render_report(collect_view(store), "empty", "not checked")
    assert "This log records no run." in page and "No masked inputs recorded." in page
    assert "No rejections." in page and "No site in this log." in page


# -- the browser check --------------------------------------------------------------------------


def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )


def _png_pixels(data: bytes) -> npt.NDArray[np.uint8]:
    """The RGB pixels of an 8-bit, non-interlaced RGB or RGBA PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.uint8)
    for y in range(h):  # PNG filters (RFC 2083 §6)
        kind, line = int(raw[y, 0]), raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:
            row = np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            row = line + prev
        else:
            cur, up = [0] * (w * bpp), prev.tolist()
            for i, x in enumerate(line.tolist()):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    cur[i] = (x + ((a + b) >> 1)) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (x + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            row = np.array(cur, np.uint8)
        out[y], prev = row, row
    return out.reshape(h, w, bpp)[:, :, :3]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["small", "big"])
def test_the_report_renders_in_headless_chromium_with_its_charts_drawn(
    which: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no headless browser: `apt-get install -y --no-install-recommends chromium` "
            "(Debian) to check the report renders"
        )
    rendered: Rendered = request.getfixturevalue(which)
    shots = tmp_path_factory.getbasetemp() / "report-screenshots"
    shots.mkdir(exist_ok=True)
    shot = shots / f"report-{which}.png"
    profile = tmp_path_factory.mktemp(f"chromium-{which}")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
         f"--screenshot={shot}", "--window-size=1400,3000", rendered.html_path.as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    print(f"\nscreenshot of the {which} report: {shot}")
    pixels = _png_pixels(shot.read_bytes())
    assert pixels.shape == (3000, 1400, 3)
    flat = pixels.reshape(-1, 3)
    drawn = np.any(flat != 255, axis=1).mean()
    assert drawn > 0.03, f"the page looks blank: {drawn:.1%} of its pixels are not white"

    def count(hex_color: str) -> int:
        rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
        return int(np.all(flat == rgb, axis=1).sum())

    # The participation chart is drawn: its bars' colours fill many pixels.
    assert count("#2ca02c") > 2000  # in the sum
    assert count("#d62728") > 100  # rejected
    assert count("#98df8a") > 100  # accepted in the failed round
    if which == "big":
        assert count("#ff9f1c") > 100  # absent
