"""Bearer-token auth shared by serve_target and its client: the token lives in a file in the job's private folder."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path


class TokenFileError(ValueError):
    """A token file that cannot be used (one line naming the file)."""


def read_token_file(path: str | os.PathLike, *, what: str = "--token-file") -> str:
    """The token in `path` (surrounding whitespace stripped).

    Refuses a missing/empty file, and one other users can read: a token everyone can read protects nothing.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenFileError(f"{what} {str(p)!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"{what} {str(p)!r} is not text") from None
    if mode & stat.S_IROTH:
        raise TokenFileError(f"{what} {str(p)!r} is readable by other users (chmod 600 it)")
    token = text.strip()
    if not token:
        raise TokenFileError(f"{what} {str(p)!r} is empty")
    if any(c.isspace() for c in token):
        raise TokenFileError(f"{what} {str(p)!r} holds whitespace inside the token")
    return token


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header carries `token` (always True when no token is configured)."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    # Constant-time compare: response timing must not leak the token prefix.
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())
