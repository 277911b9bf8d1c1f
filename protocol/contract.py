"""The data contract: what every site's dataset of a run holds, and its canonical digest.

A coordinator publishes a contract (``server.toml [run] contract``); sites prepare their data
against it (``fl-client data prepare --contract``), which records the digest in the dataset's
manifest; the digest is signed into every round setup and compared at a run's start
(``query.policy``), so a site whose data follows another contract (a missing column, another
label set) is named before the first round instead of failing in it.

The file is JSON::

    {
      "format": "fedseal-data-contract/1",
      "name": "cardio-30",                                   # optional, free text
      "features": [{"name": "age", "dtype": "float"},        # in order; dtype "float" or "int"
                   {"name": "smoker", "dtype": "int"}],
      "label": {"name": "outcome", "values": [0, 1]},        # integer class labels allowed
      "nulls": "refuse"                                      # or "drop": skip and count the row
    }

A cell is null when it is empty or one of :data:`NULL_TOKENS` (after trimming spaces).

Digest (:meth:`DataContract.digest`): SHA-256 of the canonical JSON of the parsed contract
(:meth:`DataContract.canonical_bytes`: every field present, label values sorted, keys sorted,
no whitespace, UTF-8), so key order, spacing and an omitted default never change it while any
column, dtype, label or the null policy does::

    contract = load_contract("contract.json")      # raises ContractError naming the field
    contract.digest().hex()

Pure stdlib (no pyarrow): the coordinator loads contracts too; the site's row checks are in
:mod:`fedseal.client.data.contract`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "CONTRACT_DIGEST_BYTES",
    "CONTRACT_FORMAT",
    "DTYPES",
    "NULL_POLICIES",
    "NULL_TOKENS",
    "ContractError",
    "DataContract",
    "FeatureSpec",
    "load_contract",
    "parse_contract",
]

CONTRACT_FORMAT = "fedseal-data-contract/1"
CONTRACT_DIGEST_BYTES = 32
MAX_CONTRACT_BYTES = 1 << 20
MAX_COLUMNS = 1 << 16
MAX_LABELS = 1 << 16
MAX_NAME_CHARS = 256
DTYPES = ("float", "int")
NULL_POLICIES = ("refuse", "drop")
NULL_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "-", "?"})
"""Cells read as null (compared after trimming spaces, ignoring case)."""

Dtype = Literal["float", "int"]
NullPolicy = Literal["refuse", "drop"]


class ContractError(ConfigError):
    """A contract file is unreadable or malformed.

    Attributes:
        path: The contract file (or ``"<contract>"`` for a parsed document).
        reason: What is wrong, naming the field.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature column: its name and dtype (``"float"``: any finite number; ``"int"``: an
    integer)."""

    name: str
    dtype: Dtype


@dataclass(frozen=True, slots=True)
class DataContract:
    """A parsed data contract (module docstring).

    Attributes:
        features: The feature columns, in the order the model sees them.
        label: The integer class-label column.
        label_values: The labels allowed, sorted.
        nulls: ``"refuse"`` a row with a null cell, or ``"drop"`` it (and count it).
        name: Free text naming the contract (part of the digest).
    """

    features: tuple[FeatureSpec, ...]
    label: str
    label_values: tuple[int, ...]
    nulls: NullPolicy = "refuse"
    name: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the contract names: the features in order, then the label."""
        return (*(f.name for f in self.features), self.label)

    def to_json(self) -> dict[str, Any]:
        """The contract as a JSON document, every field present."""
        return {
            "format": CONTRACT_FORMAT,
            "name": self.name,
            "features": [{"name": f.name, "dtype": f.dtype} for f in self.features],
            "label": {"name": self.label, "values": list(self.label_values)},
            "nulls": self.nulls,
        }

    def canonical_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, UTF-8 (what :meth:`digest` hashes)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8")

    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical_bytes` (32 bytes)."""
        return hashlib.sha256(self.canonical_bytes()).digest()


def _name(where: str, value: object, source: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_CHARS:
        raise ContractError(
            source, f"{where} must be a column name of 1..{MAX_NAME_CHARS} characters"
        )
    if value != value.strip():
        raise ContractError(source, f"{where} {value!r} has leading or trailing spaces")
    return value


def _keys(
    where: str, doc: object, allowed: set[str], required: set[str], source: str
) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ContractError(source, f"{where} must be a JSON object")
    extra = sorted(set(doc) - allowed)
    if extra:
        raise ContractError(source, f"{where}: unknown field {extra[0]!r}")
    missing = sorted(required - set(doc))
    if missing:
        raise ContractError(source, f"{where}: field {missing[0]!r} missing")
    return doc


def parse_contract(doc: object, source: str = "<contract>") -> DataContract:
    """Validate a contract's JSON document.

    Raises:
        ContractError: A field is missing, unknown, of the wrong type, or out of range.
    """
    top = _keys(
        "contract",
        doc,
        {"format", "name", "features", "label", "nulls"},
        {"format", "features", "label"},
        source,
    )
    if top["format"] != CONTRACT_FORMAT:
        raise ContractError(source, f"format must be {CONTRACT_FORMAT!r}, got {top['format']!r}")
    name = top.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise ContractError(source, f"name must be text of at most {MAX_NAME_CHARS} characters")
    raw_features = top["features"]
    if not isinstance(raw_features, list) or not 1 <= len(raw_features) <= MAX_COLUMNS:
        raise ContractError(source, f"features must be a list of 1..{MAX_COLUMNS} columns")
    features = []
    for i, item in enumerate(raw_features):
        where = f"features[{i}]"
        spec = _keys(where, item, {"name", "dtype"}, {"name", "dtype"}, source)
        if spec["dtype"] not in DTYPES:
            raise ContractError(
                source, f"{where}.dtype must be one of {', '.join(DTYPES)}, got {spec['dtype']!r}"
            )
        features.append(FeatureSpec(_name(f"{where}.name", spec["name"], source), spec["dtype"]))
    label_doc = _keys("label", top["label"], {"name", "values"}, {"name", "values"}, source)
    label = _name("label.name", label_doc["name"], source)
    values = label_doc["values"]
    if (
        not isinstance(values, list)
        or not 1 <= len(values) <= MAX_LABELS
        or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_LABELS
            for v in values
        )
    ):
        # Class indices: the model's output layer has max(values) + 1 units at every site, so
        # the contract's publisher must not size it (found by review: {0, 2^40} passed prepare
        # and made every site allocate a terabyte-sized layer; -1 failed only at run start).
        raise ContractError(
            source, f"label.values must be a list of distinct class indices in 0..{MAX_LABELS - 1}"
        )
    if len(set(values)) != len(values):
        raise ContractError(source, "label.values lists a label twice")
    names = [f.name for f in features] + [label]
    seen: set[str] = set()
    for column in names:
        if column in seen:
            raise ContractError(
                source, f"column {column!r} is named twice (features and label must differ)"
            )
        seen.add(column)
    nulls = top.get("nulls", "refuse")
    if nulls not in NULL_POLICIES:
        raise ContractError(
            source, f"nulls must be one of {', '.join(NULL_POLICIES)}, got {nulls!r}"
        )
    return DataContract(tuple(features), label, tuple(sorted(values)), nulls, name)


def load_contract(path: str | os.PathLike[str]) -> DataContract:
    """Read and validate a contract file.

    Raises:
        ContractError: The file is missing, too large, not UTF-8 JSON, or malformed.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read(MAX_CONTRACT_BYTES + 1)
    except OSError as exc:
        raise ContractError(source, f"cannot read the contract: {exc.strerror}") from exc
    if len(raw) > MAX_CONTRACT_BYTES:
        raise ContractError(source, f"contract larger than {MAX_CONTRACT_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(source, f"not valid UTF-8 JSON: {exc}") from exc
    return parse_contract(doc, source)
