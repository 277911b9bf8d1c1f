"""Encoded images (PNG bytes) as a feature column: the header check, the decoders, an encoder.

Example::

    from fedseal.client.data.images import decode_png, default_decoder, encode_png, png_shape

    data = encode_png(pixels)            # uint8 (H, W) or (H, W, C) -> PNG bytes (filter 0, zlib)
    png_shape(data)                      # (C, H, W) from the IHDR chunk, nothing decoded
    decode = default_decoder()           # Pillow's decoder if installed, else decode_png
    decode(data)                         # uint8 (H, W) or (H, W, C)

A dataset whose only feature column is ``binary`` (or ``large_binary``) holds one encoded image
per row; its manifest's ``feature_shape`` is ``(C, H, W)`` (every image must have it) and its
``feature_scale`` is ``1/255``. ``fl-client data prepare`` learns the shape from the first
image's PNG header and checks every other image's header against it; the loader decodes each
record batch as it streams (an :data:`ImageDecoder`, by default :func:`default_decoder`), so no
decoded copy of the dataset is ever written or held.

:func:`decode_png` is a small dependency-free decoder (``zlib`` + numpy) for what most tools
write: 8-bit greyscale, grey+alpha, RGB and RGBA, not interlaced, every PNG row filter
(RFC 2083 §6; ``None``, ``Sub`` and ``Up`` rows vectorised, ``Average`` and ``Paeth`` rows byte
by byte, so about 1 ms for a 32×32 RGB image written with those). It checks every chunk's CRC.
Other formats (JPEG, 16-bit PNG) need a decoder hook, e.g. Pillow's (``pip install pillow``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from .errors import DatasetError

__all__ = [
    "ImageDecodeError",
    "ImageDecoder",
    "decode_png",
    "default_decoder",
    "encode_png",
    "png_shape",
    "to_chw",
]

ImageDecoder = Callable[[bytes], npt.NDArray[np.uint8]]
"""``decode(encoded bytes)`` -> uint8 pixels ``(H, W)`` or ``(H, W, C)``; raises on bad input.

Runs in the loader (in its DataLoader worker processes when there are any), so it must be
picklable: a module-level function, not a lambda."""

_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_CHANNELS: Final = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (8-bit only)
MAX_PIXELS: Final = 1 << 26
"""Largest image accepted (64 Mpixel): a header cannot make the decoder allocate more."""


class ImageDecodeError(DatasetError):
    """An image's bytes are not a PNG this decoder supports (the reason, one line; the loader
    and ``data prepare`` re-raise it naming the shard or source and the row)."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, reason)


def png_shape(data: bytes) -> tuple[int, int, int]:
    """``(channels, height, width)`` from a PNG's signature and IHDR chunk (nothing decoded).

    Raises:
        ImageDecodeError: Not a PNG, or one :func:`decode_png` does not support (bit depth,
            colour type, interlacing, size).
    """
    if len(data) < 33 or data[:8] != _SIGNATURE or data[12:16] != b"IHDR":
        raise ImageDecodeError("not a PNG (no signature and IHDR chunk)")
    width, height, depth, colour, _compression, _filter, interlace = struct.unpack(
        ">IIBBBBB", data[16:29]
    )
    if depth != 8 or colour not in _CHANNELS:
        raise ImageDecodeError(
            f"PNG of bit depth {depth} and colour type {colour}: only 8-bit grey/RGB(A) is supported"
        )
    if interlace:
        raise ImageDecodeError("interlaced PNG is not supported")
    if not 0 < width * height <= MAX_PIXELS:
        raise ImageDecodeError(f"PNG of {width}x{height} pixels (at most {MAX_PIXELS})")
    return _CHANNELS[colour], height, width


def decode_png(data: bytes) -> npt.NDArray[np.uint8]:
    """Decode an 8-bit, non-interlaced PNG: ``(H, W)`` for greyscale, else ``(H, W, C)``.

    Raises:
        ImageDecodeError: The bytes are not such a PNG, a chunk's CRC is wrong, the data is
            truncated, or a row has an unknown filter.
    """
    channels, height, width = png_shape(data)
    idat: list[bytes] = []
    pos = 8
    while True:
        if pos + 12 > len(data):
            raise ImageDecodeError("truncated PNG (no IEND chunk)")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ImageDecodeError(f"truncated PNG chunk {kind!r}")
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ImageDecodeError(f"PNG chunk {kind!r} fails its CRC")
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    stride = width * channels
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(b"".join(idat), height * (stride + 1))
    except zlib.error as exc:
        raise ImageDecodeError(f"PNG image data does not inflate ({exc})") from exc
    if len(raw) != height * (stride + 1):
        raise ImageDecodeError(
            f"PNG image data holds {len(raw)} bytes, {height * (stride + 1)} expected"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for r in range(height):
        kind_ = int(rows[r, 0])
        line = rows[r, 1:]
        if kind_ == 0:
            out[r] = line
        elif kind_ == 1:  # Sub: running sum along each channel, mod 256
            out[r] = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint8).reshape(-1)
        elif kind_ == 2:  # Up
            np.add(line, prev, out=out[r])
        elif kind_ in (3, 4):
            out[r] = np.frombuffer(
                _unfilter_sequential(kind_, line.tobytes(), prev.tobytes(), channels), np.uint8
            )
        else:
            raise ImageDecodeError(f"PNG row {r} has unknown filter type {kind_}")
        prev = out[r]
    return out.reshape(height, width) if channels == 1 else out.reshape(height, width, channels)


def _unfilter_sequential(kind: int, line: bytes, prev: bytes, bpp: int) -> bytes:
    """Average (3) or Paeth (4) un-filtering of one row (RFC 2083 §6.5, §6.6), byte by byte."""
    cur = bytearray(line)
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
        else:
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            cur[i] = (cur[i] + pred) & 0xFF
    return bytes(cur)


def encode_png(pixels: npt.NDArray[np.uint8], *, level: int = 6) -> bytes:
    """PNG bytes of uint8 ``(H, W)`` (greyscale) or ``(H, W, C)`` pixels, C in 1..4.

    Every row uses filter type 0 (None); ``level`` is zlib's. Meant for tests, benchmarks and
    small tools; any PNG writer's output works as a dataset's images.

    Raises:
        ValueError: Not uint8, or not 2-D / 3-D with 1 to 4 channels.
    """
    if (
        pixels.dtype != np.uint8
        or pixels.ndim not in (2, 3)
        or (pixels.ndim == 3 and not 1 <= pixels.shape[2] <= 4)
    ):
        raise ValueError(
            f"expected uint8 (H, W) or (H, W, 1..4) pixels, got {pixels.dtype} {pixels.shape}"
        )
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        _SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, level))
        + chunk(b"IEND", b"")
    )


def _pil_decode(data: bytes) -> npt.NDArray[np.uint8]:
    import io

    from PIL import Image  # type: ignore[import-not-found, unused-ignore]

    with Image.open(io.BytesIO(data)) as image:
        array: npt.NDArray[np.uint8] = np.asarray(image)
    if array.dtype != np.uint8:
        raise ImageDecodeError(f"image decodes to {array.dtype}, not 8-bit samples")
    return array


def default_decoder() -> ImageDecoder:
    """Pillow's decoder when Pillow is installed (PNG, JPEG, ...), else :func:`decode_png`."""
    try:
        import PIL.Image  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return decode_png
    return _pil_decode


def to_chw(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """``(H, W)`` -> ``(1, H, W)``; ``(H, W, C)`` -> ``(C, H, W)`` (the manifest's layout).

    Raises:
        ImageDecodeError: Not 2-D or 3-D uint8.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ImageDecodeError(
            f"a decoder returned {pixels.dtype} {pixels.shape}, not uint8 (H, W) or (H, W, C)"
        )
    return pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)
