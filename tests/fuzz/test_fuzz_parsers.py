"""Hostile input: the parsers of untrusted input end every input in their own one-line error.

Two kinds of fuzzing, both bounded in time: hypothesis builds structurally plausible wire messages (the
checksum and length recomputed, so the entry parser is what gets exercised), and the mutation fuzzer of
`modelopt_ext.bench.fuzz` (what the benchmark runs for longer) runs each target for a few seconds.
"""

from __future__ import annotations

import random
import struct
import time
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelopt_ext.bench import fuzz
from modelopt_ext.supply.target_server import wire

_BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def _messages(draw) -> bytes:
    """A header and entries with arbitrary counts, dtype codes, ranks, shapes and byte counts."""
    entries = b""
    count = draw(st.integers(0, 3))
    for i in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([f"k{i}", "", "k0", "\u00e9"])).encode()
        ndim = draw(st.integers(0, 70))
        shape = draw(
            st.lists(
                st.one_of(
                    st.integers(0, 4), st.sampled_from([1 << 31, 1 << 62, (1 << 63) - 1, (1 << 64) - 1])
                ),
                min_size=min(ndim, 6),
                max_size=min(ndim, 6),
            )
        )
        nbytes = draw(st.one_of(st.integers(0, 64), st.sampled_from([(1 << 64) - 1, 1 << 40])))
        meta = struct.pack("<H", len(key)) + key
        meta += struct.pack("<BBB", draw(st.integers(0, 2)), draw(st.integers(0, 20)), ndim)
        meta += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<Q", nbytes)
        meta += b"\0" * ((-(wire.HEADER_SIZE + len(entries) + len(meta))) % wire.ALIGN)
        entries += meta + draw(st.binary(max_size=64))
    header = struct.pack("<4sHHIQI", wire.MAGIC, wire.VERSION, 0, count, len(entries), zlib.crc32(entries))
    return header + entries


@_BOUNDED
@given(_messages())
def test_wire_decode_of_structured_garbage_is_a_wire_error(msg):
    try:
        out = wire.decode(msg)
    except wire.WireFormatError as e:
        assert "\n" not in str(e) and str(e)
        return
    for t in out.values():
        if t is not None:
            t.clone()


@_BOUNDED
@given(st.binary(max_size=512))
def test_wire_decode_of_random_bytes_is_a_wire_error(data):
    with pytest.raises(wire.WireFormatError):
        wire.decode(wire.MAGIC + data if data[:1] == b"\1" else data)


def test_empty_tensor_with_overflowing_dimensions_is_refused_in_one_line():
    """What a 20 s fuzz found (torch's 'Stride calculation overflowed' / 'Overflow when unpacking long')."""
    for shape in ((0, 1 << 40, 1 << 40), (0, (1 << 64) - 1)):
        meta = struct.pack("<H", 1) + b"x" + struct.pack("<BBB", 0, 9, len(shape))
        meta += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<Q", 0)
        meta += b"\0" * ((-(wire.HEADER_SIZE + len(meta))) % wire.ALIGN)
        msg = struct.pack("<4sHHIQI", wire.MAGIC, wire.VERSION, 0, 1, len(meta), zlib.crc32(meta)) + meta
        with pytest.raises(wire.WireFormatError, match=r"shape \[0, .*\] is too large"):
            wire.decode(msg)
    # A legitimately empty tensor still decodes.
    assert wire.decode(wire.encode({"e": torch.empty(0, 7)}))["e"].shape == (0, 7)


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_mutation_fuzz_finds_no_crash(target):
    """Each target for ~2 s: every input parses or ends in the format's own one-line error; nothing outside
    the shared-storage root is touched and no hidden-state file is left behind."""
    out = fuzz.Outcomes(target)
    start = time.monotonic()
    fuzz.TARGETS[target](random.Random(f"test-{target}"), start + 2.0, out)
    out.seconds = time.monotonic() - start
    print(fuzz.format_table([out]))
    assert out.tried >= 20, out
    assert out.clean > 0, "the mutations never reached an error path: the fuzzer is not mutating"
    assert out.crash_count == 0, fuzz.format_table([out])


def test_fuzz_cli_prints_the_table_and_fails_on_unknown_targets(capsys):
    assert fuzz.main(["--seconds", "1", "--targets", "wire"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["target", "inputs", "inputs/s", "ok", "clean", "error", "crash"]
    with pytest.raises(SystemExit):
        fuzz.main(["--targets", "nope"])
