"""fedseal.client.data: Parquet shards, dataset attestation and the streaming loader.

Example::

    from fedseal.client.data import (
        attest, load_manifest, prepare_dataset, split_dataset, verify_dataset, ShardDataset, make_loader,
    )

    split_dataset("mnist-5k", "demo-data", sites=3, scheme="iid", seed=0)   # bundled MNIST-5k
    att = verify_dataset("demo-data/site-0")      # raises a DatasetError naming file + reason
    att.root, att.rows                            # 32-byte root for the envelope, example count
    schema = load_manifest("demo-data/site-0").schema
    schema.feature_shape, schema.num_classes      # (1, 28, 28), 10
    ds = ShardDataset("demo-data/site-0", batch_size=64, shuffle_buffer=4096, seed=0)
    for x, y in make_loader(ds, num_workers=0):   # x float32 [B,1,28,28] in [0,1], y int64 [B]
        ...

``attest(dir, workers=..., use_cache=True, full=False)`` computes the root of DESIGN.md §6 as the
directory is now (salt and chunk size from the manifest); ``verify_dataset`` also requires an
exact match with the manifest; ``prove_extension(old_manifest, attestation)`` gives a verified
RFC 6962 consistency proof that new shards were only appended; ``append_to_dataset(source, dir)``
writes such shards and updates the manifest. ``prepare_dataset``/``split_dataset`` never write
over existing output.

Streaming at scale: the loader reads a bounded number of decoded record batches ahead in a
thread (:mod:`.prefetch`), shuffles row groups and rows in a bounded buffer (the quality and
memory bound are stated in :mod:`.loader`), and decodes an image column (PNG bytes) per batch
(:mod:`.images`: the decoder hook and fedseal's dependency-free PNG decoder).

Names are loaded lazily on first access: ``import fedseal.client.data`` imports neither torch
(only ``ShardDataset``/``make_loader`` do) nor pyarrow (``prepare``/``split``/the loader do;
a cached ``attest`` does not). Errors: see :mod:`.errors` (all derive from
:class:`DatasetError`). The bundled data's provenance: ``DATA_CARD.md`` in this package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attestation import (
        Attestation,
        ExtensionProof,
        FileAttestation,
        ProgressSink,
        attest,
        attest_with,
        compare_with_manifest,
        prove_extension,
        verify_dataset,
    )
    from .errors import (
        ContentMismatchError,
        CorruptShardError,
        DatasetChangedError,
        DatasetError,
        ExtensionError,
        LayoutError,
        ManifestError,
        OutputExistsError,
        RowCountMismatchError,
        SchemaMismatchError,
        SourceError,
    )
    from .loader import ShardDataset, make_loader
    from .manifest import (
        ColumnSpec,
        DatasetSchema,
        Manifest,
        ManifestFile,
        load_manifest,
        read_manifest_file,
    )
    from .prepare import PrepareOptions, append_to_dataset, prepare_dataset
    from .spec import ALGORITHM_ID, DEFAULT_CHUNK_SIZE, MANIFEST_NAME
    from .split import SplitResult, split_dataset

# Public name -> submodule. Loaded on first access (PEP 562), so that `fl-client --help` and
# `import fedseal.client.data.errors` import neither pyarrow nor torch.
EXPORTS = {
    "ALGORITHM_ID": "spec",
    "DEFAULT_CHUNK_SIZE": "spec",
    "MANIFEST_NAME": "spec",
    "Attestation": "attestation",
    "ExtensionProof": "attestation",
    "FileAttestation": "attestation",
    "ProgressSink": "attestation",
    "attest": "attestation",
    "attest_with": "attestation",
    "compare_with_manifest": "attestation",
    "prove_extension": "attestation",
    "verify_dataset": "attestation",
    "ContentMismatchError": "errors",
    "CorruptShardError": "errors",
    "DatasetChangedError": "errors",
    "DatasetError": "errors",
    "ExtensionError": "errors",
    "LayoutError": "errors",
    "ManifestError": "errors",
    "OutputExistsError": "errors",
    "RowCountMismatchError": "errors",
    "SchemaMismatchError": "errors",
    "SourceError": "errors",
    "ShardDataset": "loader",
    "make_loader": "loader",
    "ColumnSpec": "manifest",
    "DatasetSchema": "manifest",
    "Manifest": "manifest",
    "ManifestFile": "manifest",
    "load_manifest": "manifest",
    "read_manifest_file": "manifest",
    "PrepareOptions": "prepare",
    "append_to_dataset": "prepare",
    "prepare_dataset": "prepare",
    "SplitResult": "split",
    "split_dataset": "split",
}

__all__ = [
    "ALGORITHM_ID",
    "DEFAULT_CHUNK_SIZE",
    "MANIFEST_NAME",
    "Attestation",
    "ColumnSpec",
    "ContentMismatchError",
    "CorruptShardError",
    "DatasetChangedError",
    "DatasetError",
    "DatasetSchema",
    "ExtensionError",
    "ExtensionProof",
    "FileAttestation",
    "LayoutError",
    "Manifest",
    "ManifestError",
    "ManifestFile",
    "OutputExistsError",
    "PrepareOptions",
    "ProgressSink",
    "RowCountMismatchError",
    "SchemaMismatchError",
    "ShardDataset",
    "SourceError",
    "SplitResult",
    "append_to_dataset",
    "attest",
    "attest_with",
    "compare_with_manifest",
    "load_manifest",
    "make_loader",
    "prepare_dataset",
    "prove_extension",
    "read_manifest_file",
    "split_dataset",
    "verify_dataset",
]


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
