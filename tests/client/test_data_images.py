"""Encoded images as a feature column: the PNG decoder, `data prepare` of an image column, and
training-side decoding on the fly (attested like any shard)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedseal.client.data import PrepareOptions, SourceError, prepare_dataset, verify_dataset
from fedseal.client.data.images import (
    ImageDecodeError,
    decode_png,
    default_decoder,
    encode_png,
    png_shape,
)
from fedseal.client.site_data import SiteDataError, load_site_data

SHAPE = (3, 8, 8)  # (C, H, W)
ROWS = 120


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa_, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa_ <= pb and pa_ <= pc else b if pb <= pc else c


def _filtered_png(pixels: npt.NDArray[np.uint8], filters: list[int]) -> bytes:
    """A PNG whose row r is filtered with ``filters[r]``: an independent encoder (RFC 2083 §6)."""
    h, w, c = pixels.shape
    rows = pixels.reshape(h, w * c).astype(int)
    raw = bytearray()
    for r in range(h):
        f, cur = filters[r], rows[r]
        prev = rows[r - 1] if r else np.zeros_like(cur)
        out = []
        for i in range(w * c):
            a = int(cur[i - c]) if i >= c else 0
            b, cc = int(prev[i]), (int(prev[i - c]) if i >= c else 0)
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, cc)][f]
            out.append((int(cur[i]) - pred) % 256)
        raw += bytes([f, *out])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_png_row_filter_decodes_to_the_pixels_it_was_made_from(channels: int) -> None:
    pixels = np.random.default_rng(channels).integers(0, 256, (10, 7, channels), dtype=np.uint8)
    decoded = decode_png(_filtered_png(pixels, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    assert np.array_equal(decoded.reshape(10, 7, channels), pixels)
    assert png_shape(encode_png(pixels)) == (channels, 10, 7)


def test_the_encoder_round_trips_greyscale_and_colour_images() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 9), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(grey)), grey)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)


def test_broken_or_unsupported_pngs_are_refused_with_the_reason() -> None:
    good = encode_png(np.zeros((4, 4, 3), np.uint8))
    flipped = bytearray(good)
    flipped[40] ^= 1  # inside the IDAT chunk: its CRC no longer matches
    with pytest.raises(ImageDecodeError, match="CRC"):
        decode_png(bytes(flipped))
    with pytest.raises(ImageDecodeError, match="not a PNG"):
        decode_png(b"GIF89a" + bytes(40))
    sixteen = bytearray(good)
    sixteen[24] = 16  # bit depth
    with pytest.raises(ImageDecodeError, match="bit depth 16"):
        png_shape(bytes(sixteen))
    with pytest.raises(ImageDecodeError, match=r"truncated|IEND"):
        decode_png(good[:-12])


def test_without_pillow_the_default_decoder_is_fedseals_own() -> None:
    try:
        import PIL  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        assert default_decoder() is decode_png
    else:
        assert default_decoder() is not decode_png


def _image(row: int) -> npt.NDArray[np.uint8]:
    """Row ``row``'s image (H, W, C): random pixels with the row id in the first sample."""
    pixels = np.random.default_rng(row).integers(
        0, 256, (SHAPE[1], SHAPE[2], SHAPE[0]), dtype=np.uint8
    )
    pixels[0, 0, 0] = row
    return pixels


def _image_parquet(path: Path, rows: int = ROWS, *, odd_row: int = -1) -> None:
    images = [
        encode_png(_image(i) if i != odd_row else np.zeros((4, 4, 3), np.uint8))
        for i in range(rows)
    ]
    table = pa.table(
        {"image": pa.array(images, pa.binary()), "label": pa.array(np.arange(rows) % 4, pa.int64())}
    )
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _image_parquet(root / "images.parquet")
    out = root / "prepared"
    prepare_dataset(
        root / "images.parquet", out, options=PrepareOptions(row_group_rows=32), salt=bytes(32)
    )
    return out


def test_data_prepare_stores_an_image_column_attested_with_its_shape_from_the_png_header(
    image_dir: Path,
) -> None:
    manifest = verify_dataset(image_dir)
    assert manifest.rows == ROWS
    from fedseal.client.data import load_manifest

    schema = load_manifest(image_dir).schema
    assert schema.feature_columns == ("image",)
    assert schema.feature_shape == SHAPE and schema.num_features == 3 * 8 * 8
    assert schema.feature_scale == pytest.approx(1 / 255)


def test_training_batches_decode_each_image_on_the_fly_into_its_own_pixels(image_dir: Path) -> None:
    data = load_site_data(
        image_dir, validation_fraction=0.25, seed=1, read_batch_rows=16, shuffle_buffer=40
    )
    assert data.num_features == 192
    seen = []
    for part, shuffle in ((data.train, True), (data.validation, False)):
        for x, y in part.batches(batch_size=10, seed=3, epoch=0, shuffle=shuffle):
            pixels = torch.round(x * 255).to(torch.uint8).reshape(len(x), *SHAPE).numpy()
            for img, label in zip(pixels, y.tolist(), strict=True):
                row = int(img[0, 0, 0])
                assert np.array_equal(img, np.moveaxis(_image(row), 2, 0))  # (C, H, W), lossless
                assert label == row % 4
                seen.append(row)
    assert sorted(seen) == list(range(ROWS))


_DECODED: list[int] = []


def _counting_decoder(data: bytes) -> npt.NDArray[np.uint8]:
    _DECODED.append(len(data))
    return decode_png(data)


def _failing_decoder(data: bytes) -> npt.NDArray[np.uint8]:
    raise OSError("cannot identify image file")


def test_a_sites_decoder_hook_decodes_the_images_and_its_failure_names_the_shard(
    image_dir: Path,
) -> None:
    _DECODED.clear()
    data = load_site_data(
        image_dir, validation_fraction=0.25, seed=1, image_decoder=_counting_decoder
    )
    assert len(_DECODED) == ROWS  # the counting pass decoded every image with the hook
    with pytest.raises(
        SiteDataError, match=r"shard-00000\.parquet.*does not decode.*cannot identify"
    ):
        load_site_data(image_dir, validation_fraction=0.25, seed=1, image_decoder=_failing_decoder)
    assert data.train.num_rows + data.validation.num_rows == ROWS


def test_data_prepare_refuses_an_image_of_another_shape_naming_its_row(tmp_path: Path) -> None:
    _image_parquet(tmp_path / "mixed.parquet", odd_row=57)
    with pytest.raises(SourceError, match=r"row 57 is \(3, 4, 4\).*\(3, 8, 8\)"):
        prepare_dataset(tmp_path / "mixed.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fl_client_data_prepare_takes_a_parquet_file_with_an_image_column(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedseal.client.cli import app
    from fedseal.client.data import load_manifest

    _image_parquet(tmp_path / "images.parquet", rows=40)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["data", "prepare", str(tmp_path / "images.parquet"), str(out), "--features", "image"]
    )
    assert result.exit_code == 0, result.output
    assert load_manifest(out).schema.feature_shape == SHAPE
    assert verify_dataset(out).rows == 40
