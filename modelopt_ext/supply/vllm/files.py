"""Read one vLLM hidden-state file safely (the reader the streaming dataset and the vLLM tests share).

vLLM's hidden-state connector answers the HTTP request BEFORE the file is written: it holds an exclusive
`flock` on `<file>.lock` (created before the response leaves) until the write is done. So a reader:
1. confines the path to the shared-storage root: the real path (symlinks resolved) of both the file and its lock
   must lie inside the root's real path, and the opened descriptor is checked again (no swap after the check);
2. takes a SHARED lock on `<file>.lock` (bounded wait, unlike vLLM's own helper which can sleep forever);
3. reads and parses the safetensors file (a truncated/incomplete file is retried briefly, then reported);
4. deletes the file and its lock (only after confinement was proven: never unlink outside the root).

Errors: `PathRejected` (not retryable on any server: the server is misbehaving), `FileIncomplete` (transient).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load


class HiddenStateFileError(Exception):
    """Base: something is wrong with a hidden-state file."""


class PathRejected(HiddenStateFileError):
    """The path a server named is outside the shared-storage root (directly, via `..`, or via a symlink)."""


class FileIncomplete(HiddenStateFileError):
    """The file is missing, locked for too long, or not (yet) a complete safetensors file."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(path: str, root: str | os.PathLike) -> str:
    """The path, if its real location (and that of its lock) is inside `root`'s real location; else PathRejected."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise PathRejected(f"hidden_states_path {path!r} is not a usable path")
    root_real = os.path.realpath(root)
    if not os.path.isabs(path):
        raise PathRejected(f"hidden_states_path {path!r} is not absolute (shared-storage root {root_real})")
    for p in (path, path + ".lock"):
        real = os.path.realpath(p)
        if not _inside(real, root_real) or real == root_real:
            raise PathRejected(
                f"hidden_states_path {path!r} resolves to {real!r}, outside the shared-storage root {root_real!r}"
            )
    return path


def _open_confined(path: str, root_real: str) -> int:
    """Open without following a final symlink, then re-check where the descriptor really points."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(real, root_real):
            raise PathRejected(f"hidden_states_path {path!r} opened as {real!r}, outside {root_real!r}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _wait_shared_lock(lock_path: str, root_real: str, timeout_s: float) -> int | None:
    """Hold a shared flock on the lock file (returns its fd), or None when the server wrote no lock file."""
    try:
        fd = _open_confined(lock_path, root_real)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathRejected(f"lock file {lock_path!r} is a symlink") from None
        raise
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise FileIncomplete(
                    f"{lock_path} still locked by the writer after {timeout_s:.1f}s"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def read_hidden_states(
    path: str,
    root: str | os.PathLike,
    *,
    lock_timeout_s: float = 60.0,
    incomplete_retries: int = 5,
    retry_delay_s: float = 0.02,
    delete: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Read `path` (confined to `root`) under vLLM's lock protocol; returns (tensors, file bytes).

    Deletes the file and its lock afterwards when `delete` (also when the content is unreadable, so broken
    files do not pile up on shared storage). Raises PathRejected or FileIncomplete.
    """
    confine(path, root)
    root_real = os.path.realpath(root)
    lock_path = path + ".lock"
    last: Exception | None = None
    try:
        for attempt in range(incomplete_retries + 1):
            if attempt:
                time.sleep(retry_delay_s * (2 ** (attempt - 1)))
            lock_fd = _wait_shared_lock(lock_path, root_real, lock_timeout_s)
            locked = lock_fd is not None
            try:
                try:
                    fd = _open_confined(path, root_real)
                except FileNotFoundError:
                    fd = None
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        raise PathRejected(f"hidden_states_path {path!r} is a symlink") from None
                    raise
                if fd is not None:
                    with os.fdopen(fd, "rb") as f:
                        blob = f.read()
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)  # releases the shared lock
            if fd is None:
                last = FileIncomplete(
                    f"{path} does not exist" + (" after the writer released its lock" if locked else " (yet)")
                )
            else:
                try:
                    return st_load(blob), len(blob)
                except (SafetensorError, ValueError, RuntimeError) as e:  # truncated or garbage
                    last = FileIncomplete(
                        f"{path} is not a complete safetensors file ({len(blob)} bytes): {e}"
                    )
            if locked:
                # The writer released its lock: what is there is final, re-reading cannot help. Without a lock
                # file (server runs without the protocol) the file may still be growing: poll a little.
                break
        assert last is not None
        raise last
    finally:
        if delete:
            _unlink_confined(path, root_real)


def _unlink_confined(path: str, root_real: str) -> None:
    # confine() already proved both real paths are inside the root; unlink never follows a final symlink.
    for p in (path, path + ".lock"):
        parent = os.path.realpath(os.path.dirname(p))
        if not _inside(parent, root_real):
            continue
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def shared_root(root: str | os.PathLike) -> Path:
    """The shared-storage root as a real, existing directory (ValueError naming it otherwise)."""
    p = Path(root)
    if not p.is_dir():
        raise ValueError(f"data.shared_storage_root {str(root)!r} is not a directory")
    return Path(os.path.realpath(p))


@dataclass
class HiddenStatesFile:
    """One validated file: the server's token ids and the captured layers."""

    token_ids: torch.Tensor  # int64 [T]
    hidden_states: torch.Tensor  # [T, n_layers, H], the server's dtype


class MalformedFile(HiddenStateFileError):
    """The file parsed but its content is wrong: missing keys, inconsistent shapes, or other token ids."""


def check_hidden_states(
    tensors: dict[str, torch.Tensor],
    path: str = "<file>",
    *,
    expected_token_ids: Sequence[int] | torch.Tensor | None = None,
    expected_num_layers: int | None = None,
    hidden_size: int | None = None,
) -> HiddenStatesFile:
    """THE content check of a hidden-state file (every reader calls it): `token_ids` int [T] equal to the
    prompt, `hidden_states` floating [T, n, H] with n >= 2 (drafter layers, then the last layer), n and H as
    expected. MalformedFile names the file and what is wrong."""
    missing = {"token_ids", "hidden_states"} - tensors.keys()
    if missing:
        raise MalformedFile(f"{path}: missing tensors {sorted(missing)} (has {sorted(tensors)})")
    ids, hs = tensors["token_ids"], tensors["hidden_states"]
    if ids.dim() != 1 or ids.dtype.is_floating_point:
        raise MalformedFile(f"{path}: token_ids has shape {tuple(ids.shape)} dtype {ids.dtype}, expected int [T]")
    if hs.dim() != 3 or hs.shape[0] != ids.shape[0] or not hs.dtype.is_floating_point:
        raise MalformedFile(
            f"{path}: hidden_states has shape {tuple(hs.shape)} dtype {hs.dtype}, expected [T={ids.shape[0]}, n, H]"
        )
    if expected_token_ids is not None:
        want = torch.as_tensor(expected_token_ids, dtype=torch.long).flatten()
        if ids.shape != want.shape or not torch.equal(ids.long(), want):
            overlap = min(len(ids), len(want))
            n_diff = int((ids.long()[:overlap] != want[:overlap]).sum())
            raise MalformedFile(
                f"{path}: token ids differ from the prompt (server {len(ids)} tokens, prompt {len(want)}, "
                f"{n_diff} differing in the overlap): wrong tokenizer, truncation or a mixed-up file"
            )
    n, h = hs.shape[1], hs.shape[2]
    if expected_num_layers is not None and n != expected_num_layers:
        raise MalformedFile(
            f"{path}: {n} captured layers, expected {expected_num_layers} (the drafter's layers + the last); "
            "check the server's capture ids"
        )
    if n < 2:
        raise MalformedFile(f"{path}: {n} captured layer(s); need the drafter's layers plus the last layer")
    if hidden_size is not None and h != hidden_size:
        raise MalformedFile(f"{path}: hidden size {h}, expected {hidden_size} (a different target model?)")
    return HiddenStatesFile(token_ids=ids.long(), hidden_states=hs)


def split_aux_last(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A checked [T, n, H] stack -> (the drafter's layers concatenated in capture order [T, (n-1)*H],
    the last layer, pre-final-norm [T, H])."""
    t, n, h = hidden_states.shape
    return hidden_states[:, : n - 1].reshape(t, (n - 1) * h).contiguous(), hidden_states[:, n - 1].contiguous()


def read_hidden_states_file(
    path: str,
    root: str | os.PathLike,
    *,
    expected_token_ids: Sequence[int] | torch.Tensor | None = None,
    expected_num_layers: int | None = None,
    lock_timeout_s: float = 60.0,
    delete: bool = True,
) -> HiddenStatesFile:
    """`read_hidden_states` plus `check_hidden_states`.

    Raises PathRejected, FileIncomplete (transient) or MalformedFile (the server answered for something else).
    """
    tensors, _ = read_hidden_states(path, root, lock_timeout_s=lock_timeout_s, delete=delete)
    return check_hidden_states(
        tensors, path, expected_token_ids=expected_token_ids, expected_num_layers=expected_num_layers
    )
