"""Withdrawing a dataset root (GDPR erasure, consent withdrawn) at the coordinator: the roster
records it (when, why) and never approves the root again; ``fl-server roots withdraw`` /
``roots list`` / ``revoke --reason``; a running run refuses the root from its next round on
(secure and plain, through the real ServerApp on the in-process grid), names the withdrawal on
its round line, and records it in the audit log, which still verifies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedseal.crypto.keys import generate_identity_key, save_public_key
from fedseal.server.audit_hook import RunAudit, refresh_roster
from fedseal.server.cli import app
from fedseal.server.roster import Enrolment, EnrolmentError, EnrolmentEvent
from tests.server._fedgrid import FakeSite, Federated, dataset_root_for

ROOT_A = "aa" * 32
ROOT_B = "bb" * 32
REASON = "consent withdrawn (DPO ticket 31)"


def _roster() -> Enrolment:
    key = generate_identity_key().public_key()
    return Enrolment().enroll("site-a", key, [ROOT_A, ROOT_B], now_ms=1)


# -- the roster ------------------------------------------------------------------------------


def test_a_withdrawn_root_leaves_the_site_with_its_reason_and_time_in_the_chain(
    tmp_path: Path,
) -> None:
    r = _roster().withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=5)
    site = r.get("site-a")
    assert site is not None and site.dataset_roots == (ROOT_B,)
    last = r.events[-1]
    assert (last.action, last.dataset_roots, last.reason, last.time_ms) == (
        "withdraw-root",
        (ROOT_A,),
        REASON,
        5,
    )
    assert last.prev == r.events[0].digest().hex()
    r.save(tmp_path / "roster.json")
    again = Enrolment.load(tmp_path / "roster.json")
    assert again.withdrawn()[ROOT_A].reason == REASON and again.digest() == r.digest()


@pytest.mark.parametrize("other_site", [False, True])
def test_a_withdrawn_root_is_never_approved_again_for_any_site(other_site: bool) -> None:
    r = _roster().withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=5)
    key = generate_identity_key().public_key() if other_site else r.sites[0].public_key
    with pytest.raises(
        EnrolmentError, match=r"withdrawn on .* a withdrawn root is never approved again"
    ) as err:
        r.enroll("site-b" if other_site else "site-a", key, [ROOT_A], now_ms=6)
    assert REASON in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("site", "root", "reason", "why"),
    [
        ("site-a", ROOT_A, "", "a reason is required"),
        ("site-a", ROOT_A, "two\nlines", "one line"),
        ("site-z", ROOT_A, REASON, "no such site"),
        ("site-a", "cc" * 32, REASON, "not approved for this site"),
        ("site-a", "zz", REASON, "64 hex"),
    ],
)
def test_a_withdrawal_names_what_is_wrong(site: str, root: str, reason: str, why: str) -> None:
    with pytest.raises(EnrolmentError, match=why):
        _roster().withdraw_root(site, root, reason=reason, now_ms=5)


def test_a_root_is_withdrawn_once_even_after_its_site_was_revoked() -> None:
    r = (
        _roster()
        .revoke("site-a", reason="left", now_ms=2)
        .withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=3)
    )
    with pytest.raises(EnrolmentError, match="already withdrawn"):
        r.withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=4)


def test_a_roster_file_that_lists_a_withdrawn_root_as_approved_does_not_load(
    tmp_path: Path,
) -> None:
    doc = _roster().withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=5).to_json()
    doc["sites"][0]["dataset_roots"].append(ROOT_A)  # a hand edit putting it back
    with pytest.raises(EnrolmentError, match="lists a withdrawn root as approved"):
        Enrolment.from_json(doc)


def test_a_revocation_records_its_reason_and_events_without_one_keep_their_digests() -> None:
    r = _roster().revoke("site-a", reason="key compromised", now_ms=2)
    event = r.revocation("site-a")
    assert event is not None and event.reason == "key compromised"
    # An event written before reasons existed hashes as it did (no "reason" key).
    old = EnrolmentEvent(0, "revoke", "s", "k", (), 1, "00" * 32)
    assert b"reason" not in old.canonical()
    assert Enrolment.from_json(r.to_json()).digest() == r.digest()


def test_during_a_run_withdrawals_apply_at_once_and_a_revocation_waits_for_the_next_run() -> None:
    start = _roster()
    key_b = generate_identity_key().public_key()
    newer = (
        start.enroll("site-b", key_b, ["cc" * 32], now_ms=2)
        .revoke("site-a", reason="left", now_ms=3)
        .withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=4)
    )
    during = start.update_during_run(newer)
    a = during.get("site-a")
    assert a is not None and a.status == "active" and a.dataset_roots == (ROOT_B,)
    assert during.get("site-b") is not None
    assert [e.action for e in during.events] == ["enroll", "enroll"]  # what the log records now
    rewritten = Enrolment().enroll(
        "site-a", generate_identity_key().public_key(), [ROOT_A], now_ms=1
    )
    with pytest.raises(EnrolmentError, match="no longer continues"):
        start.update_during_run(rewritten)


def test_a_refreshed_roster_reaches_the_audit_log_once_and_the_log_verifies(tmp_path: Path) -> None:
    from fedseal.audit.auditor import verify_log

    coordinator = generate_identity_key()
    path = tmp_path / "roster.json"
    start = _roster()
    start.save(path)
    audit = RunAudit.open(tmp_path / "audit.sqlite", coordinator, start)
    assert refresh_roster(path, start, None) is None  # unchanged
    start.withdraw_root("site-a", ROOT_A, reason=REASON, now_ms=5).save(path)

    class Audit:  # FailClosedAudit's surface refresh_roster uses
        def mirror_roster(self, roster: Enrolment) -> None:
            audit.mirror_roster(roster)

    updated = refresh_roster(path, start, Audit())  # type: ignore[arg-type]
    assert updated is not None and updated.get("site-a").dataset_roots == (ROOT_B,)  # type: ignore[union-attr]
    assert audit.mirror_roster(updated) == 0  # nothing twice
    audit.log.sign_tree_head(10)
    from fedseal.protocol.types import SiteId

    entry = audit.log.roster().get(SiteId("site-a"))
    assert entry is not None and entry.approved_roots == frozenset({bytes.fromhex(ROOT_B)})
    audit.close()
    verify_log(tmp_path / "audit.sqlite", coordinator_key=coordinator.public_key())


# -- the command line ------------------------------------------------------------------------


def _coordinator(tmp_path: Path) -> tuple[str, Path]:
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(tmp_path / "c")]).exit_code == 0
    pub = tmp_path / "site.pub"
    save_public_key(generate_identity_key().public_key(), pub)
    cfg = str(tmp_path / "c" / "server.toml")
    out = runner.invoke(
        app, ["enroll", "--config", cfg, "--site", "site-a", "--key", str(pub),
              "--dataset-root", ROOT_A, "--dataset-root", ROOT_B],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    return cfg, pub


def test_fl_server_roots_withdraw_records_it_and_a_later_enroll_of_that_root_is_refused(
    tmp_path: Path,
) -> None:
    cfg, pub = _coordinator(tmp_path)
    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "roots",
            "withdraw",
            "--config",
            cfg,
            "--site",
            "site-a",
            "--root",
            ROOT_A,
            "--reason",
            REASON,
        ],
    )
    assert out.exit_code == 0, out.output
    assert (
        "withdrew dataset root aaaaaaaaaaaaaaaa… of site-a" in out.output
        and "1 approved root(s) left" in out.output
    )
    again = runner.invoke(
        app,
        [
            "enroll",
            "--config",
            cfg,
            "--site",
            "site-a",
            "--key",
            str(pub),
            "--dataset-root",
            ROOT_A,
        ],
    )
    assert again.exit_code == 2 and "never approved again" in again.output
    listed = json.loads(runner.invoke(app, ["roots", "list", "--config", cfg, "--json"]).output)[
        "roots"
    ]
    assert {(r["root"], r["status"]) for r in listed} == {
        (ROOT_B, "approved"),
        (ROOT_A, "withdrawn"),
    }
    assert next(r for r in listed if r["status"] == "withdrawn")["reason"] == REASON
    missing = runner.invoke(
        app, ["roots", "withdraw", "--config", cfg, "--site", "site-a", "--root", ROOT_B]
    )
    assert missing.exit_code == 2  # --reason is required


def test_fl_server_revoke_reason_is_kept_and_shown(tmp_path: Path) -> None:
    cfg, _ = _coordinator(tmp_path)
    runner = CliRunner()
    out = runner.invoke(
        app, ["revoke", "--config", cfg, "--site", "site-a", "--reason", "left the consortium"]
    )
    assert out.exit_code == 0 and "left the consortium" in out.output
    doc = json.loads(runner.invoke(app, ["roster", "--config", cfg, "--json"]).output)
    [site] = doc["sites"]
    assert site["status"] == "revoked" and site["revoke_reason"] == "left the consortium"


# -- a running run ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _withdraw_after_round_1(fx: Federated, site: str) -> None:
    """The operator runs `fl-server roots withdraw` for ``site``'s root while round 1 is
    evaluated (the first evaluation message a site answers)."""
    node = next(n for n, s in fx.sites.items() if s.name == site)
    real = fx.sites[node].answer
    done = []

    def answer(msg: Any) -> Any:
        if msg.metadata.message_type == "evaluate" and not done:
            done.append(1)
            path = fx.cfg.coordinator.roster
            roster = Enrolment.load(path)
            roster.withdraw_root(site, dataset_root_for(site).hex(), reason=REASON, now_ms=10).save(
                path
            )
        return real(msg)

    fx.sites[node].answer = answer  # type: ignore[method-assign]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secure", [True, False])
def test_a_root_withdrawn_during_a_run_is_refused_from_the_next_round_and_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secure: bool,
) -> None:
    from fedseal.audit.auditor import verify_log
    from fedseal.crypto.keys import load_private_key

    fx = Federated(
        tmp_path, ["site-a", "site-b", "site-c", "site-d"], secure=secure, rounds=2, min_sites=3
    )
    assert all(isinstance(s, FakeSite) for s in fx.sites.values())
    _withdraw_after_round_1(fx, "site-d")
    fx.run(monkeypatch)
    r1, r2 = fx.rounds()
    assert r1["accepted"] == 4 and "site-d" in r1["sites"]
    assert r2["outcome"] == "committed" and r2["accepted"] == 3 and "site-d" not in r2["sites"]
    why = r2["absent"]["site-d"]
    assert (
        why.startswith("rejected at ")
        and "dataset root " + dataset_root_for("site-d").hex()[:16] in why
    )
    assert "of site-d was withdrawn on" in why and REASON in why
    line = next(
        x for x in capsys.readouterr().out.splitlines() if x.startswith("fedseal: round 2/2")
    )
    assert "site-d (rejected at" in line and "withdrawn" in line
    if secure:  # recorded in the audit log, which verifies
        from fedseal.audit.codec import decode_entry
        from fedseal.audit.entries import RosterAction, RosterChange
        from fedseal.audit.store import MerkleLogStore

        log = fx.cfg.coordinator.state_dir / "audit.sqlite"
        key = load_private_key(fx.cfg.coordinator.key, None)
        verify_log(log, coordinator_key=key.public_key())
        with MerkleLogStore.open(log, read_only=True) as store:
            entries = [decode_entry(e.data) for e in store.iter_entries()]
        [withdrawal] = [
            e
            for e in entries
            if isinstance(e, RosterChange) and e.action == RosterAction.WITHDRAW_ROOT
        ]
        assert (
            withdrawal.withdrawn_roots == (dataset_root_for("site-d"),)
            and withdrawal.reason == REASON
        )


# -- the site's re-enrolment (fl-client run --re-enrol) ---------------------------------------


def _dataset(tmp_path: Path, name: str, rows: int) -> tuple[Path, str]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from fedseal.client.data import PrepareOptions, prepare_dataset

    table = pa.table(
        {
            "age": list(range(30, 30 + rows)),
            "bmi": [20.0 + i for i in range(rows)],
            "y": [i % 2 for i in range(rows)],
        }
    )
    pacsv.write_csv(table, tmp_path / f"{name}.csv")
    m = prepare_dataset(
        tmp_path / f"{name}.csv",
        tmp_path / name,
        label_column="y",
        options=PrepareOptions(shuffle=False),
    )
    return tmp_path / name, m.root.hex()


def _site_config(tmp_path: Path, dataset: Path, approved: str) -> Path:
    path = tmp_path / "client.toml"
    path.write_text(
        '[site]\nname = "site-a"\n[coordinator]\nsuperlink = "localhost:9092"\n'
        f'[data]\ndataset_dir = "{dataset}"\napproved_root = "{approved}"\n'
    )
    return path


def test_a_re_enrolled_root_is_kept_in_the_state_directory_so_the_next_start_needs_no_edit(
    tmp_path: Path,
) -> None:
    import stat

    from fedseal.client.config import APPROVED_ROOT_FILE, approved_root_in_force, load_client_config
    from fedseal.client.node import SiteRunError, attest_dataset

    old, old_root = _dataset(tmp_path, "old", 6)
    new, new_root = _dataset(tmp_path, "new", 5)  # one row erased
    assert old_root != new_root
    cfg = load_client_config(_site_config(tmp_path, new, old_root))
    with pytest.raises(SiteRunError, match=f"root {new_root} != approved {old_root};.*--re-enrol"):
        attest_dataset(cfg, re_enrol=False)
    assert not (cfg.state_dir / APPROVED_ROOT_FILE).exists()  # nothing kept without the operator
    assert attest_dataset(cfg, re_enrol=True, now_ms=7) == new_root
    kept = cfg.state_dir / APPROVED_ROOT_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text()) | {"format": 1} == {
        "format": 1,
        "root": new_root,
        "replaces": old_root,
        "previous": old_root,
        "re_enrolled_at_ms": 7,
    }
    # The next start, client.toml untouched, uses the re-enrolled root without --re-enrol.
    cfg = load_client_config(tmp_path / "client.toml")
    assert cfg.approved_root == old_root
    assert attest_dataset(cfg, re_enrol=False) == new_root
    # Going back to the old data (e.g. the erased row restored) is not silently accepted.
    back = load_client_config(_site_config(tmp_path, old, old_root))
    with pytest.raises(SiteRunError, match=f"!= approved {new_root} \\(re-enrolled"):
        attest_dataset(back, re_enrol=False)
    # An operator who edits data.approved_root decides again: the kept file no longer applies.
    edited = load_client_config(_site_config(tmp_path, new, new_root))
    assert approved_root_in_force(edited).source == "client.toml"


def test_a_malformed_re_enrolment_file_is_refused_naming_it(tmp_path: Path) -> None:
    from fedseal.client.config import APPROVED_ROOT_FILE, load_client_config
    from fedseal.client.node import SiteRunError, attest_dataset

    data, root = _dataset(tmp_path, "d", 4)
    cfg = load_client_config(_site_config(tmp_path, data, root))
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    (cfg.state_dir / APPROVED_ROOT_FILE).write_text("{not json")
    with pytest.raises(SiteRunError, match=f"{APPROVED_ROOT_FILE} is malformed"):
        attest_dataset(cfg, re_enrol=False)


def test_a_root_two_sites_hold_is_withdrawn_from_both_and_the_roster_still_loads(tmp_path: Path) -> None:
    from fedseal.crypto.keys import generate_identity_key
    from fedseal.server.roster import Enrolment

    root = "ab" * 32
    roster = Enrolment()
    for name in ("site-a", "site-b"):
        roster = roster.enroll(name, generate_identity_key().public_key(), [root], now_ms=1)
    roster = roster.withdraw_root("site-a", root, reason="erasure request", now_ms=2)
    assert all(root not in s.dataset_roots for s in roster.sites)
    roster.save(tmp_path / "roster.json")
    assert Enrolment.load(tmp_path / "roster.json").withdrawn()[root].site == "site-a"
