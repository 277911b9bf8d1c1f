"""The data contract at prepare time (issue 18.4): a CSV missing a feature column, or with
empty/"n/a" cells, used to pass ``prepare``, ``attest`` and ``enroll`` and fail only at run
time, at the site with the *correct* data. Now ``fl-client data prepare --contract`` refuses
the first bad row with file, line, column and value, writes nothing, and records the
contract's digest in the manifest; ``fl-client run`` refuses a dataset prepared under another
contract than its ``[data] contract``."""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedseal.client.cli import app
from fedseal.client.data import SourceError, load_manifest, prepare_dataset
from fedseal.client.data.errors import ContractViolationError, ExtensionError
from fedseal.client.data.prepare import PrepareOptions, append_to_dataset
from fedseal.client.flower_app import check_contract as check_setup_contract
from fedseal.client.node import SiteRunError, check_contract
from fedseal.client.policy import SiteRefusal
from fedseal.protocol.contract import ContractError, DataContract, load_contract, parse_contract

runner = CliRunner()
SALT = bytes(range(32))
OPTS = PrepareOptions(shuffle=False)

DOC: dict[str, Any] = {
    "format": "fedseal-data-contract/1",
    "name": "cardio",
    "features": [
        {"name": "age", "dtype": "float"},
        {"name": "smoker", "dtype": "int"},
        {"name": "bp", "dtype": "float"},
    ],
    "label": {"name": "outcome", "values": [0, 1, 2]},
    "nulls": "refuse",
}
GOOD_ROWS = [["61.5", "0", "120", "1"], ["45", "1", "135.2", "0"], ["70", "0", "99", "2"]]
HEADER = ["age", "smoker", "bp", "outcome"]


def contract(**changes: Any) -> DataContract:
    return parse_contract({**DOC, **changes})


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return path


def prepare(
    tmp_path: Path, rows: list[list[str]], c: DataContract | None = None, header: list[str] = HEADER
) -> Path:
    src = write_csv(tmp_path / "site.csv", header, rows)
    prepare_dataset(src, tmp_path / "out", options=OPTS, salt=SALT, contract=c or contract())
    return tmp_path / "out"


def refused(
    tmp_path: Path, rows: list[list[str]], c: DataContract | None = None, header: list[str] = HEADER
) -> SourceError:
    with pytest.raises(SourceError) as err:
        prepare(tmp_path, rows, c, header)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["site.csv"]  # no staging directory left
    return err.value


# -- the contract and its digest --------------------------------------------------------------


def test_the_digest_is_sha256_of_the_canonical_json_and_stable() -> None:
    import hashlib

    c = contract()
    canonical = (
        '{"features":[{"dtype":"float","name":"age"},{"dtype":"int","name":"smoker"},'
        '{"dtype":"float","name":"bp"}],"format":"fedseal-data-contract/1",'
        '"label":{"name":"outcome","values":[0,1,2]},"name":"cardio","nulls":"refuse"}'
    )
    assert c.canonical_bytes() == canonical.encode()
    assert c.digest() == hashlib.sha256(canonical.encode()).digest()
    assert (
        c.digest().hex() == "dee73208fadbf95977a9e73f017d2bdc9f29cad80224b0a3e9784378c08ab2f7"
    )  # pinned


def test_key_order_spacing_label_order_and_omitted_defaults_do_not_change_the_digest(
    tmp_path: Path,
) -> None:
    shuffled = {
        "nulls": "refuse",
        "label": {"values": [2, 0, 1], "name": "outcome"},
        "features": DOC["features"],
        "name": "cardio",
        "format": "fedseal-data-contract/1",
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(shuffled, indent=7))
    assert load_contract(path).digest() == contract().digest()
    without_default = {k: v for k, v in DOC.items() if k != "nulls"}
    assert parse_contract(without_default).digest() == contract().digest()


@pytest.mark.parametrize(
    "change",
    [
        {"features": [DOC["features"][1], DOC["features"][0], DOC["features"][2]]},  # order
        {"features": [*DOC["features"][:2], {"name": "bp", "dtype": "int"}]},  # a dtype
        {"features": DOC["features"][:2]},  # a column fewer
        {"label": {"name": "outcome", "values": [0, 1]}},  # the label set
        {"label": {"name": "target", "values": [0, 1, 2]}},  # the label column
        {"nulls": "drop"},
        {"name": "cardio-v2"},
    ],
)
def test_any_change_of_columns_dtypes_labels_or_null_policy_changes_the_digest(
    change: dict[str, Any],
) -> None:
    assert contract(**change).digest() != contract().digest()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"format": "v0"}, "format"),
        ({"features": []}, "features"),
        ({"features": [{"name": "age", "dtype": "string"}]}, "features[0].dtype"),
        ({"features": [{"name": "age"}]}, "'dtype' missing"),
        ({"label": {"name": "outcome", "values": [0, 0]}}, "label.values lists a label twice"),
        ({"label": {"name": "outcome", "values": [0, True]}}, "label.values"),
        ({"label": {"name": "age", "values": [0]}}, "column 'age' is named twice"),
        ({"nulls": "ignore"}, "nulls"),
        ({"colour": "red"}, "unknown field 'colour'"),
    ],
)
def test_a_malformed_contract_is_refused_naming_the_field(
    change: dict[str, Any], named: str
) -> None:
    with pytest.raises(ContractError) as err:
        parse_contract({**DOC, **change})
    assert named in str(err.value)


# -- prepare: every kind of bad row, named by file, line and column ---------------------------


def test_a_csv_following_the_contract_is_prepared_in_contract_order_and_the_manifest_names_it(
    tmp_path: Path,
) -> None:
    # Columns in another order, and an identifier column the contract does not name.
    header = ["patient_id", "outcome", "bp", "smoker", "age"]
    rows = [
        ["p1", "1", "120", "0", " 61.5 "],
        ["p2", "0", "135.2", "1", "45"],
        ["p3", "2", "99", "0", "70"],
    ]
    out = prepare(tmp_path, rows, header=header)
    table = pq.read_table(next(out.glob("*.parquet")))
    assert table.column_names == ["age", "smoker", "bp", "outcome"]  # no patient_id
    assert table.column("age").to_pylist() == [61.5, 45.0, 70.0]
    assert str(table.schema.field("smoker").type) == "int64"
    manifest = load_manifest(out)
    assert manifest.contract == contract().digest()
    assert manifest.schema.feature_columns == ("age", "smoker", "bp")
    assert manifest.schema.num_classes == 3
    assert (
        json.loads((out / "fedseal-manifest.json").read_text())["contract"]
        == contract().digest().hex()
    )


def test_a_dataset_prepared_without_a_contract_has_no_contract_field(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "s.csv", HEADER, GOOD_ROWS)
    prepare_dataset(src, tmp_path / "out", label_column="outcome", options=OPTS, salt=SALT)
    assert "contract" not in json.loads((tmp_path / "out" / "fedseal-manifest.json").read_text())
    assert load_manifest(tmp_path / "out").contract == b""


def test_a_missing_feature_column_is_refused_at_line_1(tmp_path: Path) -> None:
    header = ["age", "smoker", "outcome"]
    err = refused(tmp_path, [r[:2] + r[3:] for r in GOOD_ROWS], header=header)
    assert isinstance(err, ContractViolationError)
    assert (err.line, err.column) == (1, "bp")
    assert str(err).startswith(
        f"{tmp_path / 'site.csv'}: line 1, column 'bp': feature column missing"
    )


@pytest.mark.parametrize(
    ("cell", "column", "value", "reason"),
    [
        ((1, 0), "age", "n/a", 'null cell (contract nulls = "refuse")'),
        ((2, 2), "bp", "", 'null cell (contract nulls = "refuse")'),
        ((2, 3), "outcome", "NA", 'null cell (contract nulls = "refuse")'),
        ((1, 1), "smoker", "1.0", "not an integer (contract dtype int)"),
        ((1, 1), "smoker", "0x1", "not an integer (contract dtype int)"),
        ((0, 2), "bp", "high", "not a number (contract dtype float)"),
        ((2, 0), "age", "inf", "not a finite number (contract dtype float)"),
        ((1, 3), "outcome", "7", "label not in the contract's set {0, 1, 2}"),
        ((1, 3), "outcome", "1.5", "not an integer (contract dtype int)"),
    ],
)
def test_each_kind_of_bad_cell_is_refused_with_file_line_column_and_value(
    tmp_path: Path, cell: tuple[int, int], column: str, value: str, reason: str
) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    rows[cell[0]][cell[1]] = value
    err = refused(tmp_path, rows)
    assert isinstance(err, ContractViolationError)
    assert (err.line, err.column, err.value) == (cell[0] + 2, column, value)
    assert (
        str(err)
        == f"{tmp_path / 'site.csv'}: line {cell[0] + 2}, column {column!r}: {reason}, value {value!r}"
    )


def test_a_row_with_too_few_cells_is_refused_with_its_line(tmp_path: Path) -> None:
    err = refused(tmp_path, [GOOD_ROWS[0], ["45", "1"], GOOD_ROWS[2]])
    assert "line 3: the row has not the header's 4 cells" in str(err)


def test_a_column_named_twice_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, [[*r, "0"] for r in GOOD_ROWS], header=[*HEADER, "age"])
    assert isinstance(err, ContractViolationError) and (err.line, err.column) == (1, "age")


def test_the_drop_policy_drops_and_counts_rows_with_null_cells(tmp_path: Path) -> None:
    rows = [GOOD_ROWS[0], ["n/a", "1", "135.2", "0"], GOOD_ROWS[2], ["50", "", "1", "1"]]
    out = prepare(tmp_path, rows, contract(nulls="drop"))
    manifest = load_manifest(out)
    assert manifest.rows == 2
    assert "2 rows with null cells dropped" in manifest.source
    assert manifest.contract == contract(nulls="drop").digest()


def test_a_non_csv_source_with_a_contract_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="a data contract checks CSV sources"):
        prepare_dataset("mnist-5k", tmp_path / "out", contract=contract())


CELL = st.text(alphabet=string.digits, min_size=1, max_size=4)
BAD = st.sampled_from(["", "n/a", "NaN", "null", "abc", "1.2.3", "inf"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(CELL, st.sampled_from(["0", "1"]), CELL, st.sampled_from(["0", "1", "2"])),
        min_size=1,
        max_size=30,
    ),
    where=st.tuples(st.integers(0, 10_000), st.sampled_from([0, 2])),
    bad=BAD,
)
def test_the_first_bad_float_cell_anywhere_is_named_by_its_line_and_column(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[str, ...]],
    where: tuple[int, int],
    bad: str,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    table = [list(r) for r in rows]
    row = where[0] % len(table)
    table[row][where[1]] = bad
    err = refused(tmp, table)
    assert isinstance(err, ContractViolationError)
    assert (err.line, err.column, err.value) == (row + 2, HEADER[where[1]], bad)


@pytest.mark.parametrize("nulls", ["refuse", "drop"])
def test_rows_beyond_the_first_record_batch_are_named_by_their_exact_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nulls: str
) -> None:
    from fedseal.client.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "CSV_BLOCK_BYTES", 4096)  # many record batches
    rows = [["1.5", "0", "2", "1"]] * 20_000
    rows[5] = ["", "0", "2", "1"]  # dropped under "drop": later lines keep their numbers
    rows[17_001] = ["1.5", "0", "high", "1"]
    err = refused(tmp_path, rows, contract(nulls=nulls))
    assert isinstance(err, ContractViolationError)
    assert (err.line, err.column) == ((7, "age") if nulls == "refuse" else (17_003, "bp"))


# -- append, the CLI, and the site's start -----------------------------------------------------


def test_appending_under_another_contract_or_none_is_refused(tmp_path: Path) -> None:
    out = prepare(tmp_path, GOOD_ROWS)
    more = write_csv(tmp_path / "more.csv", HEADER, GOOD_ROWS)
    with pytest.raises(ExtensionError, match="prepared under contract"):
        append_to_dataset(more, out, options=OPTS, contract=contract(nulls="drop"))
    with pytest.raises(ExtensionError, match="none \\(pass --contract\\)"):
        append_to_dataset(more, out, label_column="outcome", options=OPTS)
    manifest, _proof = append_to_dataset(more, out, options=OPTS, contract=contract())
    assert manifest.rows == 6 and manifest.contract == contract().digest()


def test_the_cli_prints_the_digest_and_refuses_a_bad_row_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(DOC))
    result = runner.invoke(app, ["data", "contract-digest", str(path)])
    assert result.exit_code == 0 and result.stdout.strip() == contract().digest().hex()
    rows = [list(r) for r in GOOD_ROWS]
    rows[2][0] = "n/a"
    src = write_csv(tmp_path / "site.csv", HEADER, rows)
    result = runner.invoke(
        app, ["data", "prepare", str(src), str(tmp_path / "out"), "--contract", str(path)]
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {src}: line 4, column 'age': null cell (contract nulls = \"refuse\"), value 'n/a'"
    )
    assert not (tmp_path / "out").exists()
    path.write_text(json.dumps({**DOC, "nulls": "sometimes"}))
    result = runner.invoke(app, ["data", "contract-digest", str(path)])
    assert result.exit_code == 1 and "nulls must be one of refuse, drop" in result.stderr


def test_the_site_refuses_to_start_when_its_dataset_follows_another_contract(
    tmp_path: Path,
) -> None:
    out = prepare(tmp_path, GOOD_ROWS)
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(DOC))
    cfg: Any = SimpleNamespace(dataset_dir=out, contract=path)
    assert check_contract(cfg) == contract().digest()
    path.write_text(json.dumps({**DOC, "nulls": "drop"}))
    with pytest.raises(SiteRunError) as err:
        check_contract(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert f"was prepared under contract {contract().digest().hex()}" in message
    assert f"has digest {contract(nulls='drop').digest().hex()}" in message
    cfg_none: Any = SimpleNamespace(dataset_dir=out, contract=None)
    assert check_contract(cfg_none) == contract().digest()  # reported to the coordinator as is


def test_a_setup_naming_another_contract_is_refused_and_one_without_is_accepted() -> None:
    mine, other = contract().digest(), contract(nulls="drop").digest()
    check_setup_contract(mine, mine)
    check_setup_contract(mine, b"")  # a run without a contract works as before
    with pytest.raises(
        SiteRefusal,
        match=f"names contract {other.hex()}, this site's dataset was prepared under contract {mine.hex()}",
    ):
        check_setup_contract(mine, other)
    with pytest.raises(SiteRefusal, match="prepared under no contract"):
        check_setup_contract(b"", other)


@pytest.mark.parametrize("values", [[-1, 1], [0, 1 << 40], [0, 1 << 16]])
def test_a_contract_whose_labels_are_not_small_class_indices_is_refused(values: list[int]) -> None:
    from fedseal.protocol.contract import ContractError, parse_contract

    doc = {
        "format": "fedseal-data-contract/1",
        "features": [{"name": "x", "dtype": "float"}],
        "label": {"name": "y", "values": values},
    }
    with pytest.raises(ContractError, match="class indices"):
        parse_contract(doc, "contract.json")
