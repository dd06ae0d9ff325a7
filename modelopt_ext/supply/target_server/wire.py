"""Binary wire format for a dict of tensors (str key -> Tensor or None).

Used by the remote target server (`serve_target`) and its client to ship supervision over HTTP. It improves
on a bare "magic + entries" stream with a format VERSION, an entry count and a checksum, so a truncated,
corrupted or foreign body is refused with one clear line instead of decoding into wrong tensors.

Layout (all integers little-endian)::

    header  : magic b"MXTW" | version u16 | flags u16 (0) | entry count u32 | payload bytes u64 | crc32 u32
    payload : entry * count, where one entry is
              key length u16 | key (utf-8) | is_none u8 | dtype code u8 | ndim u8 | shape u64 * ndim |
              byte count u64 | zero padding up to the next ALIGN boundary | raw bytes (C order, little-endian)

The crc32 covers the whole payload. Raw bytes start on ALIGN-byte boundaries (counted from the start of
the message) so decoded tensors are well aligned for vectorised kernels when the buffer itself is.

Zero-copy decode: `decode(buf)` returns tensors that are VIEWS into `buf` (`torch.frombuffer`), not copies.
Each tensor holds a reference to the buffer object, so the memory stays valid for as long as any decoded
tensor lives; there is nothing to free by hand. Consequences:
- pass a `bytearray` (e.g. an HTTP body read with `readinto`) to get writable tensors; a `bytes` buffer gives
  tensors that must be treated as read-only (writing to them is undefined behaviour);
- while decoded tensors are alive the bytearray cannot be resized, and writing to it changes the tensors;
- `.clone()` a tensor if it must outlive or be independent of the message.
"""

from __future__ import annotations

import struct
import sys
import warnings
import zlib
from collections.abc import Mapping

import torch

MAGIC = b"MXTW"
VERSION = 1
ALIGN = 64
CONTENT_TYPE = "application/x-modelopt-tensors"

_HEADER = struct.Struct("<4sHHIQI")
_ENTRY_HEAD = struct.Struct("<H")  # key length
_ENTRY_META = struct.Struct("<BBB")  # is_none, dtype code, ndim
_U64 = struct.Struct("<Q")
HEADER_SIZE = _HEADER.size
# The largest product of dimensions (zeros counted as 1) torch can stride in int64, with room for an itemsize.
_MAX_SPAN = 1 << 62

# Codes are part of the format: never renumber, only append.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bool: 1,
    torch.uint8: 2,
    torch.int8: 3,
    torch.int16: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.float16: 7,
    torch.bfloat16: 8,
    torch.float32: 9,
    torch.float64: 10,
    torch.uint16: 11,
    torch.uint32: 12,
    torch.uint64: 13,
    torch.complex64: 14,
    torch.complex128: 15,
    torch.float8_e4m3fn: 16,
    torch.float8_e5m2: 17,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)


class WireFormatError(ValueError):
    """A message that is not a valid tensor message for this build (one line saying why)."""


def _check_byteorder() -> None:
    # Raw bytes are copied verbatim; a big-endian host would silently scramble every value.
    if sys.byteorder != "little":
        raise WireFormatError("the tensor wire format needs a little-endian host")


def _pad(offset: int) -> int:
    return (-offset) % ALIGN


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order as a uint8 memoryview (no copy when already contiguous on CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    # numpy has no bf16/fp8, so go through a uint8 view; the ndarray keeps the tensor alive.
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def encode_chunks(tensors: Mapping[str, torch.Tensor | None]) -> tuple[list[bytes | memoryview], int]:
    """Encode `tensors` as a list of buffers to write back to back, and their total length.

    Tensor bytes are not copied into one big buffer (write the chunks with `writelines` / a streaming body);
    the chunks reference the tensors' memory, so do not modify the tensors until the chunks are written.
    """
    _check_byteorder()
    payload: list[bytes | memoryview] = []
    offset = HEADER_SIZE
    crc = 0
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise WireFormatError(f"tensor keys must be non-empty strings, got {key!r}")
        kb = key.encode("utf-8")
        if len(kb) > 0xFFFF:
            raise WireFormatError(f"tensor key too long ({len(kb)} bytes): {key[:40]!r}...")
        if value is None:
            meta = _ENTRY_HEAD.pack(len(kb)) + kb + _ENTRY_META.pack(1, 0, 0) + _U64.pack(0)
            raw = None
        else:
            if not isinstance(value, torch.Tensor):
                raise WireFormatError(
                    f"entry {key!r} is a {type(value).__name__}, expected a torch.Tensor or None"
                )
            code = _DTYPE_CODES.get(value.dtype)
            if code is None:
                raise WireFormatError(f"entry {key!r} has unsupported dtype {value.dtype}")
            if value.dim() > 255:
                raise WireFormatError(f"entry {key!r} has {value.dim()} dimensions (at most 255)")
            raw = _raw_bytes(value)
            meta = (
                _ENTRY_HEAD.pack(len(kb))
                + kb
                + _ENTRY_META.pack(0, code, value.dim())
                + struct.pack(f"<{value.dim()}Q", *value.shape)
                + _U64.pack(len(raw))
            )
        meta += b"\0" * _pad(offset + len(meta))
        payload.append(meta)
        crc = zlib.crc32(meta, crc)
        offset += len(meta)
        if raw is not None and len(raw):
            payload.append(raw)
            crc = zlib.crc32(raw, crc)
            offset += len(raw)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(tensors), offset - HEADER_SIZE, crc)
    return [header, *payload], offset


def encode(tensors: Mapping[str, torch.Tensor | None]) -> bytes:
    """Encode `tensors` into one bytes object (one copy of the tensor bytes)."""
    chunks, _ = encode_chunks(tensors)
    return b"".join(chunks)


def _frombuffer(mv: memoryview, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    if mv.readonly:
        # A read-only buffer (bytes) is fine as long as the caller does not write; the module docstring says so.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)
    return torch.frombuffer(mv, dtype=dtype, count=count, offset=offset)


def decode(buf: bytes | bytearray | memoryview, *, verify: bool = True) -> dict[str, torch.Tensor | None]:
    """Decode a message into key -> tensor (views into `buf`, see the module docstring) or None.

    Raises `WireFormatError` (one line) on anything that is not a complete, intact message of this VERSION.
    `verify=False` skips the checksum (only for buffers that never left the process).
    """
    _check_byteorder()
    try:
        mv = memoryview(buf).cast("B")
    except TypeError as e:
        raise WireFormatError(f"tensor message must be a bytes-like object, got {type(buf).__name__}") from e
    total = len(mv)
    if total < HEADER_SIZE:
        raise WireFormatError(f"tensor message truncated: {total} bytes, the header alone is {HEADER_SIZE}")
    magic, version, flags, count, payload_len, crc = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise WireFormatError(f"not a tensor message: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"tensor wire format version {version}, this build reads version {VERSION}")
    if flags != 0:
        raise WireFormatError(f"tensor message has unknown flags {flags:#x}")
    if HEADER_SIZE + payload_len != total:
        what = "truncated" if HEADER_SIZE + payload_len > total else "has trailing bytes"
        raise WireFormatError(
            f"tensor message {what}: header says {HEADER_SIZE + payload_len} bytes, got {total}"
        )
    if verify and zlib.crc32(mv[HEADER_SIZE:]) != crc:
        raise WireFormatError("tensor message checksum mismatch (corrupted in transit)")

    out: dict[str, torch.Tensor | None] = {}
    pos = HEADER_SIZE

    def need(n: int, what: str) -> None:
        if pos + n > total:
            raise WireFormatError(f"tensor message entry {len(out)}: {what} runs past the end of the message")

    for _ in range(count):
        need(_ENTRY_HEAD.size, "key length")
        (klen,) = _ENTRY_HEAD.unpack_from(mv, pos)
        pos += _ENTRY_HEAD.size
        need(klen + _ENTRY_META.size, "key")
        try:
            key = bytes(mv[pos : pos + klen]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireFormatError(f"tensor message entry {len(out)}: key is not utf-8") from e
        pos += klen
        if not key:
            raise WireFormatError(f"tensor message entry {len(out)}: empty key")
        if key in out:
            raise WireFormatError(f"tensor message has duplicate key {key!r}")
        is_none, code, ndim = _ENTRY_META.unpack_from(mv, pos)
        pos += _ENTRY_META.size
        need(8 * ndim + _U64.size, f"shape of {key!r}")
        shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
        pos += 8 * ndim
        (nbytes,) = _U64.unpack_from(mv, pos)
        pos += _U64.size
        pos += _pad(pos)
        if is_none not in (0, 1):
            raise WireFormatError(f"tensor message entry {key!r}: bad None flag {is_none}")
        if is_none:
            if nbytes or ndim:
                raise WireFormatError(f"tensor message entry {key!r}: a None entry carries data")
            out[key] = None
            continue
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise WireFormatError(f"tensor message entry {key!r}: unknown dtype code {code}")
        # An empty tensor carries no bytes, so its other dimensions are bounded by nothing in the message;
        # torch refuses (TypeError/RuntimeError) shapes whose strides overflow int64: refuse them first.
        span = 1
        for d in shape:
            span *= max(d, 1)
        if span > _MAX_SPAN:
            raise WireFormatError(f"tensor message entry {key!r}: shape {list(shape)} is too large")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if numel * itemsize != nbytes:
            raise WireFormatError(
                f"tensor message entry {key!r}: {nbytes} bytes for shape {list(shape)} of {dtype} "
                f"(expected {numel * itemsize})"
            )
        need(nbytes, f"data of {key!r}")
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        else:
            out[key] = _frombuffer(mv, dtype, numel, pos).view(shape)
        pos += nbytes
    if pos != total:
        raise WireFormatError(f"tensor message has {total - pos} bytes after its {count} entries")
    return out
