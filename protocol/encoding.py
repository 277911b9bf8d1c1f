"""Canonical binary encoding for signed payloads (CONVENTIONS.md, habit 3).

Rules:
    * Integers are fixed-width, big-endian, unsigned (``u8``/``u16``/``u32``/``u64``).
    * Byte strings are either fixed-width or length-prefixed (``u32`` length).
    * Text (site ids) is UTF-8 with a ``u16`` length prefix.
    * Lists are a ``u32`` count followed by the items.
    * No floats. Every value has exactly one encoding, so signing the bytes signs the value.

The :class:`Reader` checks every length against a caller-supplied bound *before*
slicing or allocating, rejects trailing bytes, and raises only :class:`DecodeError`.
"""

from __future__ import annotations

import struct

from .errors import DecodeError

__all__ = ["Reader", "Writer"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16_AT = _U16.unpack_from
_U32_AT = _U32.unpack_from
_U64_AT = _U64.unpack_from


class Writer:
    """Append-only builder of canonical bytes."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        """Append an unsigned 8-bit integer."""
        if not 0 <= value <= 0xFF:
            raise ValueError("u8 out of range")
        self._parts.append(bytes((value,)))
        return self

    def u16(self, value: int) -> Writer:
        """Append an unsigned 16-bit big-endian integer."""
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        """Append an unsigned 32-bit big-endian integer."""
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        """Append an unsigned 64-bit big-endian integer."""
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, data: bytes, length: int) -> Writer:
        """Append exactly ``length`` bytes (``ValueError`` if ``data`` has another length)."""
        if len(data) != length:
            raise ValueError(f"expected {length} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        return self

    def blob(self, data: bytes) -> Writer:
        """Append a ``u32`` length prefix and the bytes."""
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(bytes(data))
        return self

    def text(self, value: str) -> Writer:
        """Append a ``u16`` length prefix and the UTF-8 bytes of ``value``."""
        raw = value.encode("utf-8")
        self._parts.append(_U16.pack(len(raw)))
        self._parts.append(raw)
        return self

    def raw(self, data: bytes) -> Writer:
        """Append already-canonical bytes verbatim."""
        self._parts.append(bytes(data))
        return self

    def count(self, value: int) -> Writer:
        """Append a list length (``u32``)."""
        return self.u32(value)

    def to_bytes(self) -> bytes:
        """Return the bytes written so far."""
        return b"".join(self._parts)


class Reader:
    """Bounds-checked cursor over received bytes; raises only :class:`DecodeError`.

    Lean on purpose (slots, each bound checked inline, no helper calls): the audit verifier
    decodes millions of entries with it.
    """

    __slots__ = ("_data", "_end", "_pos", "_what")

    def __init__(self, data: bytes, *, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._end = len(self._data)
        self._pos = 0
        self._what = what

    def _truncated(self, length: int) -> DecodeError:
        return DecodeError(f"{self._what}: truncated (needed {length} bytes at offset {self._pos})")

    def u8(self) -> int:
        """Read an unsigned 8-bit integer."""
        p = self._pos
        if p >= self._end:
            raise self._truncated(1)
        self._pos = p + 1
        return self._data[p]

    def u16(self) -> int:
        """Read an unsigned 16-bit big-endian integer."""
        p = self._pos
        if p + 2 > self._end:
            raise self._truncated(2)
        self._pos = p + 2
        return int(_U16_AT(self._data, p)[0])

    def u32(self) -> int:
        """Read an unsigned 32-bit big-endian integer."""
        p = self._pos
        if p + 4 > self._end:
            raise self._truncated(4)
        self._pos = p + 4
        return int(_U32_AT(self._data, p)[0])

    def u64(self) -> int:
        """Read an unsigned 64-bit big-endian integer."""
        p = self._pos
        if p + 8 > self._end:
            raise self._truncated(8)
        self._pos = p + 8
        return int(_U64_AT(self._data, p)[0])

    def fixed(self, length: int) -> bytes:
        """Read exactly ``length`` bytes."""
        p = self._pos
        end = p + length
        if end > self._end:
            raise self._truncated(length)
        self._pos = end
        return self._data[p:end]

    def fixed_many(self, count: int, length: int) -> tuple[bytes, ...]:
        """Read ``count`` consecutive byte strings of exactly ``length`` bytes each (one bound
        check for all of them)."""
        p = self._pos
        end = p + count * length
        if end > self._end:
            raise self._truncated(count * length)
        self._pos = end
        b = self._data
        return tuple([b[i : i + length] for i in range(p, end, length)])

    def blob(self, max_length: int) -> bytes:
        """Read a ``u32``-length-prefixed byte string of at most ``max_length`` bytes."""
        length = self.u32()
        if length > max_length:
            raise DecodeError(f"{self._what}: field of {length} bytes exceeds bound {max_length}")
        return self.fixed(length)

    def text(self, max_length: int) -> str:
        """Read a ``u16``-length-prefixed UTF-8 string of at most ``max_length`` bytes."""
        length = self.u16()
        if length > max_length:
            raise DecodeError(f"{self._what}: text of {length} bytes exceeds bound {max_length}")
        raw = self.fixed(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{self._what}: text is not valid UTF-8") from exc

    def texts(self, count: int, max_length: int) -> tuple[str, ...]:
        """Read ``count`` consecutive texts, each as :meth:`text` reads one (in one loop)."""
        b, n, p = self._data, self._end, self._pos
        out = []
        try:
            for _ in range(count):
                if p + 2 > n:
                    self._pos = p
                    raise self._truncated(2)
                (length,) = _U16_AT(b, p)
                if length > max_length:
                    raise DecodeError(
                        f"{self._what}: text of {length} bytes exceeds bound {max_length}"
                    )
                p += 2
                end = p + length
                if end > n:
                    self._pos = p
                    raise self._truncated(length)
                out.append(b[p:end].decode("utf-8"))
                p = end
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{self._what}: text is not valid UTF-8") from exc
        self._pos = p
        return tuple(out)

    def count(self, max_count: int) -> int:
        """Read a list length (``u32``) and check it against ``max_count`` and the bytes left.

        Every list item takes at least one byte, so a count larger than the remaining
        input is rejected before any list is built.
        """
        value = self.u32()
        if value > max_count:
            raise DecodeError(f"{self._what}: list of {value} items exceeds bound {max_count}")
        if value > self._end - self._pos:
            raise DecodeError(f"{self._what}: list of {value} items longer than the input")
        return value

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return self._end - self._pos

    def finish(self) -> None:
        """Raise :class:`DecodeError` if any bytes are left unread."""
        if self._pos != self._end:
            raise DecodeError(f"{self._what}: {self._end - self._pos} trailing bytes")
