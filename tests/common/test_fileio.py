"""Atomic writes and the bounded lock shared by exports, builds and CLIs."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from modelopt_ext.util.fileio import (
    exclusive_lock,
    replace_dir_atomically,
    write_json_atomic,
    write_text_atomic,
)


def test_text_and_json_writes_leave_no_temp_files(tmp_path):
    write_text_atomic(tmp_path / "a" / "x.txt", "hello\n")
    write_json_atomic(tmp_path / "a" / "y.json", {"k": 1})
    assert (tmp_path / "a" / "x.txt").read_text() == "hello\n"
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"k": 1}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.json"]


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    with replace_dir_atomically(out) as tmp:
        (tmp / "new").write_text("2")
        assert (out / "old").exists()  # readers still see the old folder while the new one is built
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_dir_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("1")
    with pytest.raises(RuntimeError), replace_dir_atomically(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("build failed")
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _hold(lock_path, seconds):
    with exclusive_lock(lock_path, 5, "test holder"):
        time.sleep(seconds)


def test_exclusive_lock_wait_is_bounded_and_names_what(tmp_path):
    lock = tmp_path / "x.lock"
    holder = mp.get_context("spawn").Process(target=_hold, args=(str(lock), 5))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        with pytest.raises(TimeoutError, match="another build of the thing"):
            with exclusive_lock(lock, 0.3, "another build of the thing", poll_s=0.05):
                pass
    finally:
        holder.join(30)
    with exclusive_lock(lock, 1, "free now"):
        pass


def test_read_json_object_one_line_errors(tmp_path):
    from modelopt_ext.util.fileio import read_json_object

    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "torn.json").write_text('{"a": ')
    for name, words in [
        ("nope.json", "missing"),
        ("list.json", "expected a JSON object"),
        ("torn.json", "unreadable"),
    ]:
        with pytest.raises(ValueError) as e:
            read_json_object(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {words}") and "\n" not in str(e.value)
