"""The live view of fl-server run: round lines always, a progress bar only on a terminal."""

from __future__ import annotations

import io
import re

from rich.console import Console

from fedseal.server.live import LiveView, describe_status, round_line


def test_the_status_names_the_round_and_protocol_stage() -> None:
    assert describe_status({"phase": "waiting-for-sites", "round": 0}) == "waiting for enrolled sites"
    assert describe_status({"phase": "training", "round": 3, "stage": "masked-input"}) == "round 3: masked-input"
    assert describe_status({"phase": "training", "round": 3}) == "round 3"
    assert describe_status({}) == "starting"


def test_a_round_line_carries_outcome_sites_accuracy_and_time() -> None:
    line = round_line(
        {"round": 2, "outcome": "committed", "accepted": 3, "sampled": 4, "accuracy": 0.91234,
         "macro_f1": 0.9, "seconds": 12.34}
    )
    assert line.startswith("round 2: committed  sites 3/4  accuracy 0.9123")
    assert line.endswith("(12.3s)")
    assert "accuracy" not in round_line({"round": 2, "outcome": "abandoned", "accepted": 0, "sampled": 0})


def test_off_a_terminal_only_the_round_lines_are_printed() -> None:
    out = io.StringIO()
    with LiveView(Console(file=out, force_terminal=False, width=120), total_rounds=2) as view:
        view.status({"phase": "training", "round": 1, "stage": "advertise"})
        view.round({"round": 1, "outcome": "committed", "accepted": 3, "sampled": 3, "seconds": 1.0})
    text = out.getvalue()
    assert "round 1: committed" in text and "advertise" not in text


def test_on_a_terminal_the_bar_shows_the_current_stage_and_rounds_done() -> None:
    out = io.StringIO()
    with LiveView(Console(file=out, force_terminal=True, width=120), total_rounds=5) as view:
        view.status({"phase": "training", "round": 2, "stage": "unmask"})
        view.round({"round": 1, "outcome": "committed", "accepted": 3, "sampled": 3, "seconds": 1.0})
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "round 2: unmask" in text and "1/5" in text and "round 1: committed" in text


def test_the_operators_round_line_names_every_site_not_in_the_sum() -> None:
    rec = {
        "round": 2, "outcome": "committed", "accepted": 2, "sampled": 3, "seconds": 1.5,
        "absent": {"site-c": "rejected at masked-input: dataset root ab12 of site-c was withdrawn"},
    }  # fmt: skip
    line = round_line(rec)
    assert line.startswith("round 2: committed  sites 2/3")
    assert line.endswith("; not in the sum: site-c (rejected at masked-input: dataset root ab12 of site-c was withdrawn)")
    assert round_line({k: v for k, v in rec.items() if k != "absent"}).endswith("(1.5s)")
