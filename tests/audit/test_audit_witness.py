"""Witnesses (issue 15, point 3): the tree heads sites kept catch truncation and rewriting.

A real run log (``logbuilder``) grows round by round; two sites check their receipts against
it as it grows (``ReceiptChecker`` over an in-process ``AuditSource``, each round against the
log as it stood at that round's signed tree head), then export what they witnessed with
``fl-client receipts export``. The auditor's ``fl-audit verify --witness`` must then:

* pass the honest log;
* fail a log cut back to an earlier signed tree head (the file edited by its coordinator), which
  verify without witnesses cannot tell from a live log;
* fail a log whose history was rewritten and re-signed with the *real* coordinator key, which
  verifies without witnesses;
* refuse a witnessed head signed by another key or for another log.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseal.audit.cli import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    app,
)
from fedseal.audit.codec import decode_entry, encode_entry, entry_tags
from fedseal.audit.entries import INPUT_MESSAGE_TYPE, RoundRecord
from fedseal.audit.receipts import ReceiptChecker
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.treehead import SignedTreeHead
from fedseal.client.cli import app as client_app
from fedseal.crypto.keys import generate_identity_key, save_public_key
from tests.audit.logbuilder import BuiltLog, build_run_log
from tests.audit.test_audit_service import LocalSource, _payload

runner = CliRunner()
SITES = ("site-b", "site-c")
_LEVEL_SHIFT = 48  # node ids: height << 48 | k (fedseal.audit.store.node_id)


def truncate(src: Path, dst: Path, size: int) -> Path:
    """``src`` cut back to its first ``size`` entries, as its coordinator would edit the file:
    the later entries, the tree heads over them and the cached nodes that cover them go."""
    shutil.copy(src, dst)
    conn = sqlite3.connect(dst)
    with conn:
        conn.execute("DELETE FROM entries WHERE idx >= ?", (size,))
        conn.execute("DELETE FROM tree_heads WHERE tree_size > ?", (size,))
        ids = [row[0] for row in conn.execute("SELECT id FROM nodes")]
        stale = [
            (i,) for i in ids if ((i & ((1 << _LEVEL_SHIFT) - 1)) + 1) << (i >> _LEVEL_SHIFT) > size
        ]
        conn.executemany("DELETE FROM nodes WHERE id = ?", stale)
    conn.close()
    return dst


def head_sizes(path: Path) -> list[int]:
    with MerkleLogStore.open(path, read_only=True) as store:
        return [SignedTreeHead.from_bytes(h.blob).tree_size for h in store.tree_heads()]


def rewrite(built: BuiltLog, dst: Path, round: int, accuracy_micros: int) -> Path:
    """The log rewritten by its own coordinator: round ``round``'s reported accuracy changed,
    every entry re-appended and every tree head re-signed with the *real* key (same log id,
    sizes and timestamps), so that the result verifies on its own."""
    with MerkleLogStore.open(built.path, read_only=True) as src:
        items = []
        for stored in src.iter_entries():
            entry = decode_entry(stored.data)
            if isinstance(entry, RoundRecord) and entry.round == round:
                metrics = tuple(
                    (name, accuracy_micros if name == "accuracy" else value)
                    for name, value in entry.metrics
                )
                entry = dataclasses.replace(entry, metrics=metrics)
            kind, site, rnd = entry_tags(entry)
            items.append((kind, encode_entry(entry), site, rnd))
        heads = [SignedTreeHead.from_bytes(h.blob) for h in src.tree_heads()]
    with MerkleLogStore.open(dst) as out:
        out.append_many(items)
        for old in heads:
            root = out.root(old.tree_size)
            new = SignedTreeHead.create(
                built.coordinator, log_id=old.log_id, tree_size=old.tree_size,
                root_hash=root, timestamp_ms=old.timestamp_ms,
            )  # fmt: skip
            out.add_tree_head(new.tree_size, root, new.timestamp_ms, new.to_bytes())
    return dst


@dataclasses.dataclass
class World:
    built: BuiltLog
    pub: str  # the coordinator's public key file: the auditor's trust anchor
    sizes: list[int]  # the honest log's signed tree head sizes, in order
    configs: dict[str, Path]  # site -> client.toml
    witnesses: dict[str, Path]  # site -> its exported receipts
    tmp: Path


def _client_toml(directory: Path, site: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "client.toml"
    path.write_text(
        f'[site]\nname = "{site}"\nstate_dir = "state"\n\n'
        '[coordinator]\nsuperlink = "localhost:9092"\naudit_address = "localhost:9095"\n\n'
        f'[data]\ndataset_dir = "data"\napproved_root = "{"0" * 64}"\n'
    )
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("witness")
    built = build_run_log(tmp / "audit.sqlite")
    sizes = head_sizes(built.path)
    assert len(sizes) == built.rounds + 2  # after the enrolments, each round result, the end
    pub = tmp / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    # The log as it stood when the tree head after round r's result was signed.
    grown = {r: truncate(built.path, tmp / f"at-round-{r}.sqlite", sizes[r]) for r in (1, 2, 3)}
    configs, witnesses = {}, {}
    for site in SITES:
        configs[site] = _client_toml(tmp / site, site)
        checker = ReceiptChecker(
            tmp / site / "state" / "receipts", site=site,
            coordinator_key=built.coordinator.public_key(),
        )  # fmt: skip
        for rnd, path in grown.items():
            with MerkleLogStore.open(path, read_only=True) as store:
                receipt = checker.check_round(
                    LocalSource(store, site), run_id=built.run_id, round=rnd,
                    message_type=INPUT_MESSAGE_TYPE,
                    payload=_payload(store, built.input_index[(site, rnd)]),
                )  # fmt: skip
            assert receipt is not None and receipt.tree_size == sizes[rnd]
        with MerkleLogStore.open(built.path, read_only=True) as store:
            source = LocalSource(store, site)
            checker.observe_tree_head(source, source.latest_tree_head())  # the run's end
            checker.observe_tree_head(source, source.latest_tree_head())  # seen twice
        witnesses[site] = tmp / f"{site}.heads.jsonl"
        result = runner.invoke(
            client_app,
            ["receipts", "export", "--config", str(configs[site]), "--out", str(witnesses[site])],
        )
        assert result.exit_code == 0, result.output
    return World(built, str(pub), sizes, configs, witnesses, tmp)


def verify(world: World, log: Path, *extra: str, witnesses: bool = True) -> object:
    args = ["verify", str(log), "--jobs", "1", "--coordinator-key", world.pub, *extra]
    if witnesses:
        for site in SITES:
            args += ["--witness", str(world.witnesses[site])]
    return runner.invoke(app, args)


# (c) the honest log -------------------------------------------------------------------------


def test_the_honest_log_is_consistent_with_every_sites_receipts(world: World) -> None:
    result = verify(world, world.built.path)
    assert result.exit_code == EXIT_OK, result.output
    verdict = result.stdout.splitlines()[0]
    assert verdict.startswith("OK: ")
    assert "8 witnessed tree heads from 2 file(s) (site(s) site-b, site-c" in verdict
    assert f"up to size {world.sizes[-1]}" in verdict and "all consistent" in verdict
    as_json = json.loads(verify(world, world.built.path, "--json").stdout)
    assert as_json["ok"] and as_json["exit_code"] == EXIT_OK
    assert [(w["sites"], w["tree_heads"]) for w in as_json["witnesses"]] == [
        (["site-b"], 4),
        (["site-c"], 4),
    ]


# (a) truncation -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_a_log_cut_back_to_an_earlier_tree_head_fails_against_the_receipts(
    world: World, keep: int
) -> None:
    """The coordinator deletes the entries and tree heads after its ``keep``-th round result."""
    size = world.sizes[keep]
    cut = truncate(world.built.path, world.tmp / f"cut-{keep}.sqlite", size)
    # Without witnesses the cut log is a log whose run has not ended yet, nothing worse:
    # exit 3 for the open run, and OK with --allow-open (as for a live log).
    alone = verify(world, cut, witnesses=False)
    assert alone.exit_code == EXIT_INCOMPLETE, alone.output
    assert "the last run has not ended" in alone.stderr
    live = verify(world, cut, "--allow-open", witnesses=False)
    assert live.exit_code == EXIT_OK and live.stdout.startswith(f"OK: {size} entries")
    # With the sites' receipts it fails, one line per site, naming the witness file, the site
    # and the first tree size the cut log contradicts.
    result = verify(world, cut, "--allow-open")
    assert result.exit_code == EXIT_FAILED, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(SITES)
    for line, site in zip(lines, SITES, strict=True):
        assert line.startswith(f"FAILED: witness {world.witnesses[site]} line {keep + 1}: ")
        assert f"site {site}'s signed tree head of size {world.sizes[keep + 1]}" in line
        assert f"the log holds only {size}" in line and "cut back" in line
    out = json.loads(verify(world, cut, "--allow-open", "--json").stdout)
    assert not out["ok"] and out["check"] == "witness"
    assert {(w["site"], w["tree_size"], w["check"]) for w in out["witnesses"]} == {
        (site, world.sizes[keep + 1], "truncated") for site in SITES
    }


# (b) rewriting with the real key ------------------------------------------------------------


def test_history_rewritten_and_re_signed_with_the_real_key_fails_against_the_receipts(
    world: World,
) -> None:
    forged = rewrite(world.built, world.tmp / "rewritten.sqlite", round=3, accuracy_micros=990_000)
    assert head_sizes(forged) == world.sizes
    # On its own the rewritten log verifies under the pinned key: nothing in it shows the edit.
    alone = verify(world, forged, witnesses=False)
    assert alone.exit_code == EXIT_OK, alone.output
    # The sites saw the tree head over round 3's real result: it is not a prefix of this log.
    result = verify(world, forged)
    assert result.exit_code == EXIT_FAILED, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(SITES)
    for line, site in zip(lines, SITES, strict=True):
        assert line.startswith(f"FAILED: witness {world.witnesses[site]} line 3: ")
        assert f"site {site}'s signed tree head of size {world.sizes[3]}" in line
        assert "history was rewritten" in line


def test_a_rewritten_log_that_also_grew_fails_all_the_same(world: World, tmp_path: Path) -> None:
    """A second history under the same genesis and key (the envelopes re-signed), longer by a
    run: every witnessed head past the genesis contradicts it."""
    other = build_run_log(
        tmp_path / "fork.sqlite", coordinator=world.built.coordinator, sites=world.built.sites
    )
    assert verify(world, other.path, witnesses=False).exit_code == EXIT_OK
    result = verify(world, other.path)
    assert result.exit_code == EXIT_FAILED
    assert f"line 1: site site-b's signed tree head of size {world.sizes[1]}" in result.stderr


# (d) witnesses the auditor refuses ----------------------------------------------------------


def _with_line(world: World, tmp_path: Path, number: int, head: SignedTreeHead) -> Path:
    lines = world.witnesses["site-b"].read_text().splitlines()
    record = json.loads(lines[number - 1])
    record.update(
        log_id=head.log_id.hex(), tree_size=head.tree_size, root_hash=head.root_hash.hex(),
        timestamp_ms=head.timestamp_ms, sth_b64=base64.b64encode(head.to_bytes()).decode(),
    )  # fmt: skip
    lines[number - 1] = json.dumps(record)
    path = tmp_path / "edited.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _line_head(world: World, number: int) -> SignedTreeHead:
    line = world.witnesses["site-b"].read_text().splitlines()[number - 1]
    return SignedTreeHead.from_bytes(base64.b64decode(json.loads(line)["sth_b64"]))


def test_a_witnessed_head_signed_by_another_key_is_refused(world: World, tmp_path: Path) -> None:
    head = _line_head(world, 2)
    forged = SignedTreeHead.create(
        generate_identity_key(), log_id=head.log_id, tree_size=head.tree_size,
        root_hash=head.root_hash, timestamp_ms=head.timestamp_ms,
    )  # fmt: skip
    path = _with_line(world, tmp_path, 2, forged)
    args = ["verify", str(world.built.path), "--coordinator-key", world.pub, "--witness", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_FAILED
    assert f"witness {path} line 2: site site-b's signed tree head of size" in result.stderr
    assert "not signed by the pinned coordinator key" in result.stderr


def test_a_witnessed_head_of_another_log_is_refused(world: World, tmp_path: Path) -> None:
    """Signed by the real coordinator key, but for another log (e.g. a second deployment)."""
    head = _line_head(world, 2)
    other = SignedTreeHead.create(
        world.built.coordinator, log_id=bytes(16), tree_size=head.tree_size,
        root_hash=head.root_hash, timestamp_ms=head.timestamp_ms,
    )  # fmt: skip
    path = _with_line(world, tmp_path, 2, other)
    args = ["verify", str(world.built.path), "--coordinator-key", world.pub, "--witness", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_FAILED
    assert f"witness {path} line 2: site site-b's" in result.stderr
    assert f"names log {'00' * 16}, but this log is {head.log_id.hex()}" in result.stderr


def test_a_witness_line_whose_copies_disagree_with_the_signed_head_is_unreadable(
    world: World, tmp_path: Path
) -> None:
    lines = world.witnesses["site-b"].read_text().splitlines()
    record = json.loads(lines[0])
    record["tree_size"] += 1
    path = tmp_path / "copies.jsonl"
    path.write_text(json.dumps(record) + "\n")
    args = ["verify", str(world.built.path), "--coordinator-key", world.pub, "--witness", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_UNREADABLE
    assert f"witness {path} line 1" in result.stderr and "tree_size" in result.stderr
    path.write_text("")
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_UNREADABLE and "holds no tree heads" in result.stderr


def test_witnesses_count_only_with_the_pinned_coordinator_key(world: World) -> None:
    witness = ["--witness", str(world.witnesses["site-b"])]
    for anchor in ([], ["--trust-log-key"]):
        result = runner.invoke(app, ["verify", str(world.built.path), *anchor, *witness])
        assert result.exit_code == EXIT_USAGE
    assert "--witness needs --coordinator-key" in result.stderr


# the report ---------------------------------------------------------------------------------


def test_the_report_states_which_witnesses_were_checked_and_their_result(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    witness = [
        "--witness",
        str(world.witnesses["site-b"]),
        "--witness",
        str(world.witnesses["site-c"]),
    ]
    args = ["report", str(world.built.path), "--coordinator-key", world.pub, "--out", str(out)]
    result = runner.invoke(app, [*args, *witness])
    assert result.exit_code == EXIT_OK, result.output
    page = out.read_text()
    assert "<h2>Witnesses</h2>" in page and str(world.witnesses["site-c"]) in page
    assert page.count('class="ok">consistent: all 4 verify under the pinned key') == 2
    assert "8 witnessed tree heads from 2 file(s)" in page
    cut = truncate(world.built.path, tmp_path / "cut.sqlite", world.sizes[2])
    result = runner.invoke(app, ["report", str(cut), *args[2:], *witness])
    assert result.exit_code == EXIT_FAILED
    page = out.read_text()
    assert page.count('class="bad">FAILED (truncated)') == 2 and "cut back" in page
    no_witness = runner.invoke(app, args)
    assert no_witness.exit_code == EXIT_OK and "No witnesses checked" in out.read_text()


# (e) fl-client receipts export --------------------------------------------------------------


def test_receipts_export_writes_the_heads_the_site_verified(world: World) -> None:
    """The fixture exported them; here, what is in the file and on stdout."""
    records = [json.loads(line) for line in world.witnesses["site-b"].read_text().splitlines()]
    assert [r["tree_size"] for r in records] == world.sizes[1:]  # the double sighting once
    key = world.built.coordinator.public_key()
    for record in records:
        assert set(record) == {
            "site", "log_id", "tree_size", "root_hash", "timestamp_ms", "sth_b64",
        }  # fmt: skip
        head = SignedTreeHead.from_bytes(base64.b64decode(record["sth_b64"]))
        head.verify(key)
        assert record["site"] == "site-b" and record["log_id"] == head.log_id.hex()
        assert (record["root_hash"], record["timestamp_ms"]) == (
            head.root_hash.hex(),
            head.timestamp_ms,
        )
    result = runner.invoke(
        client_app, ["receipts", "export", "--config", str(world.configs["site-b"])]
    )
    assert result.exit_code == 0
    assert result.stdout == world.witnesses["site-b"].read_text()
    assert f"wrote 4 signed tree heads of site site-b (sizes {world.sizes[1]} to" in result.stderr


def test_receipts_export_says_clearly_when_the_site_has_none(tmp_path: Path) -> None:
    config = _client_toml(tmp_path / "site-z", "site-z")
    result = runner.invoke(client_app, ["receipts", "export", "--config", str(config)])
    assert result.exit_code == 1
    assert "site site-z has no witnessed tree heads in" in result.stderr
    assert "[coordinator] audit_address" in result.stderr
    receipts = tmp_path / "site-z" / "state" / "receipts"
    receipts.mkdir(parents=True)
    (receipts / "tree_heads.jsonl").write_text("{not json\n")
    result = runner.invoke(client_app, ["receipts", "export", "--config", str(config)])
    assert result.exit_code == 1 and "line 1 is corrupt" in result.stderr
    result = runner.invoke(
        client_app, ["receipts", "export", "--config", str(tmp_path / "missing.toml")]
    )
    assert result.exit_code == 2
