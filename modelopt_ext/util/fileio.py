"""Atomic writes (temp file or folder beside the target, then rename), a bounded file lock, and reading a JSON
object with a one-line error.

A reader never sees half a file or half a folder.

Pure standard library: the launcher uses it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a file; ValueError naming the file when it is missing, unreadable or not an object."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object")  # noqa: TRY004 - one error type for a bad file
    return data


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (parent folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_figure_atomic(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG to `path` atomically (temp file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Write `obj` as indented JSON (plus a newline) to `path` atomically."""
    dumps_kwargs.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, timeout_s: float, what: str, poll_s: float = 0.5):
    """Hold an exclusive flock on `lock_path` (created if needed), waiting at most `timeout_s` for it.

    Raises TimeoutError naming `what` when another holder keeps it longer.
    """
    import fcntl

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"timed out after {timeout_s:.0f} s waiting for {what} ({lock_path})"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def replace_dir_atomically(out: str | os.PathLike):
    """Yield a fresh temp folder beside `out`; on success it replaces `out` in one rename.

    An existing `out` is moved aside first and deleted only after the swap (restored if the swap fails), so
    readers see the old folder or the new one, never a partial one. On any error the temp folder is removed
    and `out` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
            return
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
