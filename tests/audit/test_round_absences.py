"""A round result names every expected site that is not in its sum, with why (refused, error,
rejected, dropped): a tagged trailing section, so results without it keep their bytes. The
verifier refuses an absent site that is not an active enrolled site or that is also among the
round's accepted inputs (each attack a log its own coordinator rewrote and re-signed), and the
DPO's report says, per round, who was absent and why."""

from __future__ import annotations

import dataclasses
import html
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedseal.audit.auditor import verify_log
from fedseal.audit.cli import EXIT_FAILED, EXIT_OK, app
from fedseal.audit.codec import decode_entry, encode_entry
from fedseal.audit.entries import (
    MAX_ABSENT_REASON,
    MAX_ABSENT_SITES,
    AuditEntry,
    RoundRecord,
    RoundStatus,
    absent_items,
)
from fedseal.audit.errors import AuditStateError, AuditVerificationError
from fedseal.audit.report import collect_view, render_report
from fedseal.audit.store import MerkleLogStore
from fedseal.audit.writer import AuditLog
from fedseal.crypto.keys import save_public_key
from fedseal.protocol.encoding import Writer
from fedseal.protocol.errors import DecodeError
from fedseal.server.audit_hook import AuditHaltError, FailClosedAudit, RunAudit
from tests.audit.logbuilder import BuiltLog, build_run_log, digest, rewrite_log
from tests.audit.reportlogs import ABSENT_REFUSAL, build_consortium_log

runner = CliRunner()

PLAIN = RoundRecord(
    digest("run")[:16], 3, RoundStatus.COMPLETED, digest("m2"), ("site-a", "site-c"),
    tuple(sorted((digest("in", 1), digest("in", 2)))), digest("agg"), digest("m3"), "",
    (("accuracy", 910_000),),
)  # fmt: skip
ABSENT = (
    ("site-b", "refused: privacy budget: epsilon 7.9 of 8 spent"),
    ("site-d", "dropped at masked-input: no reply within 60 s"),
    ("sité-é", "error: KeyError 'label' <script>"),
)


def _section(site: str, reason: str) -> bytes:
    return Writer().text(site).text(reason).to_bytes()


def _with_section(base: bytes, tag: int, items: list[bytes], count: int | None = None) -> bytes:
    n = len(items) if count is None else count
    return base + Writer().u8(tag).count(n).to_bytes() + b"".join(items)


# -- encoding -----------------------------------------------------------------------------------


def test_a_result_without_absent_sites_encodes_exactly_as_before() -> None:
    # The round-result layout as it was before the section existed, written field by field.
    w = Writer().u8(1).u8(4).fixed(PLAIN.run_id, 16).u32(3).u8(1).fixed(PLAIN.base_model_digest, 32)
    w.count(2).text("site-a").text("site-c").count(2)
    for d in PLAIN.accepted_input_digests:
        w.fixed(d, 32)
    w.u8(1).fixed(digest("agg"), 32).fixed(digest("m3"), 32).text("")
    w.count(1).text("accuracy").u64(910_000)
    assert encode_entry(PLAIN) == w.to_bytes()
    with_absent = dataclasses.replace(PLAIN, absent=ABSENT)
    assert encode_entry(with_absent).startswith(encode_entry(PLAIN))


def test_absent_sites_round_trip_sorted_by_their_utf8_bytes() -> None:
    entry = dataclasses.replace(PLAIN, absent=absent_items(dict(reversed(ABSENT))))
    assert entry.absent == ABSENT
    assert decode_entry(encode_entry(entry)) == entry


@pytest.mark.parametrize(
    ("absent", "match"),
    [
        ((("site-d", "x"), ("site-b", "y")), "strictly sorted"),
        ((("site-b", "x"), ("site-b", "y")), "strictly sorted"),
        ((("", "x"),), "1 to 1024 bytes"),
        ((("site-b", ""),), f"1 to {MAX_ABSENT_REASON} bytes"),
        ((("site-b", "é" * (MAX_ABSENT_REASON // 2 + 1)),), f"1 to {MAX_ABSENT_REASON} bytes"),
        ((("site-b", "refused:\nsecond line"),), "one printable line"),
        ((("site-b", "tab\there"),), "one printable line"),
        ((("site-b", "bidi \u2028 separator"),), "one printable line"),
        ((("site-b", 3),), "string pairs"),
        ((("site-b",),), "string pairs"),
        ([("site-b", "x")], "tuple"),
        ((("site-\ud800", "x"),), "not valid UTF-8"),
    ],
)
def test_a_malformed_absent_list_is_a_clear_value_error(absent: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PLAIN, absent=absent)  # type: ignore[arg-type]


def test_more_absent_sites_than_the_bound_are_refused_when_built_and_when_decoded() -> None:
    many = tuple((f"s{i:05d}", "dropped") for i in range(MAX_ABSENT_SITES + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_ABSENT_SITES}"):
        dataclasses.replace(PLAIN, absent=many)
    fits = dataclasses.replace(PLAIN, absent=many[:MAX_ABSENT_SITES])
    assert decode_entry(encode_entry(fits)) == fits
    items = [_section(s, r) for s, r in many]
    with pytest.raises(DecodeError, match="exceeds bound"):
        decode_entry(_with_section(encode_entry(PLAIN), 1, items))


def test_absent_mappings_that_are_not_strings_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="must be strings"):
        absent_items({"site-b": 7})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(lambda base: _with_section(base, 1, []), id="empty section"),
        pytest.param(lambda base: _with_section(base, 2, [_section("site-b", "x")]), id="tag 2"),
        pytest.param(lambda base: _with_section(base, 0, [_section("site-b", "x")]), id="tag 0"),
        pytest.param(
            lambda base: _with_section(_with_section(base, 1, [_section("site-b", "x")]), 1, [_section("site-d", "y")]),
            id="section twice",
        ),
        pytest.param(
            lambda base: _with_section(base, 1, [_section("site-d", "x"), _section("site-b", "y")]),
            id="unsorted",
        ),
        pytest.param(lambda base: _with_section(base, 1, [_section("site-b", "a\nb")]), id="newline"),
        pytest.param(
            lambda base: _with_section(base, 1, [_section("site-b", "x" * (MAX_ABSENT_REASON + 1))]),
            id="reason over the bound",
        ),
        pytest.param(lambda base: _with_section(base, 1, [_section("site-b", "x")], count=2), id="short"),
        pytest.param(lambda base: base + b"\x01", id="tag alone"),
    ],
)  # fmt: skip
def test_a_non_canonical_absent_section_does_not_decode(tail: Callable[[bytes], bytes]) -> None:
    with pytest.raises(DecodeError):
        decode_entry(tail(encode_entry(PLAIN)))


_site = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_reason = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    min_size=1,
    max_size=40,
).filter(str.isprintable)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_site, _reason, min_size=1, max_size=12))
def test_any_absent_mapping_round_trips_to_the_same_bytes(absent: dict[str, str]) -> None:
    entry = dataclasses.replace(PLAIN, absent=absent_items(absent))
    data = encode_entry(entry)
    back = decode_entry(data)
    assert isinstance(back, RoundRecord) and dict(back.absent) == absent
    assert encode_entry(back) == data


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_site, _reason, min_size=1, max_size=6),
    st.data(),
)
def test_a_mutated_absent_section_is_refused_or_decodes_to_exactly_those_bytes(
    absent: dict[str, str], data: st.DataObject
) -> None:
    """Decoding is canonical: whatever bytes decode re-encode to themselves, so no two byte
    strings carry the same result (a flipped, cut or extended section is refused otherwise)."""
    base = encode_entry(PLAIN)
    good = encode_entry(dataclasses.replace(PLAIN, absent=absent_items(absent)))
    section = bytearray(good[len(base) :])
    how = data.draw(st.sampled_from(["flip", "cut", "append", "set"]))
    if how == "cut":
        section = section[: data.draw(st.integers(0, len(section) - 1))]
    elif how == "append":
        section += data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(0, len(section) - 1))
        if how == "flip":
            section[i] ^= 1 << data.draw(st.integers(0, 7))
        else:
            section[i] = data.draw(st.integers(0, 255))
    mutated = base + bytes(section)
    try:
        back = decode_entry(mutated)
    except DecodeError:
        return
    assert encode_entry(back) == mutated
    assert mutated == good or back != decode_entry(good)


# -- the writer and the verifier ----------------------------------------------------------------


def _log(tmp_path: Path, **kw: object) -> BuiltLog:
    """4 sites, 3 rounds: site-a's round-2 input is rejected (unapproved root), site-d is
    revoked after round 2 (its round-3 input rejected)."""
    return build_run_log(tmp_path / "audit.sqlite", rounds=3, **kw)  # type: ignore[arg-type]


def _name_absent(rnd: int, absent: dict[str, str]) -> Callable[[AuditEntry], list[AuditEntry]]:
    def change(entry: AuditEntry) -> list[AuditEntry]:
        if isinstance(entry, RoundRecord) and entry.round == rnd:
            return [dataclasses.replace(entry, absent=absent_items(absent))]
        return [entry]

    return change


def _verify(built: BuiltLog, path: Path) -> None:
    verify_log(path, coordinator_key=built.coordinator.public_key())


def test_a_resigned_log_naming_its_absent_sites_truthfully_verifies(tmp_path: Path) -> None:
    built = _log(tmp_path)
    path = rewrite_log(
        built, tmp_path / "ok.sqlite",
        _name_absent(2, {"site-a": "rejected at masked-input: dataset root not approved"}),
    )  # fmt: skip
    _verify(built, path)


def test_verify_names_an_absent_site_that_is_not_enrolled(tmp_path: Path) -> None:
    built = _log(tmp_path)
    path = rewrite_log(built, tmp_path / "bad.sqlite", _name_absent(2, {"site-zz": "refused: x"}))
    with pytest.raises(AuditVerificationError) as err:
        _verify(built, path)
    assert err.value.check == "not-enrolled" and "'site-zz'" in err.value.detail
    assert "round 2" in err.value.detail


def test_verify_refuses_a_site_both_in_the_sum_and_absent(tmp_path: Path) -> None:
    built = _log(tmp_path)
    path = rewrite_log(
        built, tmp_path / "bad.sqlite", _name_absent(1, {"site-b": "dropped at masked-input"})
    )
    with pytest.raises(AuditVerificationError) as err:
        _verify(built, path)
    assert err.value.check == "absent" and "'site-b'" in err.value.detail
    assert "accepted" in err.value.detail
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    res = runner.invoke(app, ["verify", str(path), "--coordinator-key", str(pub)])
    assert res.exit_code == EXIT_FAILED and "site-b" in res.output


def test_a_site_revoked_mid_run_may_be_named_absent_with_its_rejection(tmp_path: Path) -> None:
    built = _log(tmp_path)
    why = "rejected at masked-input: the site's key is revoked"
    path = rewrite_log(built, tmp_path / "ok.sqlite", _name_absent(3, {"site-d": why}))
    _verify(built, path)


def _open_round(tmp_path: Path) -> tuple[BuiltLog, AuditLog]:
    """The log after round 3 with the run still open (round 4 received nothing yet)."""
    built = _log(tmp_path, end_run=False)
    log = AuditLog.open(built.path, signer=built.coordinator, now_ms=2_000_000_000_000)
    return built, log


def test_the_writer_refuses_up_front_what_verify_would_reject(tmp_path: Path) -> None:
    built, log = _open_round(tmp_path)
    model = built.models[-1]
    size = log.size
    for absent, words in (
        ({"mallory": "refused: x"}, "'mallory', which is not enrolled"),
    ):
        with pytest.raises(AuditStateError, match=words):
            log.append_round_result(
                4, aggregate_digest=None, new_model_digest=model, status=RoundStatus.FAILED,
                reason="too few", absent=absent,
            )  # fmt: skip
    with pytest.raises(ValueError, match="one printable line"):
        log.append_round_result(
            4, aggregate_digest=None, new_model_digest=model, status=RoundStatus.FAILED,
            absent={"site-a": "two\nlines"},
        )  # fmt: skip
    assert log.size == size
    log.close()


def test_the_coordinators_hook_records_absent_reasons_as_one_bounded_line(tmp_path: Path) -> None:
    built, log = _open_round(tmp_path)
    audit = RunAudit(log, built.path)
    long = "refused: " + "ü" * 400  # 809 bytes of UTF-8
    audit.round_result(
        4, None, built.models[-1], failed="2 masked inputs, min_survivors is 3",
        absent={"site-c": "refused:\tprivacy\nbudget  spent\x00", "site-a": long, "site-b": ""},
    )  # fmt: skip
    last = decode_entry(log.store.entries(log.size - 1, log.size)[0].data)
    assert isinstance(last, RoundRecord) and last.status == RoundStatus.FAILED
    reasons = dict(last.absent)
    assert [s for s, _ in last.absent] == ["site-a", "site-b", "site-c"]
    assert reasons["site-c"] == "refused: privacy budget spent"
    assert reasons["site-b"] == "no reason given"
    assert reasons["site-a"].startswith("refused: üü") and reasons["site-a"].endswith("…")
    assert len(reasons["site-a"].encode()) <= MAX_ABSENT_REASON
    log.close()
    _verify(built, built.path)


def test_a_sites_error_text_is_logged_as_its_kind_only(tmp_path: Path) -> None:
    """The signed log is append-only: a site's error reply can quote its data, so only the
    error's kind is kept (the whole line stays in rounds.jsonl and on the console)."""
    built, log = _open_round(tmp_path)
    RunAudit(log, built.path).round_result(
        4, None, built.models[-1], failed="x",
        absent={
            "site-a": "error: RecipeError: recipe 'm:r': could not convert string to float: 'Jane Doe'",
            "site-b": "error: <html>",
            "site-c": "refused: differential privacy: noise below this site's floor",
        },
    )  # fmt: skip
    last = decode_entry(log.store.entries(log.size - 1, log.size)[0].data)
    assert isinstance(last, RoundRecord)
    assert dict(last.absent) == {
        "site-a": "error: RecipeError",
        "site-b": "error",
        "site-c": "refused: differential privacy: noise below this site's floor",
    }
    log.close()


def test_a_result_naming_an_unenrolled_site_absent_halts_a_fail_closed_run(tmp_path: Path) -> None:
    built, log = _open_round(tmp_path)
    halted: list[str] = []
    audit = FailClosedAudit(RunAudit(log, built.path), halt=halted.append)
    size = log.size
    with pytest.raises(AuditHaltError, match="mallory"):
        audit.round_result(4, None, built.models[-1], failed="x", absent={"mallory": "dropped"})
    assert halted and "round result" in halted[0] and log.size == size
    audit.round_result(4, None, built.models[-1], failed="x", absent={"site-b": "dropped"})
    assert log.size == size + 1
    log.close()


# -- the report -----------------------------------------------------------------------------------


def _page(path: Path) -> str:
    with MerkleLogStore.open(path, read_only=True) as store:
        return render_report(collect_view(store), "absences", "verified")


def _section_html(page: str, anchor: str) -> str:
    start = page.index(f'<h2 id="{anchor}">')
    end = page.find("<h2", start + 1)
    return page[start:end]


def _rounds_row(page: str, rnd: int) -> str:
    rows = _section_html(page, "rounds").split("<tr>")[2:]
    row = next(r for r in rows if re.match(rf"<td>[0-9a-f]{{8}}</td><td>{rnd}</td>", r))
    return row


def test_the_report_says_per_round_which_sites_were_absent_and_why(tmp_path: Path) -> None:
    # 8 sites x 5 rounds: hospital-006 sends nothing in round 2 (its result says it dropped),
    # hospital-001's round-2 input is rejected; both are named absent in round 2's result.
    built = build_consortium_log(tmp_path / "audit.sqlite", sites=8, rounds=5)
    assert built.absent == {("hospital-006", 2)}
    page = _page(built.path)
    row = _rounds_row(page, 2)  # 3 sites: counted by kind, the sites one click away
    assert (
        "<details><summary>3 sites: 2 rejected at masked-input, 1 dropped at masked-input"
        "</summary>" in row
    )
    assert "<div>dropped at masked-input: no reply within 60 s (1): hospital-006</div>" in row
    assert "<div>rejected at masked-input: dataset root not approved (1): hospital-001</div>" in row
    # One site not in the sum (the outsider, rejected): named inline.
    assert "&quot;&gt; (rejected at masked-input: signer not enrolled &lt;script&gt;" in (
        _rounds_row(page, 1)
    )
    chart = _section_html(page, "participation")
    assert (
        "hospital-006, round 2: expected (in the round&#x27;s cohort), sent no masked input "
        "(dropped at masked-input: no reply within 60 s)" in chart
    )
    absences = page[page.index("Expected sites that sent nothing") :]
    assert (
        "<td>dropped at masked-input</td><td>dropped at masked-input: no reply within 60 s</td>"
        "<td>1</td><td><div>hospital-006: 2</div></td>" in absences
    )
    assert "Expected sites sent nothing in 1 site-round (1 dropped at masked-input)" in page
    sites = _section_html(page, "sites")
    assert "sent nothing: 2: dropped at masked-input: no reply within 60 s" in sites


def test_a_log_whose_results_give_no_reasons_says_so(tmp_path: Path) -> None:
    built = build_consortium_log(tmp_path / "audit.sqlite", sites=8, rounds=5, absent_reasons=False)
    page = _page(built.path)
    assert "<div>sent nothing (1): hospital-006</div>" in _rounds_row(page, 2)
    assert "(1 sent nothing (no reason logged))" in _section_html(page, "summary")


def test_at_100_sites_by_50_rounds_absences_are_counted_by_kind_with_the_sites_folded(
    tmp_path: Path,
) -> None:
    built = build_consortium_log(tmp_path / "audit.sqlite", sites=100, rounds=50)
    pub = tmp_path / "coordinator.pub"
    save_public_key(built.coordinator.public_key(), pub)
    out = tmp_path / "report.html"
    res = runner.invoke(
        app, ["report", str(built.path), "--out", str(out), "--coordinator-key", str(pub)]
    )
    assert res.exit_code == EXIT_OK, res.output
    page = out.read_text(encoding="utf-8")
    assert ABSENT_REFUSAL not in page and html.escape(ABSENT_REFUSAL) in page
    # The committed round with the most sites not in its sum (more than are named inline).
    missing = Counter(r for _, r in built.absent_reasons if r != built.failed_round)
    rnd = max(missing, key=lambda r: (missing[r], -r))
    site = min(s for s, r in built.absent if r == rnd)
    row = _rounds_row(page, rnd)
    summary = re.search(r"<details><summary>(\d+) sites: (.*?)</summary>", row)
    assert summary is not None, row[:400]
    reason = html.escape(built.absent_reasons[(site, rnd)])
    assert re.search(rf"<div>{re.escape(reason)} \(\d+\): [^<]*\b{re.escape(site)}\b", row), row
    n_missing = sum(1 for _, r in built.absent_reasons if r == rnd) + 1  # + the outsider
    assert int(summary.group(1)) == n_missing
    kinds = dict(
        (kind, int(n)) for n, kind in re.findall(r"(\d+) ([^,]+?)(?:, |$)", summary.group(2))
    )
    assert sum(kinds.values()) == n_missing
    # Every absent site-round of the run is in the absences table, counted by reason.
    absences = page[page.index("Expected sites that sent nothing") :]
    total = re.search(r"by reason \((\d+) site-rounds\)", absences)
    assert total is not None and int(total.group(1)) == len(built.absent)
    summary_text = _section_html(page, "summary")
    assert f"Expected sites sent nothing in {len(built.absent)} site-rounds" in summary_text
