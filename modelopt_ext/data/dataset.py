"""The tokenised training conversations, cached on disk so a restart does not tokenise again.

The cache file is keyed by everything that changes its content: the data file's bytes, the tokenizer, the
chat template, max_length and this module's format version. It is written atomically (temp + rename, so
ranks racing to write it are harmless) and read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelopt_ext.data.conversations import read_conversations, resolve_chat_template, tokenize_conversation
from modelopt_ext.util.errors import ConfigError

if TYPE_CHECKING:  # the recipe schema sits above data/ (it validates drafters, which read data/)
    from modelopt_ext.config.recipe import DataConfig

_CACHE_VERSION = 1
# Tokenising renders every conversation prefix (~1-10 ms per conversation): large files are split over
# processes. Below this size the process start-up costs more than it saves.
PARALLEL_MIN_CONVERSATIONS = 10_000
_NO_LIMIT = 1 << 62

_worker_state: dict = {}


def _init_worker(tokenizer: Any, template: str | None) -> None:
    _worker_state.update(tokenizer=tokenizer, template=template)


def _tokenize_one(
    tokenizer: Any, messages: list[dict], template: str | None
) -> tuple[list[int], list[int]] | str:
    """(ids, mask), or why the template could not render this conversation (one bad sample, not a crash)."""
    try:
        return tokenize_conversation(tokenizer, messages, _NO_LIMIT, template)
    except Exception as e:  # noqa: BLE001 - Jinja raises anything a template author wrote (raise_exception)
        return f"{type(e).__name__}: {e}"


def _tokenize_chunk(chunk: list[list[dict]]) -> list[tuple[list[int], list[int]] | str]:
    tok, template = _worker_state["tokenizer"], _worker_state["template"]
    return [_tokenize_one(tok, m, template) for m in chunk]


def tokenize_all(
    conversations: list[list[dict]], tokenizer: Any, template: str | None, num_proc: int = 1
) -> list[tuple[list[int], list[int]] | str]:
    """(ids, mask) per conversation, untruncated, in order (or an error string for a conversation the template
    cannot render); over `num_proc` processes when > 1."""
    if num_proc <= 1 or len(conversations) < 2 * num_proc:
        return [_tokenize_one(tokenizer, m, template) for m in conversations]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork is cheap (the tokenizer is already imported); after CUDA is up only spawn is safe.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    size = max(1, min(256, len(conversations) // (4 * num_proc)))
    chunks = [conversations[i : i + size] for i in range(0, len(conversations), size)]
    with ProcessPoolExecutor(num_proc, mp.get_context(method), _init_worker, (tokenizer, template)) as ex:
        return [r for part in ex.map(_tokenize_chunk, chunks) for r in part]


def default_num_proc(n_conversations: int) -> int:
    """Processes for tokenising n conversations: 1 for small files, else up to 16 of this node's cores."""
    if n_conversations < PARALLEL_MIN_CONVERSATIONS:
        return 1
    return max(
        1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the tokenizer's model and its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary stands in for the model
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(data_path: Path, tokenizer: Any, template: str | None, max_length: int) -> str:
    """The cache key (hex) for a data file tokenised with this tokenizer, template and max_length."""
    h = hashlib.sha256()
    for part in (
        f"v{_CACHE_VERSION}",
        _file_sha256(data_path),
        tokenizer_fingerprint(tokenizer),
        template if template is not None else f"tokenizer:{getattr(tokenizer, 'chat_template', None)}",
        str(max_length),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of tokenised conversations: item = {"input_ids": int64 [T], "loss_mask": bool [T]}.

    Conversations whose mask is empty after truncation (nothing to learn) are dropped and counted.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        tokenizer: Any,
        cache_dir: str | Path,
        log: Callable[[str], None] | None = None,
        num_proc: int | None = None,
    ):
        self.log = log or (lambda msg: print(msg, flush=True))
        self.num_proc = num_proc  # tokenising processes; None: default_num_proc(size)
        self.path = Path(data_cfg.path)
        self.max_length = data_cfg.max_length
        self.vocab_size = len(tokenizer)
        template = resolve_chat_template(data_cfg.chat_template)
        key = cache_key(self.path, tokenizer, template, self.max_length) if self.path.is_file() else None
        self.cache_file = Path(cache_dir) / f"tokenized-{self.path.stem}-{key[:16] if key else 'none'}.pt"
        cached = self._load_cache(key)
        if cached is None:
            cached = self._tokenize(data_cfg, tokenizer, template, key)
        self._ids, self._mask, self._offsets = cached["input_ids"], cached["loss_mask"], cached["offsets"]
        self.num_dropped = int(cached["num_dropped"])

    def _load_cache(self, key: str | None) -> dict | None:
        if key is None or not self.cache_file.is_file():
            return None
        try:
            data = torch.load(self.cache_file, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            # A torn or foreign file: re-tokenise rather than fail.
            self.log(
                f"data: ignoring unreadable tokenisation cache {self.cache_file} ({type(e).__name__}: {e})"
            )
            return None
        if not isinstance(data, dict) or data.get("key") != key:
            self.log(f"data: ignoring tokenisation cache {self.cache_file} (key mismatch)")
            return None
        n = len(data["offsets"]) - 1
        self.log(
            f"data: loaded {n} tokenised conversations from the cache {self.cache_file} (no re-tokenisation)"
        )
        return data

    def _tokenize(self, data_cfg: DataConfig, tokenizer: Any, template: str | None, key: str | None) -> dict:
        t0 = time.monotonic()
        conversations = read_conversations(self.path, strict=data_cfg.strict)
        ids_parts, mask_parts, lengths, dropped, truncated = [], [], [], 0, 0
        num_proc = self.num_proc if self.num_proc is not None else default_num_proc(len(conversations))
        failures: list[str] = []
        for n, result in enumerate(tokenize_all(conversations, tokenizer, template, num_proc)):
            if isinstance(result, str):
                failures.append(f"conversation {n + 1}: the chat template failed ({result})")
                continue
            full_ids, full_mask = result
            truncated += len(full_ids) > self.max_length
            ids, mask = full_ids[: self.max_length], full_mask[: self.max_length]
            if not any(mask):
                dropped += 1
                continue
            ids_parts.append(torch.tensor(ids, dtype=torch.int64))
            mask_parts.append(torch.tensor(mask, dtype=torch.bool))
            lengths.append(len(ids))
        if failures and data_cfg.strict:
            raise ConfigError(failures, source=str(self.path))
        if failures:
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            print(
                f"warning: data: skipped {len(failures)} conversations of {self.path}: {'; '.join(failures[:3])}{more}",
                file=sys.stderr,
                flush=True,
            )
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0) if lengths else 0
        data = {
            "key": key,
            "input_ids": torch.cat(ids_parts) if ids_parts else torch.zeros(0, dtype=torch.int64),
            "loss_mask": torch.cat(mask_parts) if mask_parts else torch.zeros(0, dtype=torch.bool),
            "offsets": offsets,
            "num_dropped": dropped,
        }
        if dropped:
            print(
                f"warning: data: dropped {dropped} conversations of {self.path} with no assistant token within "
                f"max_length={self.max_length}",
                file=sys.stderr,
                flush=True,
            )
        self._save_cache(data)
        self.log(
            f"data: tokenised {len(lengths)} conversations from {self.path} in {time.monotonic() - t0:.1f} s "
            f"({num_proc} process{'es' if num_proc > 1 else ''}, "
            f"{truncated} truncated to {self.max_length} tokens); cached in {self.cache_file}"
        )
        return data

    def _save_cache(self, data: dict) -> None:
        if data["key"] is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_name(f".{self.cache_file.name}.tmp{os.getpid()}")
        try:
            torch.save(data, tmp)
            os.replace(tmp, self.cache_file)
        finally:
            tmp.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return {"input_ids": self._ids[a:b], "loss_mask": self._mask[a:b]}

    def supervised_token_counts(self, vocab_size: int | None = None) -> torch.Tensor:
        """Counts (int64 [V]) of the tokens under the loss mask, over the whole dataset in one pass."""
        toks = self._ids[self._mask]
        size = max(vocab_size or self.vocab_size, int(toks.max()) + 1 if toks.numel() else 0)
        return torch.bincount(toks, minlength=size)

    def length(self, i: int) -> int:
        """Token count of item i (for length-aware batching, without materialising the item)."""
        return int(self._offsets[i + 1] - self._offsets[i])


def collate_padded(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items to the longest: input_ids int64 [B, T] (pad_id), attention_mask and loss_mask bool [B, T]."""
    width = max(len(it["input_ids"]) for it in items)
    b = len(items)
    input_ids = torch.full((b, width), int(pad_id), dtype=torch.int64)
    attention_mask = torch.zeros((b, width), dtype=torch.bool)
    loss_mask = torch.zeros((b, width), dtype=torch.bool)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n] = it["input_ids"]
        attention_mask[row, :n] = True
        loss_mask[row, :n] = it["loss_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
