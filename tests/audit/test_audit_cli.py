"""fl-audit commands: exit codes, JSON output, proofs that verify, a self-contained report."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from fedseal.crypto import merkle
from fedseal.crypto.keys import generate_identity_key, save_public_key
from fedseal.protocol.audit import EnvelopeRecord, SignedTreeHead, decode_entry
from fedseal.server.audit_cli import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNREADABLE,
    app,
)
from tests.audit.logbuilder import BuiltLog, build_run_log

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    return build_run_log(tmp_path_factory.mktemp("cli") / "audit.sqlite")


def test_verify_exits_zero_and_reports_counts_for_a_good_log(
    built: BuiltLog, tmp_path: Path
) -> None:
    key = tmp_path / "coordinator.pub.pem"
    save_public_key(built.coordinator.public_key(), key)
    result = runner.invoke(
        app, ["verify", str(built.path), "--json", "--jobs", "1", "--coordinator-key", str(key)]
    )
    assert result.exit_code == EXIT_OK, result.output
    out = json.loads(result.output)
    assert out["ok"] and out["entries"] == 40 and out["runs"][0]["completed_rounds"] == 3


def test_verify_accepts_a_matching_trusted_roster_file(built: BuiltLog, tmp_path: Path) -> None:
    roster = {
        "sites": [
            {
                "site": s,
                "public_key_pem": k.public_key()
                .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
                .decode(),
                "approved_roots": [built.roots[s].hex()],
            }
            for s, k in built.sites.items()
        ]
    }
    path = tmp_path / "roster.json"
    path.write_text(json.dumps(roster))
    result = runner.invoke(app, ["verify", str(built.path), "--roster", str(path), "--jobs", "1"])
    assert result.exit_code == EXIT_OK, result.output
    path.write_text("{not json")
    result = runner.invoke(app, ["verify", str(built.path), "--roster", str(path)])
    assert result.exit_code == EXIT_UNREADABLE


def test_verify_names_the_first_bad_entry_and_exits_one(built: BuiltLog, tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite"
    shutil.copy(built.path, path)
    conn = sqlite3.connect(path)
    (data,) = conn.execute("SELECT data FROM entries WHERE idx=14").fetchone()
    conn.execute("UPDATE entries SET data=? WHERE idx=14", (data[:-1] + bytes([data[-1] ^ 1]),))
    conn.commit()
    conn.close()
    result = runner.invoke(app, ["verify", str(path), "--json", "--jobs", "2"])
    assert result.exit_code == EXIT_FAILED
    out = json.loads(result.output)
    assert out == {**out, "ok": False, "index": 14, "check": "leaf-hash", "entry_type": "envelope"}
    text = runner.invoke(app, ["verify", str(path)])
    assert text.exit_code == EXIT_FAILED and "entry 14 (envelope): leaf-hash" in text.output


def test_verify_of_a_missing_or_foreign_file_exits_four(tmp_path: Path) -> None:
    assert (
        runner.invoke(app, ["verify", str(tmp_path / "nope.sqlite")]).exit_code == EXIT_UNREADABLE
    )
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"garbage" * 1000)
    assert runner.invoke(app, ["verify", str(junk)]).exit_code == EXIT_UNREADABLE


def test_strict_verify_flags_a_run_that_has_not_ended(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "open.sqlite", rounds=1, end_run=False)
    assert runner.invoke(app, ["verify", str(built.path)]).exit_code == EXIT_OK
    result = runner.invoke(app, ["verify", str(built.path), "--strict"])
    assert result.exit_code == EXIT_INCOMPLETE
    assert "has not ended" in result.output


def test_prove_prints_an_inclusion_proof_that_verifies_against_the_signed_head(
    built: BuiltLog,
) -> None:
    result = runner.invoke(
        app, ["prove", str(built.path), "--site", "site-b", "--round", "2", "--json"]
    )
    assert result.exit_code == EXIT_OK, result.output
    out = json.loads(result.output)
    assert out["leaf_index"] == built.input_index[("site-b", 2)]
    head = SignedTreeHead.from_bytes(base64.b64decode(out["signed_tree_head_b64"]))
    head.verify(built.coordinator.public_key())
    entry = base64.b64decode(out["entry_b64"])
    merkle.verify_inclusion(
        merkle.leaf_hash(entry),
        out["leaf_index"],
        head.tree_size,
        [bytes.fromhex(h) for h in out["audit_path"]],
        head.root_hash,
    )
    record = decode_entry(entry)
    assert isinstance(record, EnvelopeRecord) and record.site == "site-b" and record.accepted


def test_prove_for_a_rejected_input_exits_one(built: BuiltLog) -> None:
    # site-a's round-2 input was rejected (unapproved dataset root).
    result = runner.invoke(app, ["prove", str(built.path), "--site", "site-a", "--round", "2"])
    assert result.exit_code == EXIT_FAILED


def test_consistency_prints_a_proof_between_two_sizes(built: BuiltLog) -> None:
    result = runner.invoke(app, ["consistency", str(built.path), "16", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    out = json.loads(result.output)
    merkle.verify_consistency(
        16, out["new_size"], bytes.fromhex(out["old_root"]), bytes.fromhex(out["new_root"]),
        [bytes.fromhex(h) for h in out["proof"]],
    )  # fmt: skip
    assert runner.invoke(app, ["consistency", str(built.path), "999"]).exit_code == EXIT_FAILED


def test_show_prints_rounds_rejections_and_tree_heads(built: BuiltLog) -> None:
    result = runner.invoke(app, ["show", str(built.path)])
    assert result.exit_code == EXIT_OK
    for text in (
        "Rounds",
        "Rejected envelopes",
        "dataset root not approved",
        "site revoked",
        "Signed tree heads",
    ):
        assert text in result.output


def test_report_writes_a_self_contained_html_page_with_plots(
    built: BuiltLog, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(built.path), "--out", str(out)])
    assert result.exit_code == EXIT_OK, result.output
    page = out.read_text()
    assert page.count("<svg") == 4
    assert (
        "all checks hold" in page
        and "<script" not in page
        and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    )
    assert "dataset root not approved" in page and "polyline" in page


def test_export_writes_one_json_object_per_entry_and_tree_head(
    built: BuiltLog, tmp_path: Path
) -> None:
    out = tmp_path / "log.jsonl"
    result = runner.invoke(app, ["export", str(built.path), "--format", "jsonl", "--out", str(out)])
    assert result.exit_code == EXIT_OK
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines if "index" in x] == list(range(40))
    assert sum("tree_head" in x for x in lines) == 5
    assert lines[0]["entry"]["type"] == "genesis"
    assert runner.invoke(app, ["export", str(built.path), "--format", "csv"]).exit_code == 2


def test_every_command_has_help() -> None:
    for command in ("verify", "prove", "consistency", "show", "report", "export"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_a_pinned_key_file_that_cannot_be_read_exits_four(built: BuiltLog, tmp_path: Path) -> None:
    bad = tmp_path / "k.pem"
    bad.write_text("nope")
    assert (
        runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(bad)]).exit_code
        == EXIT_UNREADABLE
    )
    other = tmp_path / "other.pem"
    save_public_key(generate_identity_key().public_key(), other)
    assert (
        runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(other)]).exit_code
        == EXIT_FAILED
    )


def test_verify_accepts_the_coordinators_roster_file_as_the_trusted_roster(
    built: BuiltLog, tmp_path: Path
) -> None:
    from fedseal.server.roster import Roster as ServerRoster

    roster = ServerRoster.load_or_create(tmp_path / "roster.json")
    for s, k in sorted(built.sites.items()):
        roster = roster.enroll(s, k.public_key(), [built.roots[s].hex()], now_ms=1)
    roster.save(tmp_path / "roster.json")
    result = runner.invoke(
        app, ["verify", str(built.path), "--roster", str(tmp_path / "roster.json")]
    )
    assert result.exit_code == EXIT_OK, result.output


def test_worker_processes_report_a_bad_signature_at_its_entry(
    built: BuiltLog, tmp_path: Path
) -> None:
    import dataclasses

    from fedseal.protocol.audit import encode_entry

    path = tmp_path / "bad.sqlite"
    shutil.copy(built.path, path)
    i, j = built.input_index[("site-a", 3)], built.input_index[("site-b", 3)]
    conn = sqlite3.connect(path)
    ei, ej = (
        decode_entry(conn.execute("SELECT data FROM entries WHERE idx=?", (k,)).fetchone()[0])
        for k in (i, j)
    )
    assert isinstance(ei, EnvelopeRecord) and isinstance(ej, EnvelopeRecord)
    forged = encode_entry(dataclasses.replace(ei, signature=ej.signature))
    conn.execute(
        "UPDATE entries SET data=?, leaf_hash=? WHERE idx=?", (forged, merkle.leaf_hash(forged), i)
    )
    conn.commit()
    conn.close()
    result = runner.invoke(app, ["verify", str(path), "--json", "--jobs", "2"])
    assert result.exit_code == EXIT_FAILED
    out = json.loads(result.output)
    assert (out["index"], out["check"]) == (i, "signature")
