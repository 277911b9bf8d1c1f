"""deploy/tools/fedseal-backup.py (SQLite online backup) and the Grafana dashboard."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from tests.deploy.deploytools import DEPLOY, run

BACKUP = DEPLOY / "tools" / "fedseal-backup.py"
DASHBOARD = DEPLOY / "grafana" / "fedseal-dashboard.json"


def make_wal_db(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE entries (i INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    db.executemany("INSERT INTO entries (payload) VALUES (?)", [(bytes(64),)] * rows)
    db.commit()
    db.close()


def backup(*args: str | Path) -> tuple[int, str, str]:
    proc = run([sys.executable, str(BACKUP), *map(str, args)], timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_backup_of_a_live_wal_database_holds_every_committed_row_and_checks_out(tmp_path: Path) -> None:
    src = tmp_path / "audit.sqlite"
    make_wal_db(src, 2000)
    # A writer keeps appending (and holds the WAL open) while the backup runs.
    writer = sqlite3.connect(src, check_same_thread=False)
    writer.execute("PRAGMA journal_mode=WAL")
    stop = threading.Event()

    def append() -> None:
        while not stop.is_set():
            writer.execute("INSERT INTO entries (payload) VALUES (?)", (b"x" * 64,))
            writer.commit()

    t = threading.Thread(target=append)
    t.start()
    try:
        code, out, err = backup(src, tmp_path / "backups")
    finally:
        stop.set()
        t.join()
        writer.close()
    assert code == 0, err
    copy = Path(out.split()[0])
    assert copy.parent == tmp_path / "backups" and copy.name.startswith("audit-")
    db = sqlite3.connect(copy)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (n,) = db.execute("SELECT count(*) FROM entries").fetchone()
    (max_i,) = db.execute("SELECT max(i) FROM entries").fetchone()
    db.close()
    assert n >= 2000 and n == max_i  # a consistent prefix: no gaps
    digest, name = Path(f"{copy}.sha256").read_text().split()
    assert name == copy.name and digest == hashlib.sha256(copy.read_bytes()).hexdigest()


def test_backup_keeps_only_the_newest_n_copies(tmp_path: Path) -> None:
    src = tmp_path / "audit.sqlite"
    make_wal_db(src, 10)
    for _ in range(3):
        assert backup(src, tmp_path / "b", "--keep", "2")[0] == 0
    assert len(list((tmp_path / "b").glob("audit-*.sqlite"))) == 2
    assert len(list((tmp_path / "b").glob("audit-*.sqlite.sha256"))) == 2


def test_backup_of_a_missing_or_corrupt_database_fails_and_leaves_no_copy(tmp_path: Path) -> None:
    code, _, err = backup(tmp_path / "nope.sqlite", tmp_path / "b")
    assert code == 1 and "no such database file" in err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    code, _, err = backup(bad, tmp_path / "b")
    assert code == 1 and "bad.sqlite" in err
    assert list((tmp_path / "b").glob("*.sqlite")) == []


def test_backup_with_verify_fails_when_fl_audit_rejects_the_copy(tmp_path: Path) -> None:
    src = tmp_path / "audit.sqlite"
    make_wal_db(src, 5)
    fake = tmp_path / "fl-audit"
    fake.write_text("#!/bin/sh\necho 'entry 3: signature invalid' >&2\nexit 1\n")
    fake.chmod(0o755)
    key = tmp_path / "coordinator.pub"
    code, _, err = backup(
        src, tmp_path / "b", "--verify", "--fl-audit", str(fake), "--coordinator-key", str(key)
    )
    assert code == 1 and "fl-audit verify exited 1: entry 3: signature invalid" in err


def test_backup_with_verify_needs_the_coordinator_key(tmp_path: Path) -> None:
    src = tmp_path / "audit.sqlite"
    make_wal_db(src, 5)
    code, _, err = backup(src, tmp_path / "b", "--verify")
    assert code == 2 and "--verify needs --coordinator-key" in err


def test_backup_with_verify_anchors_fl_audit_on_the_key_and_allows_an_open_run(tmp_path: Path) -> None:
    src = tmp_path / "audit.sqlite"
    make_wal_db(src, 5)
    fake = tmp_path / "fl-audit"
    args = tmp_path / "args"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args}\nexit 0\n')
    fake.chmod(0o755)
    key = tmp_path / "coordinator.pub"
    code, _, _ = backup(
        src, tmp_path / "b", "--verify", "--fl-audit", str(fake), "--coordinator-key", str(key)
    )
    assert code == 0
    assert f"--coordinator-key {key} --allow-open" in args.read_text()


# --- Grafana dashboard ---------------------------------------------------------------------

METRIC = re.compile(r"\bfedseal_[a-z_]+\b")


def dashboard() -> dict[str, object]:
    return json.loads(DASHBOARD.read_text())


def exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_panels_have_unique_ids_and_fit_the_24_column_grid() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}"
    assert dashboard()["uid"] == "fedseal-coordinator"


def server_metric_names() -> set[str]:
    metrics = pytest.importorskip("fedseal.server.metrics")
    m = metrics.Metrics.create()
    names: set[str] = set()
    for family in m.registry.collect():
        names.add(family.name)
        kind = family.type
        if kind == "counter":
            names.add(f"{family.name}_total")
        if kind == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_every_metric_the_dashboard_queries_is_exported_by_fl_server() -> None:
    exported = server_metric_names()
    used = {name for e in exprs() for name in METRIC.findall(e)}
    assert used, "the dashboard queries no fedseal metric"
    assert used <= exported, f"not exported by fedseal.server.metrics: {sorted(used - exported)}"


def test_every_metric_fl_server_exports_appears_on_the_dashboard() -> None:
    families = {n.removesuffix("_total") for n in server_metric_names()}
    used = {re.sub(r"_(total|bucket|sum|count)$", "", n) for e in exprs() for n in METRIC.findall(e)}
    base = {n for n in families if not re.search(r"_(bucket|sum|count)$", n)}
    assert base <= used, f"exported but not on the dashboard: {sorted(base - used)}"
