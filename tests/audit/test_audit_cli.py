"""fl-audit commands: exit codes, JSON output, proofs that verify, a self-contained report."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from typer.testing import CliRunner

from fedseal.audit.cli import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    app,
)
from fedseal.audit.codec import decode_entry
from fedseal.audit.entries import EnvelopeRecord
from fedseal.audit.treehead import SignedTreeHead
from fedseal.crypto import merkle
from fedseal.crypto.keys import generate_identity_key, key_id, save_public_key
from tests.audit.logbuilder import BuiltLog, build_run_log

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltLog:
    return build_run_log(tmp_path_factory.mktemp("cli") / "audit.sqlite")


def anchor(pub: str) -> list[str]:
    return ["--coordinator-key", pub]


@pytest.fixture(scope="module")
def pub(built: BuiltLog, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The coordinator's public key file: the auditor's trust anchor."""
    path = tmp_path_factory.mktemp("anchor") / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), path)
    return str(path)


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


def test_verify_accepts_a_matching_trusted_roster_file(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
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
    result = runner.invoke(
        app,
        ["verify", str(built.path), "--roster", str(path), "--jobs", "1", "--coordinator-key", pub],
    )
    assert result.exit_code == EXIT_OK, result.output
    path.write_text("{not json")
    result = runner.invoke(
        app, ["verify", str(built.path), "--roster", str(path), "--coordinator-key", pub]
    )
    assert result.exit_code == EXIT_UNREADABLE


def test_verify_names_the_first_bad_entry_and_exits_one(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.sqlite"
    shutil.copy(built.path, path)
    conn = sqlite3.connect(path)
    (data,) = conn.execute("SELECT data FROM entries WHERE idx=14").fetchone()
    conn.execute("UPDATE entries SET data=? WHERE idx=14", (data[:-1] + bytes([data[-1] ^ 1]),))
    conn.commit()
    conn.close()
    result = runner.invoke(
        app, ["verify", str(path), "--json", "--jobs", "2", "--coordinator-key", pub]
    )
    assert result.exit_code == EXIT_FAILED
    out = json.loads(result.output)
    assert out == {**out, "ok": False, "index": 14, "check": "leaf-hash", "entry_type": "envelope"}
    text = runner.invoke(app, ["verify", str(path), "--coordinator-key", pub])
    assert text.exit_code == EXIT_FAILED and "entry 14 (envelope): leaf-hash" in text.output


def test_verify_of_a_missing_or_foreign_file_exits_four(pub: str, tmp_path: Path) -> None:
    assert (
        runner.invoke(
            app, ["verify", str(tmp_path / "nope.sqlite"), "--coordinator-key", pub]
        ).exit_code
        == EXIT_UNREADABLE
    )
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"garbage" * 1000)
    assert (
        runner.invoke(app, ["verify", str(junk), "--coordinator-key", pub]).exit_code
        == EXIT_UNREADABLE
    )


def test_verify_exits_three_on_a_run_that_has_not_ended_unless_allowed(tmp_path: Path) -> None:
    built = build_run_log(tmp_path / "open.sqlite", rounds=1, end_run=False)
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    result = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(pub)])
    assert result.exit_code == EXIT_INCOMPLETE, result.output
    assert "has not ended" in result.output
    allowed = ["verify", str(built.path), "--coordinator-key", str(pub), "--allow-open"]
    assert runner.invoke(app, allowed).exit_code == EXIT_OK
    result = runner.invoke(app, [*allowed, "--strict"])
    assert result.exit_code == EXIT_INCOMPLETE
    assert "has not ended" in result.output
    out = json.loads(runner.invoke(app, [*allowed[:-1], "--json"]).stdout)
    assert out["ok"] and out["exit_code"] == EXIT_INCOMPLETE and out["qualified"] == ["open-run"]


def test_prove_prints_an_inclusion_proof_that_verifies_against_the_signed_head(
    built: BuiltLog, pub: str
) -> None:
    result = runner.invoke(
        app,
        ["prove", str(built.path), "--site", "site-b", "--round", "2", "--json", *anchor(pub)],
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


def test_prove_for_a_rejected_input_exits_one(built: BuiltLog, pub: str) -> None:
    # site-a's round-2 input was rejected (unapproved dataset root).
    result = runner.invoke(
        app,
        ["prove", str(built.path), "--site", "site-a", "--round", "2", "--coordinator-key", pub],
    )
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


def test_report_writes_a_self_contained_html_page_with_plots(tmp_path: Path) -> None:
    # The accuracy and loss plots come from evaluation entries only (not round results).
    built = build_run_log(tmp_path / "eval.sqlite", evaluations=True)
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    out = tmp_path / "report.html"
    result = runner.invoke(
        app, ["report", str(built.path), "--out", str(out), "--coordinator-key", str(pub)]
    )
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


def test_verify_refuses_a_log_whose_genesis_names_another_key_naming_both_key_ids(
    built: BuiltLog, tmp_path: Path
) -> None:
    other_key = generate_identity_key()
    other = tmp_path / "other.pem"
    save_public_key(other_key.public_key(), other)
    result = runner.invoke(app, ["verify", str(built.path), "--coordinator-key", str(other)])
    assert result.exit_code == EXIT_FAILED
    log_kid = bytes(key_id(built.coordinator.public_key())).hex()
    pinned_kid = bytes(key_id(other_key.public_key())).hex()
    assert "coordinator-key" in result.output
    assert log_kid in result.output and pinned_kid in result.output


def test_a_log_forged_under_a_fresh_key_fails_against_the_pinned_key(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    # The attacker rebuilds the whole log under a key of its own: internally consistent.
    forged = build_run_log(tmp_path / "forged.sqlite", sites=built.sites, seed=7)
    result = runner.invoke(app, ["verify", str(forged.path), "--coordinator-key", pub])
    assert result.exit_code == EXIT_FAILED and "coordinator-key" in result.output
    # Against its own key it passes the checks, but never with exit 0, and says why.
    result = runner.invoke(app, ["verify", str(forged.path), "--trust-log-key"])
    assert result.exit_code == EXIT_INCOMPLETE
    assert "OK:" in result.stdout and "NOT pinned" in result.stdout
    assert "verified only against the log's own key" in result.stderr
    out = json.loads(
        runner.invoke(app, ["verify", str(forged.path), "--trust-log-key", "--json"]).stdout
    )
    assert out["trust_anchor"] == "log-key" and out["qualified"] == ["log-key-only"]
    assert out["coordinator_key_id"] == bytes(key_id(forged.coordinator.public_key())).hex()


@pytest.mark.parametrize("command", ["verify", "prove", "report"])
def test_commands_that_vouch_for_the_log_need_a_trust_anchor(
    built: BuiltLog, pub: str, tmp_path: Path, command: str
) -> None:
    extra = {
        "verify": [],
        "prove": ["--site", "site-b", "--round", "2"],
        "report": ["--out", str(tmp_path / "r.html")],
    }[command]
    result = runner.invoke(app, [command, str(built.path), *extra])
    assert result.exit_code == EXIT_USAGE
    assert "needs a trust anchor" in result.stderr and "--coordinator-key" in result.stderr
    both = [command, str(built.path), *extra, "--coordinator-key", pub, "--trust-log-key"]
    assert runner.invoke(app, both).exit_code == EXIT_USAGE
    unpinned = runner.invoke(app, [command, str(built.path), *extra, "--trust-log-key"])
    assert unpinned.exit_code == EXIT_INCOMPLETE, unpinned.output
    assert "verified only against the log's own key" in unpinned.stderr
    pinned = runner.invoke(app, [command, str(built.path), *extra, "--coordinator-key", pub])
    assert pinned.exit_code == EXIT_OK, pinned.output


def test_prove_checks_the_tree_head_signature_under_the_pinned_key(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    path = tmp_path / "resigned.sqlite"
    shutil.copy(built.path, path)
    conn = sqlite3.connect(path)
    seq, blob = conn.execute(
        "SELECT seq, blob FROM tree_heads ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    head = SignedTreeHead.from_bytes(blob)
    forged = SignedTreeHead.create(
        generate_identity_key(), log_id=head.log_id, tree_size=head.tree_size,
        root_hash=head.root_hash, timestamp_ms=head.timestamp_ms,
    )  # fmt: skip
    conn.execute("UPDATE tree_heads SET blob=? WHERE seq=?", (forged.to_bytes(), seq))
    conn.commit()
    conn.close()
    args = ["prove", str(path), "--site", "site-b", "--round", "2", "--coordinator-key", pub]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_FAILED and "does not verify" in result.stderr


def test_prove_against_a_size_no_tree_head_covers_exits_three(built: BuiltLog, pub: str) -> None:
    args = ["prove", str(built.path), "--site", "site-b", "--round", "1", "--coordinator-key", pub]
    result = runner.invoke(app, [*args, "--tree-size", "30"])
    assert result.exit_code == EXIT_INCOMPLETE and "(unsigned)" in result.stdout
    assert "no signed tree head covers size 30" in result.stderr


def test_verify_accepts_the_coordinators_roster_file_as_the_trusted_roster(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    from fedseal.server.roster import Enrolment as ServerRoster

    roster = ServerRoster.load_or_create(tmp_path / "roster.json")
    for s, k in sorted(built.sites.items()):
        roster = roster.enroll(s, k.public_key(), [built.roots[s].hex()], now_ms=1)
    roster.save(tmp_path / "roster.json")
    result = runner.invoke(
        app,
        ["verify", str(built.path), "--roster", str(tmp_path / "roster.json"), *anchor(pub)],
    )
    assert result.exit_code == EXIT_OK, result.output


def test_worker_processes_report_a_bad_signature_at_its_entry(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    import dataclasses

    from fedseal.audit.codec import encode_entry

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
    result = runner.invoke(
        app, ["verify", str(path), "--json", "--jobs", "2", "--coordinator-key", pub]
    )
    assert result.exit_code == EXIT_FAILED
    out = json.loads(result.output)
    assert (out["index"], out["check"]) == (i, "signature")


# --- the library under the commands: verdicts as values, nothing printed ----------------------


def test_verify_run_returns_the_verdict_as_a_value_and_prints_nothing(
    built: BuiltLog, pub: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedseal.audit.auditor import load_anchor
    from fedseal.audit.verify_run import prepare_verify, verify_run

    plan = prepare_verify(built.path, load_anchor("verify", Path(pub), False), jobs=1)
    assert plan.total == 40 and plan.wal_bytes == 0
    seen: list[int] = []

    @contextlib.contextmanager
    def track(total: int) -> Iterator[Callable[[int], None]]:
        seen.append(total)
        yield seen.append

    verdict = verify_run(plan, track=track)
    assert verdict.exit_code == EXIT_OK and verdict.warnings == ()
    assert verdict.lines[0].startswith("OK: 40 entries (40 signed)")
    assert seen[0] == 40 and seen[-1] == 40  # the tracker's total, then entries checked so far
    as_json = json.loads(verify_run(plan, as_json=True).lines[0])
    assert as_json["ok"] and as_json["exit_code"] == EXIT_OK
    assert capsys.readouterr() == ("", "")


def test_verify_run_under_the_logs_own_key_is_qualified_with_a_warning(built: BuiltLog) -> None:
    from fedseal.audit.auditor import load_anchor
    from fedseal.audit.verify_run import prepare_verify, verify_run

    plan = prepare_verify(built.path, load_anchor("verify", None, True), jobs=1)
    verdict = verify_run(plan)
    assert verdict.exit_code == EXIT_INCOMPLETE
    assert "the log's own, NOT pinned" in "\n".join(verdict.lines)
    (warning,) = verdict.warnings
    assert warning.startswith("fl-audit: warning: verified only against the log's own key")


def test_verify_run_names_the_first_bad_entry_as_a_failed_verdict(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    from fedseal.audit.auditor import load_anchor
    from fedseal.audit.verify_run import prepare_verify, verify_run

    path = tmp_path / "bad.sqlite"
    shutil.copy(built.path, path)
    conn = sqlite3.connect(path)
    (data,) = conn.execute("SELECT data FROM entries WHERE idx=14").fetchone()
    conn.execute("UPDATE entries SET data=? WHERE idx=14", (data[:-1] + bytes([data[-1] ^ 1]),))
    conn.commit()
    conn.close()
    plan = prepare_verify(path, load_anchor("verify", Path(pub), False), jobs=1)
    verdict = verify_run(plan)
    assert verdict.exit_code == EXIT_FAILED and verdict.lines == ()
    assert verdict.warnings[0].startswith("FAILED: entry 14 (envelope): leaf-hash")


def test_library_errors_carry_the_exit_code_and_message_of_the_command(
    built: BuiltLog, tmp_path: Path
) -> None:
    from fedseal.audit.auditor import AuditCommandError, load_anchor, open_log, prove_consistency

    with pytest.raises(AuditCommandError) as usage:
        load_anchor("verify", None, False)
    assert usage.value.exit_code == EXIT_USAGE and "verify needs a trust anchor" in str(usage.value)
    with pytest.raises(AuditCommandError) as missing:
        open_log(tmp_path / "nope.sqlite")
    assert missing.value.exit_code == EXIT_UNREADABLE
    assert missing.value.message.endswith("nope.sqlite: no such file")
    with pytest.raises(AuditCommandError) as failed:
        prove_consistency(built.path, 999)
    assert failed.value.exit_code == EXIT_FAILED
    assert failed.value.message.startswith("cannot prove consistency:")


def test_prove_inclusion_returns_a_checked_proof_and_qualifies_an_unsigned_root(
    built: BuiltLog, pub: str
) -> None:
    from fedseal.audit.auditor import load_anchor, prove_inclusion

    anchor_ = load_anchor("prove", Path(pub), False)
    verdict = prove_inclusion(built.path, anchor_, site="site-b", round=2, as_json=True)
    assert verdict.exit_code == EXIT_OK and verdict.warnings == ()
    out = json.loads(verdict.lines[0])
    assert out["leaf_index"] == built.input_index[("site-b", 2)] and out["signed_tree_head_b64"]
    index = built.input_index[("site-b", 2)]
    unsigned = prove_inclusion(built.path, anchor_, site="site-b", round=2, tree_size=index + 2)
    assert unsigned.exit_code == EXIT_INCOMPLETE and unsigned.lines[-1] == "proof verifies"
    assert "no signed tree head covers size" in unsigned.warnings[0]


def test_judge_report_states_a_failed_verification_as_a_verdict(
    built: BuiltLog, pub: str, tmp_path: Path
) -> None:
    from fedseal.audit.auditor import load_anchor
    from fedseal.audit.verify_run import judge_report, render_run_report

    good = judge_report(built.path, load_anchor("report", Path(pub), False))
    assert good.exit_code == EXIT_OK and good.signed_entries == 40
    assert good.verdict.startswith("all checks hold against the pinned coordinator key")
    assert judge_report(built.path, None).verdict == "not checked"
    other = tmp_path / "other.pub"
    save_public_key(generate_identity_key().public_key(), other)
    bad = judge_report(built.path, load_anchor("report", other, False))
    assert bad.exit_code == EXIT_FAILED and bad.verdict.startswith("FAILED: ")
    assert "FAILED" in render_run_report(built.path, bad)
