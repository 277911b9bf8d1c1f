"""Every stored value any command reads is verified: random edits, swaps and deletions of rows in
every table of a real audit log (one mutation per copy of the file) are all caught by
``fl-audit verify``'s library entry point, against the pinned coordinator key.

The log is a realistic run (tests/audit/logbuilder.py: enrolments, 3 rounds of really signed
envelopes, rejections, a revocation, checkpoints, evaluations, DP accounting entries, signed tree
heads, the run end): every entry kind a run writes.
Tables: ``entries`` (idx, kind, site, round, data, leaf_hash), ``nodes`` (id, hash),
``tree_heads`` (seq, tree_size, root_hash, timestamp_ms, blob) and ``meta`` (key, value).

A mutation changes one row (a column set to a random value, another row's value or a value of
another type), swaps two rows (all columns but the key, or one column), or deletes a row. One
that SQLite refuses (a constraint) or that changes nothing a reader could observe (the same
value, or a value SQLite's column affinity turns back into it: every table is compared, types
included, before and after) is drawn again and not counted.

1,000 mutations with a fixed seed, plus a run with a random seed (printed on failure; set
FEDSEAL_MUTATION_SEED to replay one).
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fedseal.audit.auditor import verify_log
from fedseal.audit.errors import AuditLogError, AuditVerificationError
from tests.audit.logbuilder import build_run_log, sample_dp_params

FIXED_SEED = 15_2_1000
FIXED_COUNT = 1000
RANDOM_COUNT = 1000

# table -> (key column, columns)
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "entries": ("idx", ("idx", "kind", "site", "round", "data", "leaf_hash")),
    "nodes": ("id", ("id", "hash")),
    "tree_heads": ("seq", ("seq", "tree_size", "root_hash", "timestamp_ms", "blob")),
    "meta": ("key", ("key", "value")),
}
SITE_NAMES = ("site-a", "site-b", "site-c", "site-d", "mallory", "")

Row = tuple[object, ...]
Snapshot = dict[str, list[tuple[tuple[type, object], ...]]]


@dataclass(frozen=True)
class Base:
    image: bytes  # the whole log as one self-contained SQLite file (rollback journal)
    key: ec.EllipticCurvePublicKey
    entries: int


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    built = build_run_log(
        tmp_path_factory.mktemp("mut") / "audit.sqlite", evaluations=True, dp=sample_dp_params()
    )
    src = sqlite3.connect(built.path)
    mem = sqlite3.connect(":memory:")
    src.backup(mem)
    src.close()
    image = mem.serialize()
    mem.close()
    # A memory database cannot be in WAL mode: mark the image as a rollback-journal file
    # (header bytes 18 and 19), so it deserializes and opens as a plain file.
    image = image[:18] + b"\x01\x01" + image[20:]
    result = verify_log(_write(tmp_path_factory.mktemp("ok") / "a.sqlite", image), jobs=1,
                        coordinator_key=built.coordinator.public_key())  # fmt: skip
    assert result.runs[0][1] == "completed" and result.evaluations == 3
    assert result.dp_runs[0][1] == 3  # the DP accounting entries are mutated too
    return Base(image, built.coordinator.public_key(), result.entries)


def _write(path: Path, image: bytes) -> Path:
    path.write_bytes(image)
    return path


def _snapshot(conn: sqlite3.Connection) -> Snapshot:
    return {
        table: [
            tuple((type(v), v) for v in row)
            for row in conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid")
        ]
        for table, (_, cols) in TABLES.items()
    }


def _other_type(rng: random.Random, v: object) -> object:
    if isinstance(v, bytes):
        return rng.choice([v.hex(), v.decode("latin-1"), None, len(v), float(len(v)) + 0.5])
    if isinstance(v, str):
        return rng.choice([v.encode(), None, len(v), 1.5])
    if isinstance(v, int):
        return rng.choice([str(v), f"{v} ", str(v).encode(), v + 0.5, float(v), None])
    return rng.choice([0, "x", b"x", 1.0])


def _same_type(rng: random.Random, v: object) -> object:
    if isinstance(v, bytes):
        b = bytearray(v)
        choice = rng.randrange(5)
        if choice == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            return bytes(b)
        if choice == 1:
            return rng.randbytes(len(b))
        if choice == 2:
            return bytes(b[:-1])
        if choice == 3:
            return bytes(b) + bytes([rng.randrange(256)])
        return b""
    if isinstance(v, str):
        return rng.choice([*SITE_NAMES, v + "x", v[:-1], v.upper()])
    if isinstance(v, int):
        return rng.choice(
            [v + 1, v - 1, v + rng.randrange(2, 1000), 0, -1, 1 << 48, rng.randrange(1 << 62)]
        )
    return rng.choice([0, 3, "site-a", b"\x00" * 32])  # NULL becomes a value


def _column_values(conn: sqlite3.Connection, table: str, column: str) -> list[object]:
    return [r[0] for r in conn.execute(f"SELECT {column} FROM {table}")]


def _mutate(conn: sqlite3.Connection, rng: random.Random) -> str:
    """Apply one random mutation; return its description."""
    table = rng.choices(list(TABLES), [4, 2, 2, 1])[0]  # meta has one row, entries the most
    key, cols = TABLES[table]
    rowids = [r[0] for r in conn.execute(f"SELECT rowid FROM {table}")]
    op = rng.choices(["edit", "swap-rows", "swap-column", "delete"], [6, 2, 2, 2])[0]
    if op != "edit" and op != "delete" and len(rowids) < 2:
        op = "edit"
    if op == "delete":
        rowid = rng.choice(rowids)
        conn.execute(f"DELETE FROM {table} WHERE rowid=?", (rowid,))
        return f"delete {table} rowid={rowid}"
    if op == "edit":
        rowid = rng.choice(rowids)
        column = rng.choice(cols)
        (old,) = conn.execute(f"SELECT {column} FROM {table} WHERE rowid=?", (rowid,)).fetchone()
        how = rng.randrange(3)
        if how == 0:
            new = rng.choice(_column_values(conn, table, column))  # another row's (valid) value
        elif how == 1:
            new = _same_type(rng, old)
        else:
            new = _other_type(rng, old)
        conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (new, rowid))
        return f"edit {table} rowid={rowid} {column}: {old!r:.40} -> {new!r:.40}"
    a, b = rng.sample(rowids, 2)
    swap = [c for c in cols if c != key] if op == "swap-rows" else [rng.choice(cols)]
    row_a = conn.execute(f"SELECT {', '.join(swap)} FROM {table} WHERE rowid=?", (a,)).fetchone()
    row_b = conn.execute(f"SELECT {', '.join(swap)} FROM {table} WHERE rowid=?", (b,)).fetchone()
    if key in swap:  # swapping primary keys: move one out of the way first
        conn.execute(f"UPDATE {table} SET {key}=? WHERE rowid=?", (-999_999, a))
        conn.execute(f"UPDATE {table} SET {key}=? WHERE rowid=?", (row_a[0], b))
        conn.execute(f"UPDATE {table} SET {key}=? WHERE {key}=?", (row_b[0], -999_999))
    else:
        sets = ", ".join(f"{c}=?" for c in swap)
        conn.execute(f"UPDATE {table} SET {sets} WHERE rowid=?", (*row_b, a))
        conn.execute(f"UPDATE {table} SET {sets} WHERE rowid=?", (*row_a, b))
    return f"{op} {table} rowids {a},{b} ({', '.join(swap)})"


def _table_of(description: str) -> str:
    return description.split()[1]


def run_mutations(base: Base, workdir: Path, seed: int, count: int) -> Counter[str]:
    """Apply ``count`` observable mutations (each to a fresh copy) and verify each copy.

    Returns how many mutations of each (operation, table) were applied; fails the test on the
    first mutation that verifies, or that makes the verifier raise anything but its own errors.
    """
    rng = random.Random(seed)
    pristine = sqlite3.connect(":memory:")
    pristine.deserialize(base.image)
    before = _snapshot(pristine)
    pristine.close()
    path = workdir / "mutated.sqlite"
    done: Counter[str] = Counter()
    attempts = 0
    while sum(done.values()) < count:
        attempts += 1
        assert attempts < count * 10, f"too few applicable mutations (seed {seed})"
        conn = sqlite3.connect(":memory:", isolation_level=None)
        conn.deserialize(base.image)
        try:
            conn.execute("BEGIN")
            description = _mutate(conn, rng)
            conn.execute("COMMIT")
        except sqlite3.Error:  # a constraint or type SQLite refuses: not a mutation
            conn.close()
            continue
        if _snapshot(conn) == before:  # nothing observable changed (e.g. the same value)
            conn.close()
            continue
        image = conn.serialize()
        conn.close()
        _write(path, image)
        try:
            result = verify_log(path, coordinator_key=base.key, jobs=1)
        except (AuditVerificationError, AuditLogError):
            done[f"{description.split()[0]} {_table_of(description)}"] += 1
            continue
        except Exception as exc:  # any other error is a verifier bug
            pytest.fail(
                f"seed {seed}, mutation #{sum(done.values()) + 1} ({description}): the verifier "
                f"crashed instead of failing: {type(exc).__name__}: {exc}"
            )
        pytest.fail(
            f"seed {seed}, mutation #{sum(done.values()) + 1} undetected: {description} "
            f"(verify: {result.entries} entries, {result.tree_heads} tree heads, runs {result.runs})"
        )
    return done


def _assert_coverage(done: Counter[str]) -> None:
    for table in TABLES:
        for op in ("edit", "delete"):
            assert done[f"{op} {table}"] > 0, (op, table, done)
    for table in ("entries", "nodes", "tree_heads"):
        assert done[f"swap-rows {table}"] + done[f"swap-column {table}"] > 0, (table, done)


@pytest.mark.timeout(120)
def test_a_thousand_random_mutations_of_a_real_log_are_all_detected(
    base: Base, tmp_path: Path
) -> None:
    done = run_mutations(base, tmp_path, FIXED_SEED, FIXED_COUNT)
    assert sum(done.values()) == FIXED_COUNT
    _assert_coverage(done)


@pytest.mark.timeout(120)
def test_random_mutations_with_a_fresh_seed_are_all_detected(base: Base, tmp_path: Path) -> None:
    seed = int(os.environ.get("FEDSEAL_MUTATION_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"mutation seed {seed} (replay: FEDSEAL_MUTATION_SEED={seed})")
    run_mutations(base, tmp_path, seed, RANDOM_COUNT)


# --- targeted: what each stored copy's failure says ---------------------------------------


def _mutated(base: Base, tmp_path: Path, sql: str, *args: object) -> Path:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.deserialize(base.image)
    conn.execute(sql, args)
    path = _write(tmp_path / "m.sqlite", conn.serialize())
    conn.close()
    return path


def _failure(base: Base, path: Path) -> AuditVerificationError:
    with pytest.raises(AuditVerificationError) as err:
        verify_log(path, coordinator_key=base.key, jobs=1)
    return err.value


def _input_rows(base: Base) -> list[tuple[int, str]]:
    conn = sqlite3.connect(":memory:")
    conn.deserialize(base.image)
    rows = conn.execute(
        "SELECT idx, site FROM entries WHERE kind=3 AND site != 'mallory'"
    ).fetchall()
    conn.close()
    return rows


@pytest.mark.parametrize(
    ("sql", "args", "check", "names"),
    [
        ("UPDATE entries SET kind=4 WHERE idx=?", "first-input", "index-column", "column kind"),
        ("UPDATE entries SET round=round+1 WHERE idx=?", "first-input", "index-column", "column round"),
        ("UPDATE entries SET site='site-b' WHERE idx=?", "first-input", "index-column", "column site"),
        ("UPDATE entries SET site=CAST(site AS BLOB) WHERE idx=?", "first-input", "index-column", "BLOB"),
        ("UPDATE tree_heads SET tree_size=tree_size-1 WHERE seq=?", 2, "tree-head-column", "column tree_size"),
        ("UPDATE tree_heads SET timestamp_ms=timestamp_ms+1 WHERE seq=?", 3, "tree-head-column", "column timestamp_ms"),
        ("UPDATE tree_heads SET root_hash=zeroblob(32) WHERE seq=?", 1, "tree-head-column", "column root_hash"),
        ("DELETE FROM tree_heads WHERE seq=?", 2, "tree-head-seq", "tree_heads row seq=3"),
        ("UPDATE nodes SET hash=zeroblob(32) WHERE id=?", (1 << 48) | 3, "node-cache", f"nodes row id={(1 << 48) | 3}"),
        ("DELETE FROM nodes WHERE id=?", (2 << 48) | 1, "node-cache", f"nodes row id={(2 << 48) | 1} (height 2, entries [4, 8)) is missing"),
        ("INSERT INTO nodes(id, hash) VALUES (?, zeroblob(32))", 9 << 48, "node-cache", f"nodes row id={9 << 48}"),
        ("UPDATE entries SET data=CAST(data AS TEXT) WHERE idx=?", 0, "column-type", "column data"),
    ],
)  # fmt: skip
def test_a_changed_stored_copy_fails_naming_its_table_row_and_column(
    base: Base, tmp_path: Path, sql: str, args: object, check: str, names: str
) -> None:
    if args == "first-input":
        args = _input_rows(base)[0][0]
    err = _failure(base, _mutated(base, tmp_path, sql, args))
    assert err.check == check, str(err)
    assert names in str(err), str(err)
    table = next(t for t in TABLES if f" {t}" in sql)
    assert f"{table} row" in str(err), str(err)


def test_site_tags_swapped_between_two_inputs_fail_at_the_first(base: Base, tmp_path: Path) -> None:
    # After such a swap `fl-audit prove --site` would miss an honest site's input: verify fails.
    rows = _input_rows(base)
    (i, a), (j, b) = next((x, y) for x in rows for y in rows if x[1] != y[1])
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.deserialize(base.image)
    conn.execute("UPDATE entries SET site=? WHERE idx=?", (b, i))
    conn.execute("UPDATE entries SET site=? WHERE idx=?", (a, j))
    path = _write(tmp_path / "swap.sqlite", conn.serialize())
    conn.close()
    err = _failure(base, path)
    assert err.check == "index-column" and err.index == min(i, j)
    assert f"entries row idx={min(i, j)}: column site" in str(err)


def test_the_mutation_test_itself_sees_a_verifying_copy_as_undetected(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guard against a harness that passes vacuously: a mutation the verifier ignores fails it.
    import tests.audit.test_audit_mutations as me

    def harmless(conn: sqlite3.Connection, rng: random.Random) -> str:
        conn.execute("CREATE TABLE unrelated (x)")  # a table no reader uses
        return "harmless"

    calls: list[object] = []

    def always_changed(conn: sqlite3.Connection) -> object:
        calls.append(conn)
        return len(calls)

    monkeypatch.setattr(me, "_mutate", harmless)
    monkeypatch.setattr(me, "_snapshot", always_changed)
    with pytest.raises(pytest.fail.Exception, match="undetected"):
        run_mutations(base, tmp_path, 1, 1)
