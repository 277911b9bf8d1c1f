"""Checking a CSV source against a data contract, row by row (``fl-client data prepare --contract``).

The contract format and its digest are :mod:`fedseal.protocol.contract` (the coordinator loads
the same files). Here every row of a CSV is checked before anything is published:

1. **Header** (line 1): every contract column is present, named once; other columns are left
   out of the shards. Columns are matched by name, so their order in the file does not matter;
   the shards hold the features in the contract's order, then the label.
2. **Cells**: a null cell (empty or one of :data:`~fedseal.protocol.contract.NULL_TOKENS`)
   refuses the row (``nulls = "refuse"``) or drops it and counts it (``"drop"``); an ``int``
   feature must be a decimal integer, a ``float`` feature a finite number; the label a
   decimal integer in the contract's set.
3. **Rows**: every line is one row with as many cells as the header (a blank line is refused,
   and a line break inside a quoted cell is not supported: line numbers stay exact).

The first violation raises :class:`~.errors.ContractViolationError` naming the file, line,
column and value. Checks are vectorised per record batch (pyarrow compute); only a batch that
fails is searched cell by cell for the first bad value.

Example::

    checker = ContractChecker(load_contract("contract.json"), "site.csv")
    typed = checker.convert(raw_string_batch)   # contract order, float64/int64 columns
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedseal.protocol.contract import NULL_TOKENS, DataContract

from .errors import ContractViolationError, SourceError

__all__ = ["ContractChecker", "check_header", "find_bad_row", "read_header"]

MAX_HEADER_BYTES = 1 << 20
_INT = r"^[+-]?[0-9]+$"
_NULLS = pa.array(sorted(NULL_TOKENS), pa.string())
_DTYPES = {"float": pa.float64(), "int": pa.int64()}


def read_header(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a CSV file's first line (compressed files are decompressed).

    Raises:
        SourceError: The file cannot be read, its first line is not UTF-8 or is too long.
    """
    name = os.fspath(path)
    try:
        with pa.input_stream(name, compression="detect") as stream:
            head = stream.read(MAX_HEADER_BYTES)
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(name, f"cannot read CSV: {exc}") from exc
    line, newline, _ = head.partition(b"\n")
    if not newline and len(head) == MAX_HEADER_BYTES:
        raise SourceError(name, f"line 1: header longer than {MAX_HEADER_BYTES} bytes")
    try:
        text = line.decode("utf-8-sig").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise SourceError(name, f"line 1: header is not UTF-8: {exc}") from exc
    return next(csv.reader([text]), [])


def check_header(name: str, header: Sequence[str], contract: DataContract) -> None:
    """Every contract column present once in ``header``.

    Raises:
        ContractViolationError: Line 1, naming the missing or repeated column.
    """
    seen: set[str] = set()
    for column in header:
        if column in seen and column in contract.columns:
            raise ContractViolationError(
                name, 1, column, column, "column named twice in the header"
            )
        seen.add(column)
    for column in contract.columns:
        if column not in seen:
            role = "label" if column == contract.label else "feature"
            raise ContractViolationError(
                name, 1, column, None,
                f"{role} column missing from the header (columns: {', '.join(header[:8])}"
                f"{', ...' if len(header) > 8 else ''})",
            )  # fmt: skip


def find_bad_row(path: str | os.PathLike[str], width: int) -> tuple[int, str]:
    """The first line (1-based) whose cell count is not ``width``, and its text (for the
    one-line error of a row pyarrow refused; only read after a parse error)."""
    name = os.fspath(path)
    with pa.input_stream(name, compression="detect") as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
        for number, line in enumerate(text, start=1):
            stripped = line.rstrip("\r\n")
            cells = next(csv.reader([stripped]), [])
            if len(cells) != width:
                return number, stripped
    return 0, ""


def _first(mask: np.ndarray) -> int:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else -1


class ContractChecker:
    """Converts raw (all-text) record batches of one CSV file into the contract's typed
    columns, checking every cell; counts the rows checked and dropped.

    Attributes:
        rows_seen: Data rows read so far (dropped ones included).
        rows_dropped: Rows dropped for a null cell (``nulls = "drop"``).
    """

    def __init__(self, contract: DataContract, name: str) -> None:
        self.contract = contract
        self.name = name
        self.rows_seen = 0
        self.rows_dropped = 0
        self._labels = pa.array(contract.label_values, pa.int64())
        fields = [pa.field(f.name, _DTYPES[f.dtype], nullable=False) for f in contract.features]
        self.schema = pa.schema([*fields, pa.field(contract.label, pa.int64(), nullable=False)])

    def _fail(
        self, row: int, column: str, value: str | None, reason: str
    ) -> ContractViolationError:
        # Line 1 is the header; data row i (0-based, over the whole file) is on line i + 2.
        return ContractViolationError(self.name, self.rows_seen + row + 2, column, value, reason)

    def convert(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Check one batch of text cells and return it typed, in the contract's column order.

        Raises:
            ContractViolationError: The first bad cell (row order, then column order).
        """
        c = self.contract
        n = batch.num_rows
        trimmed = {col: pc.utf8_trim_whitespace(batch.column(col)) for col in c.columns}
        null_masks = {
            col: pc.is_in(pc.utf8_lower(values), value_set=_NULLS).to_numpy(zero_copy_only=False)
            for col, values in trimmed.items()
        }
        any_null = np.zeros(n, bool)
        for mask in null_masks.values():
            any_null |= mask
        rows = np.arange(n)
        if any_null.any():
            if c.nulls == "refuse":
                row = _first(any_null)
                column = next(col for col in c.columns if null_masks[col][row])
                raw = batch.column(column)[row].as_py()
                raise self._fail(row, column, raw, 'null cell (contract nulls = "refuse")')
            keep = ~any_null
            rows = rows[keep]
            selector = pa.array(keep)
            trimmed = {col: pc.filter(values, selector) for col, values in trimmed.items()}
            self.rows_dropped += int(any_null.sum())
        arrays = [
            self._typed(spec.name, spec.dtype, trimmed[spec.name], rows) for spec in c.features
        ]
        labels = self._typed(c.label, "int", trimmed[c.label], rows)
        allowed = pc.is_in(labels, value_set=self._labels).to_numpy(zero_copy_only=False)
        if not allowed.all():
            i = _first(~allowed)
            shown = ", ".join(str(v) for v in c.label_values[:16]) + (
                ", ..." if len(c.label_values) > 16 else ""
            )
            raise self._fail(
                int(rows[i]),
                c.label,
                trimmed[c.label][i].as_py(),
                f"label not in the contract's set {{{shown}}}",
            )
        self.rows_seen += n
        return pa.RecordBatch.from_arrays([*arrays, labels], schema=self.schema)

    def _typed(self, column: str, dtype: str, values: pa.Array, rows: np.ndarray) -> pa.Array:
        if dtype == "int":
            ok = pc.match_substring_regex(values, _INT).to_numpy(zero_copy_only=False)
            if not ok.all():
                i = _first(~ok)
                raise self._fail(
                    int(rows[i]), column, values[i].as_py(), "not an integer (contract dtype int)"
                )
            try:
                return pc.cast(values, pa.int64())
            except pa.ArrowInvalid:
                i = self._first_uncastable(values, pa.int64())
                raise self._fail(
                    int(rows[i]), column, values[i].as_py(), "integer out of the int64 range"
                ) from None
        try:
            out = pc.cast(values, pa.float64())
        except pa.ArrowInvalid:
            i = self._first_uncastable(values, pa.float64())
            raise self._fail(
                int(rows[i]), column, values[i].as_py(), "not a number (contract dtype float)"
            ) from None
        finite = pc.is_finite(out).to_numpy(zero_copy_only=False)
        if not finite.all():
            i = _first(~finite)
            raise self._fail(
                int(rows[i]),
                column,
                values[i].as_py(),
                "not a finite number (contract dtype float)",
            )
        return out

    @staticmethod
    def _first_uncastable(values: pa.Array, target: pa.DataType) -> int:
        for i in range(len(values)):
            try:
                pc.cast(values.slice(i, 1), target)
            except pa.ArrowInvalid:
                return i
        return 0  # pragma: no cover - the batch failed to cast, so some cell does
