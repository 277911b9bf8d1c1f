"""Regressions from an attack review of ``fl-audit``: an unsigned tail, a corrupt SQLite file, a
symlinked log, duplicated tree heads, hostile strings, evaluation claims, unwitnessed entries."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_UNREADABLE, app
from fedseal.audit.codec import encode_entry, entry_tags
from fedseal.audit.entries import EntryKind, Evaluation, RosterAction, RosterChange
from fedseal.audit.errors import AuditVerificationError
from fedseal.audit.store import MerkleLogStore, wal_file
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import generate_identity_key, public_key_to_der, save_public_key
from tests.audit.logbuilder import CLOCK0, BuiltLog, build_run_log, digest

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


def _pub(built: BuiltLog, tmp_path: Path) -> str:
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    return str(pub)


def _append_unsigned(path: Path, *entries: RosterChange) -> None:
    """What anyone with write access to the file can do: append entries, no key needed."""
    with MerkleLogStore.open(path) as store:
        for e in entries:
            kind, site, rnd = entry_tags(e)
            store.append(kind, encode_entry(e), site=site, round=rnd)


def _revoke_and_enrol() -> tuple[RosterChange, RosterChange]:
    key = public_key_to_der(generate_identity_key().public_key())
    return (
        RosterChange(RosterAction.REVOKE, "site-a", reason="fraud detected by auditor"),
        RosterChange(RosterAction.ENROL, "site-z", public_key_der=key),
    )


def _witness(path: Path, blobs: list[bytes], site: str = "site-a") -> Path:
    import base64

    from fedseal.audit.treehead import SignedTreeHead

    with path.open("w") as fh:
        for blob in blobs:
            h = SignedTreeHead.from_bytes(blob)
            record = {
                "site": site, "log_id": h.log_id.hex(), "tree_size": h.tree_size,
                "root_hash": h.root_hash.hex(), "timestamp_ms": h.timestamp_ms,
                "sth_b64": base64.b64encode(blob).decode(),
            }  # fmt: skip
            fh.write(json.dumps(record) + "\n")
    return path


def _head_blobs(path: Path) -> list[bytes]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT blob FROM tree_heads ORDER BY seq")]
    finally:
        conn.close()


# --- 1: an unsigned tail --------------------------------------------------------------------


def test_verify_fails_on_unsigned_entries_after_the_run_ended(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    pub = _pub(built, tmp_path)
    _append_unsigned(built.path, *_revoke_and_enrol())
    result = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", pub])
    assert result.exit_code == EXIT_FAILED, result.output
    assert "entries 40..41 follow the last signed tree head" in result.stderr
    assert "UNSIGNED" in result.stderr
    out = json.loads(
        runner.invoke(app, ["verify", str(built.path), "--coordinator-key", pub, "--json"]).stdout
    )
    assert not out["ok"] and out["check"] == "unsigned-tail" and out["index"] == 40
    # A live coordinator between runs: --allow-open qualifies it (3), never 0.
    allowed = runner.invoke(
        app, ["verify", str(built.path), "--coordinator-key", pub, "--allow-open"]
    )
    assert allowed.exit_code == EXIT_INCOMPLETE
    assert "entries 40..41" in allowed.stderr


def test_verify_names_the_unsigned_entries_of_an_open_run_and_exits_three(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=1, end_run=False)
    pub = _pub(built, tmp_path)
    with MerkleLogStore.open(built.path, read_only=True) as store:
        n = store.size
    _append_unsigned(built.path, _revoke_and_enrol()[1])
    result = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", pub])
    assert result.exit_code == EXIT_INCOMPLETE, result.output
    args = ["verify", str(built.path), "--coordinator-key", pub, "--allow-open", "--json"]
    allowed = runner.invoke(app, args)
    assert allowed.exit_code == EXIT_OK
    out = json.loads(allowed.stdout)
    signed = out["signed_entries"]
    assert signed < n and out["entries"] == n + 1
    assert out["unsigned_entries"] == {"first": signed, "last": n}
    assert f"entries {signed}..{n} follow the last signed tree head" in result.stderr


def test_show_and_report_present_only_signed_entries(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    pub = _pub(built, tmp_path)
    _append_unsigned(built.path, *_revoke_and_enrol())
    shown = runner.invoke(app, ["show", str(built.path)], env=WIDE)
    assert shown.exit_code == EXIT_OK, shown.output
    assert "40 signed entries (of 42)" in shown.stdout
    assert "UNSIGNED" in shown.stdout and "site-z" not in shown.stdout
    out = tmp_path / "r.html"
    report = runner.invoke(
        app, ["report", str(built.path), "--out", str(out), "--coordinator-key", pub]
    )
    assert report.exit_code == EXIT_FAILED
    page = out.read_text()
    assert "40 signed entries" in page and "UNSIGNED" in page and "site-z" not in page


# --- 5: the SQLite file itself ------------------------------------------------------------


def test_verify_rejects_an_entries_row_at_a_negative_index(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    conn = sqlite3.connect(built.path)
    conn.execute(
        "INSERT INTO entries(idx, kind, site, round, data, leaf_hash) SELECT -1, kind, site, "
        "round, data, leaf_hash FROM entries WHERE kind=3 AND site='site-b' AND round=1 "
        "ORDER BY idx DESC LIMIT 1"
    )
    conn.commit()
    conn.close()
    with pytest.raises(AuditVerificationError, match="numbered from 0"):
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    with MerkleLogStore.open(built.path, read_only=True) as store:  # look-ups ignore it too
        assert -1 not in store.find(int(EntryKind.ENVELOPE), site="site-b", round=1)


def test_verify_rejects_an_index_redeclared_through_writable_schema(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    conn = sqlite3.connect(built.path)
    conn.execute("PRAGMA writable_schema=ON")
    conn.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX entries_by_kind ON entries (kind, site, "
        "round)' WHERE name='entries_by_kind'"
    )
    conn.commit()
    conn.close()
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert err.value.check == "integrity"


def test_verify_rejects_an_extra_index_on_the_entries_table(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    conn = sqlite3.connect(built.path)
    conn.execute("CREATE INDEX sneaky ON entries (site)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditVerificationError, match="schema"):
        verify_log(built.path, coordinator_key=built.coordinator.public_key())


# --- 8: a symlinked log ---------------------------------------------------------------------


def test_verify_sees_the_wal_file_beside_the_real_file_of_a_symlinked_log(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").mkdir()
    built = build_run_log(tmp_path / "real" / "audit.sqlite")
    pub = _pub(built, tmp_path)
    link = tmp_path / "link" / "audit.sqlite"
    link.symlink_to(built.path)
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=CLOCK0 + 10**6)
    try:
        log.append_roster_change(
            RosterAction.ENROL, "site-z",
            public_key_der=public_key_to_der(generate_identity_key().public_key()),
            approved_roots=[digest("root", "z")], now_ms=CLOCK0 + 10**6,
        )  # fmt: skip
        log.sign_tree_head(CLOCK0 + 10**6)
        assert wal_file(built.path).stat().st_size > 0
        result = runner.invoke(app, ["verify", str(link), "--coordinator-key", pub])
        assert result.exit_code == EXIT_INCOMPLETE, result.output
        assert "exists beside the log" in result.stderr
    finally:
        log.close()


# --- 9: duplicate tree heads ----------------------------------------------------------------


def test_verify_rejects_a_duplicated_signed_tree_head_row(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    conn = sqlite3.connect(built.path)
    conn.execute(
        "INSERT INTO tree_heads(seq, tree_size, root_hash, timestamp_ms, blob) SELECT 6, "
        "tree_size, root_hash, timestamp_ms, blob FROM tree_heads WHERE seq=5"
    )
    conn.commit()
    conn.close()
    with pytest.raises(AuditVerificationError) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert err.value.check == "tree-head-duplicate" and err.value.tree_head_seq == 6


# --- 6: hostile strings ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["site-c[/]", "site-c\x1b[8m hidden\x1b[0m", "[bold]x[/bold]"])
def test_show_escapes_markup_and_control_characters_from_the_log(tmp_path: Path, name: str) -> None:
    path = tmp_path / "audit.sqlite"
    key = generate_identity_key()
    log = AuditLog.open(path, signer=key, now_ms=CLOCK0, log_id=digest("log")[:16])
    try:
        log.append_roster_change(
            RosterAction.ENROL, name,
            public_key_der=public_key_to_der(generate_identity_key().public_key()),
            approved_roots=[digest("root")], now_ms=CLOCK0,
        )  # fmt: skip
        log.sign_tree_head(CLOCK0 + 1)
    finally:
        log.close()
    result = runner.invoke(app, ["show", str(path)], env=WIDE)
    assert result.exit_code == EXIT_OK, result.output
    assert "\x1b" not in result.stdout
    shown = name.replace("\x1b", "\\x1b")
    assert shown in result.stdout


def test_a_witness_line_whose_site_is_not_a_site_id_is_refused(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    pub = _pub(built, tmp_path)
    spoof = "site-a\x1b[2K\r\x1b[32mOK: witnesses consistent\x1b[8m"
    w = _witness(tmp_path / "w.heads", _head_blobs(built.path)[:1], site=spoof)
    result = runner.invoke(
        app, ["verify", str(built.path), "--coordinator-key", pub, "--witness", str(w)]
    )
    assert result.exit_code == EXIT_UNREADABLE
    assert "is not a site id" in result.stderr and "\x1b" not in result.stderr


# --- 4: evaluation claims -------------------------------------------------------------------


def test_show_takes_evaluation_columns_only_from_evaluation_entries(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")  # round results carry metrics, no evaluation
    result = runner.invoke(app, ["show", str(built.path)], env=WIDE)
    assert result.exit_code == EXIT_OK
    for round_metric in ("0.6000", "0.7000", "0.8000", "0.3333"):
        assert round_metric not in result.stdout
    with_eval = build_run_log(tmp_path / "eval.sqlite", evaluations=True)
    result = runner.invoke(app, ["show", str(with_eval.path)], env=WIDE)
    assert "0.9000" in result.stdout  # round 3's evaluation: accuracy 0.6 + 0.1 * 3


@pytest.mark.parametrize(
    ("metrics", "examples", "sites", "why"),
    [
        ((("accuracy", 1_500_000),), 100, ("site-a",), "outside"),
        ((("macro-f1", -1),), 100, ("site-a",), "outside"),
        ((("loss", -5),), 100, ("site-a",), "< 0"),
        ((("accuracy", 900_000),), 10**15, ("site-a",), "examples"),
        ((("accuracy", 900_000),), 100, ("site-d",), "revoked"),
        ((("accuracy", 900_000),), 100, (), "no site"),
    ],
)
def test_verify_rejects_an_implausible_evaluation(
    tmp_path: Path,
    metrics: tuple[tuple[str, int], ...],
    examples: int,
    sites: tuple[str, ...],
    why: str,
) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", rounds=3, end_run=False)
    forged = Evaluation(built.run_id, 3, built.models[-1], examples, sites, metrics)
    with MerkleLogStore.open(built.path) as store:
        index = store.append(int(EntryKind.EVALUATION), encode_entry(forged), round=3)
    with pytest.raises(AuditVerificationError, match=why) as err:
        verify_log(built.path, coordinator_key=built.coordinator.public_key())
    assert err.value.index == index and err.value.check == "evaluation"


# --- 2: entries no witness covers ---------------------------------------------------------


def test_verify_and_report_name_the_entries_no_witness_covers(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite")
    pub = _pub(built, tmp_path)
    blobs = _head_blobs(built.path)
    w = _witness(tmp_path / "w.heads", blobs[:-1])  # no site sees the run end's tree head
    from fedseal.audit.treehead import SignedTreeHead

    seen = SignedTreeHead.from_bytes(blobs[-2]).tree_size
    args = ["verify", str(built.path), "--coordinator-key", pub, "--witness", str(w)]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_OK, result.output
    assert f"entries {seen}..39 are witnessed by no site" in result.stdout
    out = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert out["unwitnessed_entries"] == {"first": seen, "last": 39}
    full = _witness(tmp_path / "all.heads", blobs)
    out = json.loads(runner.invoke(app, [*args[:-1], str(full), "--json"]).stdout)
    assert out["unwitnessed_entries"] is None
    page = tmp_path / "r.html"
    report = runner.invoke(
        app,
        ["report", str(built.path), "--out", str(page), "--coordinator-key", pub,
         "--witness", str(w)],
    )  # fmt: skip
    assert report.exit_code == EXIT_OK, report.output
    assert f"entries {seen}..39 are witnessed by no site" in page.read_text()


def test_a_copied_demo_like_log_without_a_tail_still_verifies(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "audit.sqlite", evaluations=True)
    copy = tmp_path / "copy.sqlite"
    shutil.copy(built.path, copy)
    result = runner.invoke(app, ["verify", str(copy), "--coordinator-key", _pub(built, tmp_path)])
    assert result.exit_code == EXIT_OK, result.output
