"""Smoke test of the soak benchmark (serve_target, a few seconds): the table and its figures are real."""

from __future__ import annotations

import pytest

from modelopt_ext.bench import soak


@pytest.mark.e2e
def test_quick_soak_of_serve_target_prints_the_table(capsys, tmp_path):
    out = tmp_path / "soak.json"
    assert soak.main(["--quick", "--seconds", "4", "--clients", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header, row = text.splitlines()[1:3]
    assert header.split()[:3] == ["engine", "clients", "seconds"]
    cells = row.split()
    assert cells[0] == "serve_target" and cells[1] == "2"
    assert int(cells[3]) > 0 and int(cells[6]) == 0  # requests served, no errors
    assert float(cells[7]) > 50 and float(cells[8]) > 50  # the server's RSS was measured (MB)
    assert '"engine": "serve_target"' in out.read_text()


def test_tree_rss_counts_this_process():
    import os

    assert soak.tree_rss_mb(os.getpid()) > 10
