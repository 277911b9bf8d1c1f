"""``fl-client data prepare``, ``fl-client data split`` and ``fl-client attest``.

Exit codes: 0 success; 1 a dataset problem (the one-line error names the file and the reason;
nothing was written over); 2 a usage error.

Heavy modules (pyarrow, numpy) are imported inside the commands so that ``fl-client --help``
stays fast; torch is never imported here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from .errors import DatasetError

__all__ = ["DATASET_ERROR_EXIT", "parse_size", "register"]

DATASET_ERROR_EXIT = 1
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


# Options shared by several commands (module level: annotations are evaluated in module scope).
SHARD_SIZE_OPT = typer.Option("--shard-size", help="Target shard size, e.g. 1GiB (default), 256MiB.")
CHUNK_OPT = typer.Option("--chunk-size", help="Attestation chunk size (DESIGN.md §6), default 1MiB.")
BUFFER_OPT = typer.Option("--buffer", help="Memory bound of the write/shuffle buffer, default 256MiB.")
RG_OPT = typer.Option("--row-group-rows", min=1, help="Rows per Parquet row group (default: ~32 MiB per group).")
LABEL_OPT = typer.Option("--label", help="Integer label column (ignored for mnist-5k).")
FEATURES_OPT = typer.Option("--features", help="Comma-separated feature columns (default: all other columns).")
SHUFFLE_OPT = typer.Option("--shuffle/--no-shuffle", help="Shuffle rows within the buffer (exact if the data fits).")
JSON_OPT = typer.Option("--json", help="Print the result as JSON on stdout.")
CONTRACT_OPT = typer.Option(
    "--contract",
    help="The coordinator's data contract (JSON): every row of the CSV is checked against it (columns, dtypes, "
    "label set, nulls) and refused with file, line and column; its digest is recorded in the manifest.",
)


def parse_size(text: str) -> int:
    """Parse ``"1GiB"``, ``"512MiB"``, ``"64k"``, ``"1048576"`` into bytes.

    Raises:
        typer.BadParameter: Not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size like 1GiB, 512MiB or 1048576")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise typer.BadParameter(f"{text!r} must be positive")
    return value


def _fail(exc: DatasetError, as_json: bool) -> typer.Exit:
    """Report a dataset error (one line on stderr; also JSON on stdout with --json)."""
    if as_json:
        typer.echo(json.dumps({"error": type(exc).__name__, "path": exc.path, "reason": exc.reason}))
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(DATASET_ERROR_EXIT)


class _RichProgress:
    """A rich progress bar on stderr, fed from hashing threads (rich's Progress is thread-safe)."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task(description, total=None)

    def start(self, total_bytes: int) -> None:
        self._progress.update(self._task, total=total_bytes)

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


@contextmanager
def _row_progress(enabled: bool, description: str) -> Iterator[Callable[[int], None] | None]:
    """A rich spinner counting rows written (stderr, only on a terminal)."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}: {task.completed:,.0f} rows"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)
        yield lambda rows: progress.advance(task, rows)


@contextmanager
def _maybe_progress(enabled: bool, description: str) -> Iterator[_RichProgress | None]:
    if enabled and sys.stderr.isatty():
        with _RichProgress(description) as bar:
            yield bar
    else:
        yield None


def _print_label_table(labels: tuple[int, ...], counts: tuple[tuple[int, ...], ...], names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rows per label and site")
    table.add_column("site")
    for label in labels:
        table.add_column(str(label), justify="right")
    table.add_column("total", justify="right")
    for name, row in zip(names, counts, strict=True):
        table.add_row(name, *(str(c) for c in row), str(sum(row)))
    Console().print(table)


def _load_contract(path: Path, as_json: bool) -> Any:
    """The contract at ``path``, or exit 1 with one line naming the field."""
    from fedseal.protocol.contract import ContractError, load_contract

    try:
        return load_contract(path)
    except ContractError as exc:
        if as_json:
            typer.echo(json.dumps({"error": type(exc).__name__, "path": exc.path, "reason": exc.reason}))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(DATASET_ERROR_EXIT) from exc


def register(app: typer.Typer) -> None:
    """Add ``data prepare``, ``data split`` and ``attest`` to the ``fl-client`` app."""
    data_app = typer.Typer(
        help="Prepare and split datasets into attested Parquet shards (exit 1: bad data, named).",
        no_args_is_help=True,
    )


    def _options(shard_size: str, chunk_size: str, buffer: str, row_group_rows: int | None, shuffle: bool, seed: int) -> Any:
        from .prepare import PrepareOptions

        try:
            return PrepareOptions(
                target_shard_bytes=parse_size(shard_size),
                row_group_rows=row_group_rows,
                chunk_size=parse_size(chunk_size),
                buffer_bytes=parse_size(buffer),
                shuffle=shuffle,
                seed=seed,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc

    @data_app.command("prepare")
    def prepare(
        source: Annotated[str, typer.Argument(help="mnist-5k (bundled), a .csv[.gz] with header, a .parquet file, or a directory of .parquet files.")],
        out_dir: Annotated[Path, typer.Argument(help="Output dataset directory (must not exist or be empty).")],
        label: Annotated[str, LABEL_OPT] = "label",
        features: Annotated[str | None, FEATURES_OPT] = None,
        shard_size: Annotated[str, SHARD_SIZE_OPT] = "1GiB",
        chunk_size: Annotated[str, CHUNK_OPT] = "1MiB",
        buffer: Annotated[str, BUFFER_OPT] = "256MiB",
        row_group_rows: Annotated[int | None, RG_OPT] = None,
        shuffle: Annotated[bool, SHUFFLE_OPT] = True,
        seed: Annotated[int, typer.Option(help="Seed of the shuffle.")] = 0,
        append: Annotated[bool, typer.Option("--append", help="Add the source as new shards to the existing dataset OUT_DIR (sorting last) and prove the extension.")] = False,
        contract_file: Annotated[Path | None, CONTRACT_OPT] = None,
        as_json: Annotated[bool, JSON_OPT] = False,
    ) -> None:
        """Write zstd Parquet shards (shard-00000.parquet, ...) and fedseal-manifest.json.

        Streams the source with bounded memory (--buffer) and writes into a temporary directory that is renamed into place at the end, so an error leaves nothing behind and nothing is written over. With --append, OUT_DIR is an existing dataset: the new shards are numbered to sort last, the RFC 6962 consistency proof from the old root is verified, and the manifest updated.

        With --contract, the label and feature columns are the contract's (in its order; other columns are left out), every row is checked, and the first bad one is named (file, line, column, value) with nothing written.

        Exit codes: 0 success; 1 bad input (the file and reason are named); 2 usage error.
        """
        from .errors import DatasetError
        from .prepare import append_to_dataset, prepare_dataset

        opts = _options(shard_size, chunk_size, buffer, row_group_rows, shuffle, seed)
        contract = None
        if contract_file is not None:
            if features is not None or label != "label":
                raise typer.BadParameter("--label and --features come from the contract; leave them out with --contract")
            contract = _load_contract(contract_file, as_json)
        if append:
            try:
                with _row_progress(not as_json, "writing shards") as on_rows:
                    manifest, proof = append_to_dataset(
                        source,
                        out_dir,
                        label_column=label,
                        feature_columns=features.split(",") if features else None,
                        options=opts,
                        on_rows=on_rows,
                        contract=contract,
                    )
            except DatasetError as exc:
                raise _fail(exc, as_json) from exc
            if as_json:
                typer.echo(json.dumps({"dir": str(out_dir), "root": manifest.root.hex(), "rows": manifest.rows, "extends": proof.to_json()}))
            else:
                typer.echo(f"appended {', '.join(proof.new_files)}; {manifest.rows} rows in {len(manifest.files)} shard(s)")
                typer.echo(f"root {manifest.root.hex()} extends {proof.old_root.hex()} (consistency proof verified, {len(proof.proof)} hashes)")
            return
        try:
            with _row_progress(not as_json, "writing shards") as on_rows:
                manifest = prepare_dataset(
                    source,
                    out_dir,
                    label_column=label,
                    feature_columns=features.split(",") if features else None,
                    options=opts,
                    on_rows=on_rows,
                    contract=contract,
                )
        except DatasetError as exc:
            raise _fail(exc, as_json) from exc
        summary = {
            "dir": str(out_dir),
            "algorithm": manifest.algorithm,
            "root": manifest.root.hex(),
            "leaves": manifest.leaves,
            "bytes": manifest.bytes,
            "rows": manifest.rows,
            "files": len(manifest.files),
            "contract": manifest.contract.hex() or None,
        }
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            typer.echo(f"wrote {manifest.rows} rows in {len(manifest.files)} shard(s), {manifest.bytes} bytes, to {out_dir}")
            typer.echo(f"root {manifest.root.hex()}")
            if manifest.contract:
                typer.echo(f"contract {manifest.contract.hex()} (every row checked): {manifest.source}")

    @data_app.command("contract-digest")
    def contract_digest(
        contract_file: Annotated[Path, typer.Argument(help="A data contract (JSON).")],
        as_json: Annotated[bool, JSON_OPT] = False,
    ) -> None:
        """Check a data contract and print its digest (SHA-256 of its canonical JSON), the value a run's setup signs and a prepared dataset's manifest records.

        Exit codes: 0 success; 1 the contract is unreadable or malformed (the field is named).
        """
        contract = _load_contract(contract_file, as_json)
        digest = contract.digest().hex()
        if as_json:
            typer.echo(json.dumps({"contract": str(contract_file), "digest": digest, "columns": list(contract.columns)}))
        else:
            typer.echo(digest)

    @data_app.command("split")
    def split(
        source: Annotated[str, typer.Argument(help="As for `prepare` (mnist-5k for the bundled digits).")],
        out_dir: Annotated[Path, typer.Argument(help="Output directory; one dataset per site: OUT/site-0, ...")],
        sites: Annotated[int, typer.Option("--sites", min=1, help="Number of sites K.")] = 3,
        scheme: Annotated[str, typer.Option("--scheme", help="iid or dirichlet.")] = "iid",
        alpha: Annotated[float, typer.Option("--alpha", min=0.0, help="Dirichlet concentration (small: skewed labels).")] = 0.5,
        seed: Annotated[int, typer.Option(help="Seed of the assignment and shuffles.")] = 0,
        label: Annotated[str, LABEL_OPT] = "label",
        features: Annotated[str | None, FEATURES_OPT] = None,
        shard_size: Annotated[str, SHARD_SIZE_OPT] = "1GiB",
        chunk_size: Annotated[str, CHUNK_OPT] = "1MiB",
        buffer: Annotated[str, BUFFER_OPT] = "256MiB",
        row_group_rows: Annotated[int | None, RG_OPT] = None,
        shuffle: Annotated[bool, SHUFFLE_OPT] = True,
        as_json: Annotated[bool, JSON_OPT] = False,
    ) -> None:
        """Split a source into K site datasets OUT/site-0, ... (own salt and manifest each) and print the rows per label and site.

        Exit codes: 0 success; 1 bad input (the file and reason are named); 2 usage error.
        """
        from .errors import DatasetError
        from .split import split_dataset

        if scheme not in ("iid", "dirichlet"):
            raise typer.BadParameter("--scheme must be iid or dirichlet")
        if scheme == "dirichlet" and not alpha > 0:
            raise typer.BadParameter("--alpha must be positive")
        opts = _options(shard_size, chunk_size, buffer, row_group_rows, shuffle, seed)
        try:
            with _row_progress(not as_json, "writing site shards") as on_rows:
                result = split_dataset(
                    source,
                    out_dir,
                    sites=sites,
                    scheme="iid" if scheme == "iid" else "dirichlet",
                    alpha=alpha,
                    seed=seed,
                    label_column=label,
                    feature_columns=features.split(",") if features else None,
                    options=opts,
                    on_rows=on_rows,
                )
        except DatasetError as exc:
            raise _fail(exc, as_json) from exc
        names = [p.name for p in result.sites]
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "labels": list(result.labels),
                        "sites": [
                            {"dir": str(p), "root": m.root.hex(), "rows": m.rows, "label_counts": list(c)}
                            for p, m, c in zip(result.sites, result.manifests, result.label_counts, strict=True)
                        ],
                    }
                )
            )
        else:
            _print_label_table(result.labels, result.label_counts, names)
            for path, manifest in zip(result.sites, result.manifests, strict=True):
                typer.echo(f"{path}: {manifest.rows} rows, root {manifest.root.hex()}")

    app.add_typer(data_app, name="data")

    @app.command("attest")
    def attest_cmd(
        directory: Annotated[Path, typer.Argument(help="A prepared dataset directory.")],
        workers: Annotated[int | None, typer.Option("--workers", min=1, help="Hashing threads (default: CPUs available).")] = None,
        full: Annotated[bool, typer.Option("--full", help="Re-hash everything, ignoring the cache.")] = False,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")] = False,
        cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Cache directory (default DIR/.fedseal-cache).")] = None,
        extends: Annotated[Path | None, typer.Option("--extends", help="An earlier manifest: prove the dataset extends it (RFC 6962 consistency).")] = None,
        update: Annotated[bool, typer.Option("--update", help="Write the manifest for the current shards (after --extends, if given).")] = False,
        deep: Annotated[bool, typer.Option("--deep", help="Also decode every page and count rows (finds corrupt pages).")] = False,
        as_json: Annotated[bool, JSON_OPT] = False,
    ) -> None:
        """Compute the dataset root (DESIGN.md §6) and check it against the manifest.

        Without --update the shards must match the manifest exactly (files, sizes, rows, schema, root). With --extends OLD_MANIFEST the dataset must extend that earlier manifest (new shards sorting last): the RFC 6962 consistency proof is printed and verified, or the error names the shard that broke the extension. With --update the manifest is rewritten for the current shards. A progress bar is shown on a terminal; the cache makes an unchanged dataset re-attest without reading shard contents.

        Exit codes: 0 success; 1 bad data or mismatch (the file and reason are named, nothing is written); 2 usage error.
        """
        from .attestation import attest, compare_with_manifest, prove_extension
        from .errors import DatasetError, ExtensionError
        from .manifest import Manifest, load_manifest, read_manifest_file, write_manifest

        try:
            manifest = load_manifest(directory)
            old = read_manifest_file(extends) if extends is not None else None
            with _maybe_progress(not as_json, "hashing") as bar:
                att = attest(directory, workers=workers, use_cache=not no_cache, full=full, cache_dir=cache_dir, progress=bar)
            if old is not None and old.salt != manifest.salt:
                raise ExtensionError(str(extends), "earlier manifest has another salt: a different dataset")
            proof = prove_extension(old, att) if old is not None else None
            if not update and proof is None:
                compare_with_manifest(manifest, att)
            if deep:
                from .shards import iter_file_batches

                for f in att.files:
                    for batch in iter_file_batches(str(directory / f.path), f.path, expected_rows=f.rows):
                        del batch
            previous_note = None
            if update and proof is None:
                try:
                    prove_extension(manifest, att)
                except ExtensionError as exc:
                    previous_note = f"not an extension of the previous manifest ({exc}): a new dataset version that needs approval"
            if update:
                new_manifest = Manifest(
                    manifest.algorithm, manifest.salt, manifest.chunk_size, att.root, att.leaves, att.bytes, att.rows,
                    tuple(f.to_manifest_file() for f in att.files), manifest.schema, manifest.source,
                    manifest.contract,
                )
                if new_manifest != manifest:
                    write_manifest(directory, new_manifest)
        except DatasetError as exc:
            raise _fail(exc, as_json) from exc
        doc = att.to_json()
        doc["matches_manifest"] = att.root == manifest.root
        if proof is not None:
            doc["extends"] = proof.to_json()
        if update:
            doc["manifest_updated"] = att.root != manifest.root
            doc["extends_previous_manifest"] = previous_note is None
        if update and previous_note is not None and doc["manifest_updated"]:
            typer.echo(f"warning: {previous_note}", err=True)
        if as_json:
            typer.echo(json.dumps(doc))
            return
        typer.echo(f"algorithm {att.algorithm}")
        typer.echo(f"root      {att.root.hex()}")
        typer.echo(f"leaves    {att.leaves}   bytes {att.bytes}   rows {att.rows}   files {len(att.files)} ({doc['cached_files']} from cache)")
        if proof is not None:
            typer.echo(f"extends   {proof.old_root.hex()} ({proof.old_size} leaves) -> {proof.new_size} leaves; proof verified:")
            for h in proof.proof:
                typer.echo(f"  {h.hex()}")
            for path in proof.new_files:
                typer.echo(f"  + {path}")
        if update:
            typer.echo("manifest updated" if doc["manifest_updated"] else "manifest unchanged")
        else:
            typer.echo("matches the manifest" if doc["matches_manifest"] else "differs from the manifest (see --update)")
