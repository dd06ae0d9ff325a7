"""Supervision stored on disk: the dump format, its writer, and the offline / hybrid training sources.

A dump folder (docs/offline.md):

    plan.json                 what the dump is for (written first): target identity, aux layer ids, target dtype,
                              storage dtype, target form, draft vocabulary (probs form only), data fingerprint,
                              number of samples, samples per shard
    shard-000000000.safetensors   samples [start, start + count): per-token fields concatenated along tokens
                              (input_ids, loss_mask, aux_hidden_states, target_last_hidden | target_probs),
                              `offsets` int64 [count + 1] and `crc32` int64 [count] (one checksum per sample)
    index.json                written last, when every shard is there: the plan plus the shard list and sizes

Shard k holds samples [k * S, min((k + 1) * S, N)); its file name is its first sample, so a reader finds sample i
without the index. Every shard is written to a temp file and renamed: a shard file either is complete or does
not exist, so a restarted dump skips finished shards and a crash (or a full disk) leaves no torn shard.

Reading is per sample (safetensors slices, memory-mapped): a rank reads only the samples its sampler hands it,
and verifies each sample's checksum, so a corrupt or truncated shard stops the job with one line naming the
file. `OfflineDataset` items look like streamed items (input_ids, loss_mask, aux_hidden_states and the target
form), so the trainer sees the same `Supervision` contract. `HybridDataset` serves a sample from the dump when
it is there and otherwise fetches it from the servers and writes it (one-sample shards), so the first epoch
fills the dump and later epochs never touch the servers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.telemetry.meter import IN_PROCESS
from modelopt_ext.util.errors import ConfigError
from modelopt_ext.util.fileio import write_json_atomic

FORMAT = "modelopt_ext.offline/1"
PLAN = "plan.json"
INDEX = "index.json"
TARGET_FIELDS = ("target_last_hidden", "target_probs")
TOKEN_FIELDS = ("input_ids", "loss_mask", "aux_hidden_states", *TARGET_FIELDS)
# Fields whose mismatch between a dump and a recipe makes the dump unusable, in the order they are checked.
IDENTITY = ("target", "aux_layer_ids", "target_dtype", "target_form", "draft_vocab", "data")
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class OfflineError(RuntimeError):
    """A dump cannot be read or written; the message is one line naming the file or folder.

    It stays one line when a DataLoader re-raises it from a worker (it rebuilds the exception from
    "Caught OfflineError in DataLoader worker process N.\nOriginal Traceback ...": keep the last line).
    """

    def __init__(self, message: str):
        if "\n" in message and "OfflineError: " in message:
            message = message.rstrip().rsplit("OfflineError: ", 1)[1].strip()
        super().__init__(message)


class OfflineConfigError(ConfigError, ValueError):
    """A dump that does not fit the recipe (one line naming the mismatch); the CLIs exit 2."""

    def __init__(self, problem: str):
        super().__init__([problem])


# ----------------------------------------------------------------------------------------------------
# What a dump is for
# ----------------------------------------------------------------------------------------------------


def target_identity(model_path: str | os.PathLike) -> dict[str, Any]:
    """The target as a dump records it: shape fields and a hash of its config.json."""
    cfg_file = Path(model_path) / "config.json"
    try:
        raw = cfg_file.read_bytes()
    except OSError as e:
        raise OfflineConfigError(f"model.path: {cfg_file} cannot be read ({e.strerror})") from None
    cfg = json.loads(raw)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return {
        "num_layers": int(text["num_hidden_layers"]),
        "hidden_size": int(text["hidden_size"]),
        "vocab_size": int(text["vocab_size"]),
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
    }


def data_fingerprint(dataset: Any) -> str:
    """A hash of the tokenised conversations (ids and loss masks, in order): a dump's samples are this data's."""
    h = hashlib.sha256()
    if all(hasattr(dataset, a) for a in ("_ids", "_mask", "_offsets")):
        for t in (dataset._ids, dataset._mask.to(torch.uint8), dataset._offsets):
            h.update(t.contiguous().numpy().tobytes())
    else:
        for i in range(len(dataset)):
            it = dataset[i]
            h.update(torch.as_tensor(it["input_ids"], dtype=torch.int64).numpy().tobytes())
            h.update(torch.as_tensor(it["loss_mask"]).to(torch.uint8).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def vocab_fingerprint(vocab: Any) -> str:
    """A hash of the draft vocabulary (its selected target ids, in draft order)."""
    from modelopt_ext.targets.head import selected_ids

    return hashlib.sha256(selected_ids(vocab).numpy().tobytes()).hexdigest()[:16]


def make_plan(
    *,
    model_path: str,
    aux_layer_ids: Sequence[int],
    target_dtype: str,
    storage_dtype: str,
    target_form: str,
    dataset: Any,
    samples_per_shard: int,
    vocab: Any = None,
) -> dict[str, Any]:
    """The plan of a dump of `dataset` (see the module docstring)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise OfflineConfigError(f"dtype {storage_dtype!r}: use one of {sorted(STORAGE_DTYPES)}")
    if target_form not in TARGET_FIELDS:
        raise ValueError(f"target form {target_form!r} is not one of {TARGET_FIELDS}")
    if samples_per_shard < 1:
        raise OfflineConfigError(f"samples per shard must be >= 1, got {samples_per_shard}")
    return {
        "format": FORMAT,
        "target": target_identity(model_path),
        "aux_layer_ids": [int(i) for i in aux_layer_ids],
        "target_dtype": target_dtype,
        "target_form": target_form,
        "draft_vocab": vocab_fingerprint(vocab) if target_form == "target_probs" else None,
        "data": data_fingerprint(dataset),
        "storage_dtype": storage_dtype,
        "num_samples": len(dataset),
        "samples_per_shard": int(samples_per_shard),
        "model_name": Path(model_path).name,
    }


def plan_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first identity field where a dump's plan differs from what the recipe needs, as a phrase."""
    for key in IDENTITY:
        if key == "draft_vocab" and want.get("target_form") != "target_probs":
            continue  # hidden-state dumps do not depend on the draft vocabulary
        if have.get(key) != want.get(key):
            return f"{key}: dump has {have.get(key)!r}, this run needs {want.get(key)!r}"
    if have.get("num_samples") != want.get("num_samples"):
        return f"num_samples: dump has {have.get('num_samples')}, the data has {want.get('num_samples')}"
    return None


def shard_starts(num_samples: int, per_shard: int) -> list[int]:
    """First sample of every shard."""
    return list(range(0, num_samples, per_shard))


def shard_name(start: int) -> str:
    return f"shard-{start:09d}.safetensors"


def token_bytes(plan_or_shapes: dict[str, Any], draft_vocab_size: int | None = None) -> int:
    """Bytes one token occupies in a dump: ids (8) + mask (1) + aux and target states in the storage dtype."""
    h = int(plan_or_shapes["target"]["hidden_size"])
    n_aux = len(plan_or_shapes["aux_layer_ids"])
    elem = STORAGE_DTYPES[plan_or_shapes["storage_dtype"]].itemsize
    target = (
        h * elem if plan_or_shapes["target_form"] == "target_last_hidden" else int(draft_vocab_size or 0) * 4
    )
    return 9 + n_aux * h * elem + target


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _sample_crc(fields: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in sorted(fields):
        t = fields[name].contiguous()
        crc = zlib.crc32(memoryview(t.view(torch.uint8).numpy()), crc)
    return crc


def _as_stored(item: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {
        "input_ids": torch.as_tensor(item["input_ids"], dtype=torch.int64).cpu(),
        "loss_mask": torch.as_tensor(item["loss_mask"]).to(torch.uint8).cpu(),
        "aux_hidden_states": item["aux_hidden_states"].detach().to("cpu", dtype),
    }
    for f in TARGET_FIELDS:
        if item.get(f) is not None:
            # Probabilities stay fp32: they are already the compact form (Vd columns) and bf16 would bias them.
            out[f] = item[f].detach().to("cpu", dtype if f == "target_last_hidden" else torch.float32)
    return out


def write_shard(
    folder: str | os.PathLike, start: int, items: Sequence[dict[str, torch.Tensor]], dtype: str
) -> int:
    """Write samples `start, start+1, ...` as one shard, atomically (temp file + rename). Returns its bytes.

    A failed write (a full disk: ENOSPC) removes the temp file and raises OfflineError; no shard is left behind.
    """
    folder = Path(folder)
    stored = [_as_stored(it, STORAGE_DTYPES[dtype]) for it in items]
    names = [k for k in TOKEN_FIELDS if k in stored[0]]
    tensors = {k: torch.cat([s[k] for s in stored]).contiguous() for k in names}
    lengths = torch.tensor([len(s["input_ids"]) for s in stored], dtype=torch.int64)
    offsets = torch.zeros(len(stored) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    tensors["offsets"] = offsets
    tensors["crc32"] = torch.tensor([_sample_crc(s) for s in stored], dtype=torch.int64)
    blob = st_save(tensors, metadata={"format": FORMAT, "start": str(start), "count": str(len(stored))})
    path = folder / shard_name(start)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the shard from other users of shared storage
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OfflineError(
                f"{folder}: disk full while writing {path.name} ({len(blob)} bytes); free space and run the dump "
                "again: finished shards are kept"
            ) from None
        raise OfflineError(f"{path}: cannot write ({e.strerror})") from None
    return len(blob)


def remove_stale_temps(folder: str | os.PathLike, starts: Sequence[int]) -> None:
    """Temp files of these shards left by a killed writer."""
    for s in starts:
        for tmp in Path(folder).glob(f".{shard_name(s)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_index(folder: str | os.PathLike, plan: dict[str, Any]) -> Path | None:
    """Write index.json when every shard of the plan exists (None otherwise). Idempotent; safe to race."""
    folder = Path(folder)
    shards = []
    for s in shard_starts(plan["num_samples"], plan["samples_per_shard"]):
        p = folder / shard_name(s)
        if not p.is_file():
            return None
        shards.append({"file": p.name, "start": s, "bytes": p.stat().st_size})
    total = sum(s["bytes"] for s in shards)
    index = {
        **plan,
        "shards": shards,
        "bytes": total,
        "bytes_per_sample": total / max(plan["num_samples"], 1),
    }
    return write_json_atomic(folder / INDEX, index)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A dump's plan or index; one line when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OfflineConfigError(f"{path}: not a readable {what} ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OfflineConfigError(f"{path}: not a {what} of format {FORMAT}")
    return data


def open_dump(folder: str | os.PathLike) -> dict[str, Any]:
    """The index of a complete dump; one line when the folder is not one (or not finished)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OfflineConfigError(f"data.offline_dir {folder}: no such folder")
    if (folder / INDEX).is_file():
        return read_json(folder / INDEX, "dump index")
    if (folder / PLAN).is_file():
        plan = read_json(folder / PLAN, "dump plan")
        n = len(shard_starts(plan["num_samples"], plan["samples_per_shard"]))
        done = sum(
            (folder / shard_name(s)).is_file()
            for s in shard_starts(plan["num_samples"], plan["samples_per_shard"])
        )
        raise OfflineConfigError(
            f"data.offline_dir {folder}: unfinished dump ({done} of {n} shards, no {INDEX}); run the dump again to finish it"
        )
    raise OfflineConfigError(
        f"data.offline_dir {folder}: not a supervision dump (no {INDEX}; make one with python -m modelopt_ext.dump)"
    )


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


class ShardReader:
    """Per-sample reads from the shards of one dump folder, checksummed. One per process (opened lazily)."""

    def __init__(self, folder: str | os.PathLike, plan: dict[str, Any]):
        self.folder = Path(folder)
        self.per_shard = int(plan["samples_per_shard"])
        self.num_samples = int(plan["num_samples"])
        self.target_form = plan["target_form"]
        self._open: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_pid": None}

    def has(self, i: int) -> bool:
        return (self.folder / shard_name(i - i % self.per_shard)).is_file()

    def _shard(self, start: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        if start not in self._open:
            path = self.folder / shard_name(start)
            try:
                f = safe_open(str(path), framework="pt")
                meta = f.metadata() or {}
                offsets, crc = f.get_tensor("offsets"), f.get_tensor("crc32")
            except FileNotFoundError:
                raise OfflineError(f"{path}: shard missing from the dump") from None
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # torn or foreign files
                raise OfflineError(f"{path}: corrupt or truncated shard ({type(e).__name__}: {e})") from None
            count = min(self.per_shard, self.num_samples - start)
            if meta.get("format") != FORMAT or meta.get("start") != str(start) or len(offsets) != count + 1:
                raise OfflineError(
                    f"{path}: shard header does not match the dump (expected samples {start}..{start + count - 1})"
                )
            self._open[start] = (f, offsets, crc)
        return self._open[start]

    def read(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i: input_ids int64, loss_mask bool, aux_hidden_states and the target form (storage dtype)."""
        start = i - i % self.per_shard
        f, offsets, crc = self._shard(start)
        j = i - start
        a, b = int(offsets[j]), int(offsets[j + 1])
        path = self.folder / shard_name(start)
        try:
            fields = {
                k: f.get_slice(k)[a:b]
                for k in ("input_ids", "loss_mask", "aux_hidden_states", self.target_form)
            }
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise OfflineError(f"{path}: corrupt or truncated shard ({type(e).__name__}: {e})") from None
        if _sample_crc(fields) != int(crc[j]):
            raise OfflineError(
                f"{path}: checksum mismatch for sample {i} (the shard is corrupt; dump it again)"
            )
        fields["loss_mask"] = fields["loss_mask"].bool()
        return fields


class OfflineDataset(torch.utils.data.Dataset):
    """Map-style: item i = sample i of a dump, checked against the conversation it was made from."""

    def __init__(self, base: Any, folder: str | os.PathLike, plan: dict[str, Any]):
        self.base = base
        self.reader = ShardReader(folder, plan)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.reader.read(i)
        _check_same_tokens(item, self.base[i], self.reader.folder, i)
        return item


def _check_same_tokens(item: dict, base_item: dict, folder: Path, i: int) -> None:
    if not torch.equal(item["input_ids"], torch.as_tensor(base_item["input_ids"], dtype=torch.int64)):
        raise OfflineError(f"{folder}: sample {i} holds other tokens than the conversation it stands for")


class HybridDataset(torch.utils.data.Dataset):
    """Item i from the dump when its one-sample shard exists, else from `fetcher` (then written to the dump)."""

    def __init__(self, base: Any, folder: str | os.PathLike, plan: dict[str, Any], fetcher: Any):
        self.base = base
        self.folder = Path(folder)
        self.plan = plan
        self.reader = ShardReader(folder, plan)
        self.fetcher = (
            fetcher  # a VllmStreamingDataset over `base`; only contacted for samples not yet dumped
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.reader.has(i):
            item = self.reader.read(i)
            _check_same_tokens(item, self.base[i], self.folder, i)
            return item
        item = self.fetcher[i]
        write_shard(self.folder, i, [item], self.plan["storage_dtype"])
        # The trainer gets what later epochs will read back: the stored dtype, not the server's.
        stored = _as_stored(item, STORAGE_DTYPES[self.plan["storage_dtype"]])
        stored["loss_mask"] = stored["loss_mask"].bool()
        return stored


def collate_items(items: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad dumped items into a batch dict: input_ids, attention_mask, loss_mask, aux and the target form."""
    b, t = len(items), max(len(it["input_ids"]) for it in items)
    out = {
        "input_ids": torch.full((b, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.bool),
        "loss_mask": torch.zeros((b, t), dtype=torch.bool),
    }
    per_token = [k for k in ("aux_hidden_states", *TARGET_FIELDS) if k in items[0]]
    for k in per_token:
        out[k] = torch.zeros((b, t, items[0][k].shape[-1]), dtype=items[0][k].dtype)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        out["input_ids"][r, :n] = it["input_ids"]
        out["attention_mask"][r, :n] = True
        out["loss_mask"][r, :n] = it["loss_mask"]
        for k in per_token:
            out[k][r, :n] = it[k]
    return out


class DumpedSource:
    """The trainer's `source` for dumped batches: re-labels the collated tensors as a `Supervision`."""

    # Relabelling only (~0 s); reading the dump is the loader's data wait. The dump has no servers to count.
    telemetry_kind = IN_PROCESS

    def __call__(self, batch: dict[str, torch.Tensor]) -> Supervision:
        return Supervision(
            **{
                k: batch.get(k)
                for k in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", *TARGET_FIELDS)
            }
        )


# ----------------------------------------------------------------------------------------------------
# Sources for the trainer (supply/sources.py registers them)
# ----------------------------------------------------------------------------------------------------


def _recipe_aux(recipe: Any) -> list[int]:
    from modelopt_ext.drafters.layers import recipe_layer_ids

    return recipe_layer_ids(recipe, target_identity(recipe.model.path)["num_layers"])


def _head_and_setup(recipe: Any, env: Any, dataset: Any, pad_id: int, aux: list[int], form: str) -> Any:
    from functools import partial

    from modelopt_ext.supply.setup import SourceSetup
    from modelopt_ext.targets.head import TargetHead

    head = TargetHead.from_pretrained(
        recipe.model.path,
        dtype=getattr(torch, recipe.model.dtype),
        device=env.device,
    )
    return SourceSetup(
        dataset=dataset,
        collate=partial(collate_items, pad_id=pad_id),
        source=DumpedSource(),
        head=head if form == "target_last_hidden" else None,
        aux_layer_ids=aux,
        target_embeddings=head.embed_tokens,
    )


def check_dump_fits(index: dict[str, Any], recipe: Any, dataset: Any, vocab: Any, folder: Any) -> None:
    """Refuse (one line) a dump made for another target, layer set, dtype, draft vocabulary or data."""
    want = make_plan(
        model_path=recipe.model.path,
        aux_layer_ids=_recipe_aux(recipe),
        target_dtype=recipe.model.dtype,
        storage_dtype=index["storage_dtype"],
        target_form=index["target_form"],
        dataset=dataset,
        samples_per_shard=1,
        vocab=vocab,
    )
    problem = plan_mismatch(index, want)
    if problem:
        raise OfflineConfigError(f"data.offline_dir {folder}: made for a different run ({problem})")


def build_offline_source(recipe: Any, env: Any, dataset: Any, pad_id: int, vocab: Any = None) -> Any:
    """`data.mode: offline`: train from a finished dump in `data.offline_dir` (no target, no servers)."""
    folder = recipe.data.offline_dir
    index = open_dump(folder)
    if index.get("storage_dtype") not in STORAGE_DTYPES or index.get("target_form") not in TARGET_FIELDS:
        raise OfflineConfigError(f"{Path(folder) / INDEX}: unknown storage dtype or target form")
    check_dump_fits(index, recipe, dataset, vocab, folder)
    return _head_and_setup(
        recipe,
        env,
        OfflineDataset(dataset, folder, index),
        pad_id,
        index["aux_layer_ids"],
        index["target_form"],
    )


def build_hybrid_source(recipe: Any, env: Any, dataset: Any, pad_id: int, vocab: Any = None) -> Any:
    """`data.mode: hybrid`: stream from `data.server_urls` what `data.offline_dir` lacks, and keep it there."""
    from modelopt_ext.supply.vllm.source import StreamingConfigError, VllmStreamingDataset

    folder = Path(recipe.data.offline_dir)
    aux = _recipe_aux(recipe)
    plan = make_plan(
        model_path=recipe.model.path,
        aux_layer_ids=aux,
        target_dtype=recipe.model.dtype,
        storage_dtype=recipe.data.offline_dtype,
        target_form="target_last_hidden",
        dataset=dataset,
        samples_per_shard=1,
    )
    if (folder / PLAN).is_file():
        have = read_json(folder / PLAN, "dump plan")
        problem = plan_mismatch(have, plan) or (
            None
            if have.get("samples_per_shard") == 1 and have.get("storage_dtype") == plan["storage_dtype"]
            else f"layout: dump has {have.get('samples_per_shard')} samples per shard in {have.get('storage_dtype')}, "
            f"hybrid writes 1 in {plan['storage_dtype']}"
        )
        if problem:
            raise OfflineConfigError(f"data.offline_dir {folder}: made for a different run ({problem})")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / PLAN, plan)  # every rank writes the same bytes
    if write_index(folder, plan) is not None and env.is_main:
        print(f"data: hybrid dump {folder} is complete: no sample needs the servers", flush=True)
    if not recipe.data.shared_storage_root:
        raise StreamingConfigError(
            "data.shared_storage_root is required when data.server_urls is set (hybrid)"
        )
    fetcher = VllmStreamingDataset.from_config(
        dataset,
        recipe.data,
        num_aux_layers=len(aux),
        hidden_size=plan["target"]["hidden_size"],
        local_rank=env.local_rank,
    )
    return _head_and_setup(
        recipe, env, HybridDataset(dataset, folder, plan, fetcher), pad_id, aux, "target_last_hidden"
    )
