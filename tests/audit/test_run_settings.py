"""A run start carries the run settings the coordinator declares (canonical JSON, a tagged
trailing section after the DP budget), so a report can say how a run was configured; logs
without them keep their bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import RunStart, canonical_settings
from fedseal.protocol.errors import DecodeError
from tests.audit.logbuilder import digest

PLAIN = RunStart(digest("r")[:16], digest("c"), digest("ro"), digest("m"), "v", 5, 3)
SETTINGS = canonical_settings({"strategy": "FedAdam", "rounds": 3, "dp": {"epsilon": 8.0}})


def test_settings_follow_the_dp_budget_and_older_entries_keep_their_bytes() -> None:
    both = dataclasses.replace(PLAIN, dp_budget=(8.0, 1e-6), settings=SETTINGS)
    assert decode_entry(encode_entry(both)) == both
    only = dataclasses.replace(PLAIN, settings=SETTINGS)
    assert decode_entry(encode_entry(only)) == only
    assert encode_entry(only)[: len(encode_entry(PLAIN))] == encode_entry(PLAIN)


@pytest.mark.parametrize(
    "text", ['{"b":1, "a":2}', '{"b":1,"a":2}', "[1,2]", '{"a":NaN}', "not json"]
)
def test_settings_that_are_not_one_canonical_json_object_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="settings"):
        dataclasses.replace(PLAIN, settings=text)


def test_sections_out_of_order_twice_or_empty_do_not_decode() -> None:
    base = encode_entry(PLAIN)
    settings = SETTINGS.encode()
    section = b"\x02" + len(settings).to_bytes(2, "big") + settings  # text: u16 length (Writer)
    dp = b"\x01" + bytes(16)
    for bad in (base + section + dp, base + section + section, base + b"\x02\x00\x00", base + b"\x03"):
        with pytest.raises(DecodeError):
            decode_entry(bad)


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.booleans()), max_size=6))
def test_any_settings_object_round_trips_canonically(doc: dict[str, object]) -> None:
    entry = dataclasses.replace(PLAIN, settings=canonical_settings(doc))
    assert json.loads(decode_entry(encode_entry(entry)).settings) == doc  # type: ignore[union-attr]


def test_a_coordinators_run_start_declares_its_settings_and_the_report_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedseal.audit.cli import app
    from fedseal.audit.store import MerkleLogStore
    from tests.server._fedgrid import Federated

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    fx = Federated(tmp_path, ["site-a", "site-b", "site-c"], secure=True, rounds=1, min_sites=3)
    fx.run(monkeypatch)
    log = fx.cfg.coordinator.state_dir / "audit.sqlite"
    with MerkleLogStore.open(log, read_only=True) as store:
        start = next(e for e in map(decode_entry, (x.data for x in store.iter_entries())) if isinstance(e, RunStart))
    declared = json.loads(start.settings)
    assert declared["strategy"] == "FedAvg" and declared["rounds"] == 1 and declared["min_sites"] == 3
    assert declared["secure"] is True and "dp" not in declared
    from typer.testing import CliRunner

    out = tmp_path / "report.html"
    pub = fx.cfg.coordinator.key.with_suffix(".pub")
    res = CliRunner().invoke(app, ["report", str(log), "--coordinator-key", str(pub), "--out", str(out)])
    assert out.exists(), res.output
    html = out.read_text()
    assert "settings the coordinator declared" in html and "strategy: FedAvg" in html and "min_sites: 3" in html
