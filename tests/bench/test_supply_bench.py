"""Smoke test of the supply benchmark's data-plane table (tiny payloads; not a timed test).

Runs the real transports (in-process copy, wire format over a loopback HTTP server process, locked
safetensors files read via the vLLM lock protocol, a 2-process gloo group) and checks the printed table and
the JSON: one row per transport and size, positive finite figures, and no files left on the storage.
"""

import json
import math

import pytest

from modelopt_ext.bench import supply

SIZES = [0.1, 0.5]


def test_data_plane_table_has_every_transport_and_size(tmp_path, capsys):
    storage = tmp_path / "storage"
    storage.mkdir()
    out = tmp_path / "supply.json"
    rc = supply.main(
        ["--skip-train", "--sizes-mb", ",".join(map(str, SIZES)), "--iters", "1",
         "--storage", str(storage), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["data_plane"]
    assert [(r["transport"], round(r["mb"], 1)) for r in rows] == [
        (t, s) for t in supply.TRANSPORTS for s in SIZES
    ]
    for r in rows:
        for key in ("mb", "ms", "mb_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        assert r["mb_per_s"] == pytest.approx(r["mb"] / (r["ms"] / 1e3), rel=1e-6)
    assert result["training"] is None
    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines()]
    for t in supply.TRANSPORTS:
        assert sum(1 for cols in table if cols and cols[0] == t) == len(SIZES), printed
    assert list(storage.iterdir()) == []  # its scratch folder is gone


def test_files_transport_leaves_no_file_or_lock(tmp_path):
    # The reader deletes each file and its lock after reading, as vLLM streaming does.
    sec = supply.bench_files(supply.make_payload(0.1), 2, tmp_path)
    assert sec > 0
    assert list(tmp_path.iterdir()) == []


def test_payload_sizes_follow_the_request():
    for mb in (1.0, 8.0):
        assert supply.payload_bytes(supply.make_payload(mb)) / 1e6 == pytest.approx(mb, rel=0.01)


def test_bad_sizes_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        supply.main(["--skip-train", "--sizes-mb", "1,-2"])
    assert e.value.code == 2
    assert "--sizes-mb" in capsys.readouterr().err
