"""Round trips and refusals of the tensor wire format (modelopt_ext.supply.target_server.wire)."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelopt_ext.supply.target_server import wire
from modelopt_ext.supply.target_server.wire import WireFormatError, decode, encode

ALL_DTYPES = list(wire.SUPPORTED_DTYPES)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        if dtype.is_complex:
            return torch.complex(base, -base).to(dtype)
        return (base * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise equality (NaN-safe, fp8-safe): compare the raw bytes.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 7)], ids=str)
def test_round_trip_every_dtype_and_shape(dtype, shape):
    t = _sample(dtype, shape)
    out = decode(encode({"x": t, "none": None}))
    assert list(out) == ["x", "none"]
    assert out["none"] is None
    assert out["x"].dtype == dtype and tuple(out["x"].shape) == shape
    assert _same(out["x"], t)


def test_round_trip_mixed_message_keeps_order_and_values():
    msg = {
        "input_ids": torch.arange(12, dtype=torch.int64).view(3, 4),
        "attention_mask": torch.ones(3, 4, dtype=torch.bool),
        "probs": torch.rand(3, 4, 5).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7, dtype=torch.float16),
        "absent": None,
        "ünïcode key": torch.tensor([-3, 4], dtype=torch.int8),
    }
    out = decode(encode(msg))
    assert list(out) == list(msg)
    for k, v in msg.items():
        assert (out[k] is None) if v is None else _same(out[k], v)


def test_non_contiguous_and_views_are_encoded_in_logical_order():
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    t = base.t()[1:, ::2]
    assert not t.is_contiguous()
    assert torch.equal(decode(encode({"t": t}))["t"], t)


def test_decode_is_zero_copy_and_aligned_on_a_bytearray():
    buf = bytearray(
        encode({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int16)})
    )
    out = decode(buf)
    a = out["a"]
    # The tensor is a view into the buffer: writing the buffer changes it (no copy was made) ...
    off = bytes(buf).index(struct.pack("<f", 5.0))
    buf[off : off + 4] = struct.pack("<f", -1.0)
    assert a[5].item() == -1.0
    # ... and data offsets sit on ALIGN boundaries relative to the message start.
    base_ptr = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert (a.data_ptr() - base_ptr) % wire.ALIGN == 0
    assert (out["b"].data_ptr() - base_ptr) % wire.ALIGN == 0


def test_decoded_tensors_keep_the_buffer_alive():
    out = decode(bytes(encode({"a": torch.arange(1000, dtype=torch.int64)})))
    import gc

    gc.collect()
    assert torch.equal(out["a"], torch.arange(1000))


def test_encode_chunks_match_encode_and_total_length():
    msg = {"a": torch.rand(10, 3), "n": None, "b": torch.zeros(0)}
    chunks, total = wire.encode_chunks(msg)
    joined = b"".join(bytes(c) for c in chunks)
    assert joined == encode(msg) and len(joined) == total


def test_encode_refuses_bad_entries():
    with pytest.raises(WireFormatError, match="unsupported dtype"):
        encode({"q": torch.zeros(2, dtype=torch.complex32)})
    with pytest.raises(WireFormatError, match="expected a torch.Tensor"):
        encode({"x": [1, 2]})
    with pytest.raises(WireFormatError, match="non-empty strings"):
        encode({"": torch.zeros(1)})


GOOD = encode({"a": torch.arange(10, dtype=torch.int32), "b": torch.rand(2, 2)})


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "truncated"),
        (b"hello world, this is not a tensor message", "magic"),
        (GOOD[:-1], "truncated"),
        (GOOD[: wire.HEADER_SIZE + 3], "truncated"),
        (GOOD + b"\0", "trailing bytes"),
        (GOOD[:4] + struct.pack("<H", 99) + GOOD[6:], "version 99"),
        (GOOD[:-2] + bytes([GOOD[-2] ^ 0xFF]) + GOOD[-1:], "checksum"),
        ("not bytes", "bytes-like"),
    ],
)
def test_decode_refuses_garbage_with_one_line(payload, fragment):
    with pytest.raises(WireFormatError) as excinfo:
        decode(payload)
    assert fragment in _one_line(excinfo)


def _reforge(payload: bytes, count: int) -> bytes:
    """A message with a valid header/checksum around `payload`: exercises the entry parser itself."""
    return (
        struct.pack("<4sHHIQI", wire.MAGIC, wire.VERSION, 0, count, len(payload), zlib.crc32(payload))
        + payload
    )


def test_decode_refuses_structurally_bad_entries_even_with_a_valid_checksum():
    # An entry count larger than the entries present.
    body = GOOD[wire.HEADER_SIZE :]
    with pytest.raises(WireFormatError, match="past the end|after its"):
        decode(_reforge(body, 3))
    # A byte count that disagrees with the shape.
    entry = (
        struct.pack("<H", 1)
        + b"x"
        + struct.pack("<BBB", 0, 9, 1)
        + struct.pack("<Q", 4)
        + struct.pack("<Q", 12)
    )
    entry += b"\0" * ((-(wire.HEADER_SIZE + len(entry))) % wire.ALIGN) + b"\0" * 12
    with pytest.raises(WireFormatError, match="expected 16"):
        decode(_reforge(entry, 1))
    # An unknown dtype code.
    bad = entry.replace(struct.pack("<BBB", 0, 9, 1), struct.pack("<BBB", 0, 200, 1), 1)
    with pytest.raises(WireFormatError, match="unknown dtype code 200"):
        decode(_reforge(bad, 1))
    # Fewer entries claimed than present.
    with pytest.raises(WireFormatError, match="after its 1 entries"):
        decode(_reforge(body, 1))


# ---- property-style tests -------------------------------------------------------------------------------

_keys = st.text(min_size=1, max_size=12)
_shapes = st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=4).map(tuple)
_entry = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(ALL_DTYPES), _shapes, st.integers(0, 2**16)).map(lambda a: _sample(*a)),
)


@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(st.dictionaries(_keys, _entry, max_size=6))
def test_property_round_trip(msg):
    out = decode(encode(msg))
    assert list(out) == list(msg)
    for k, v in msg.items():
        assert (out[k] is None) if v is None else _same(out[k], v)


@settings(max_examples=40, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(st.dictionaries(_keys, _entry, min_size=1, max_size=4), st.data())
def test_property_any_single_byte_flip_or_truncation_is_refused(msg, data):
    good = encode(msg)
    i = data.draw(st.integers(0, len(good) - 1))
    flipped = bytearray(good)
    flipped[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(WireFormatError):
        decode(bytes(flipped))
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(WireFormatError):
        decode(good[:cut])
