"""Dump supervision for a conversations file into an offline dump folder (the format: supply/offline.py).

It builds the same parts as training (training/parts.py: dataset, draft vocabulary, source) and writes what the
source yields to disk instead of training on it.

`dump_supervision(recipe, folder, ...)` takes the recipe's source: the target in this process (colocated), vLLM
hidden-state servers (`data.server_urls`, streaming) or serve_target (`data.mode=remote`, draft-vocabulary
probabilities). Shards are spread over processes (process r of W writes shards r, r + W, ...); a restarted dump
skips finished shards; the last process to finish writes index.json. CLI: `python -m modelopt_ext.dump`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from modelopt_ext.supply import offline as od
from modelopt_ext.supply.server_pool import local_rank_from_env


@dataclass
class DumpResult:
    """What a dump call did."""

    folder: Path
    shards_written: int
    shards_skipped: int
    samples_written: int
    bytes_written: int
    index: Path | None  # set when this call found every shard done and wrote the index
    seconds: float


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# A producer turns a list of sample indices into their stored items (input_ids, loss_mask, aux, target form).
Producer = Callable[[Sequence[int]], list[dict[str, torch.Tensor]]]


def colocated_producer(
    recipe: Any, dataset: Any, pad_id: int, device: str, batch_size: int
) -> tuple[Producer, list[int]]:
    """The target in this process: aux layers plus layer L (pre-final-norm) in one forward per batch."""
    from modelopt_ext.data.dataset import collate_padded
    from modelopt_ext.supply.colocated import ColocatedSource, forward_with_aux

    src = ColocatedSource.from_recipe(recipe, device=device)
    aux, n_layers = list(src.aux_layer_ids), src.num_layers
    h = (
        int(src.model.config.get_text_config().hidden_size)
        if hasattr(src.model.config, "get_text_config")
        else int(src.model.config.hidden_size)
    )

    @torch.no_grad()
    def produce(indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        out = []
        for k in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[k : k + batch_size]]
            batch = collate_padded(items, pad_id)
            _, states = forward_with_aux(
                src.model,
                [*aux, n_layers],
                input_ids=batch["input_ids"].to(src.device),
                attention_mask=batch["attention_mask"].long().to(src.device),
                use_cache=False,
            )
            for r, it in enumerate(items):
                n = len(it["input_ids"])
                out.append(
                    {
                        "input_ids": it["input_ids"],
                        "loss_mask": it["loss_mask"],
                        "aux_hidden_states": states[r, :n, : len(aux) * h],
                        "target_last_hidden": states[r, :n, len(aux) * h :],
                    }
                )
        return out

    return produce, aux


def streaming_producer(recipe: Any, dataset: Any, rank: int) -> tuple[Producer, list[int]]:
    """vLLM hidden-state servers, fetched with `data.num_workers` DataLoader workers (retries, failover)."""
    from modelopt_ext.supply.vllm.source import StreamingConfigError, VllmStreamingDataset

    if not recipe.data.shared_storage_root:
        raise StreamingConfigError(
            "data.shared_storage_root is required when data.server_urls is set (streaming)"
        )
    aux = od._recipe_aux(recipe)
    ds = VllmStreamingDataset.from_config(
        dataset,
        recipe.data,
        num_aux_layers=len(aux),
        hidden_size=od.target_identity(recipe.model.path)["hidden_size"],
        local_rank=local_rank_from_env(),
    )

    def produce(indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        if recipe.data.num_workers == 0:
            return [ds[i] for i in indices]
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=list(indices), num_workers=min(recipe.data.num_workers, len(indices))
        )
        return list(loader)

    return produce, aux


def remote_producer(
    recipe: Any, dataset: Any, pad_id: int, vocab: Any, rank: int, batch_size: int
) -> tuple[Producer, list[int]]:
    """serve_target: draft-vocabulary probabilities (what the loss needs; the dump records the vocabulary)."""
    from modelopt_ext.data.dataset import collate_padded
    from modelopt_ext.supply.target_server.source import build_remote_source

    env = SimpleNamespace(rank=rank, local_rank=local_rank_from_env(), device=torch.device("cpu"))
    setup = build_remote_source(recipe, env, dataset, pad_id, vocab)

    def produce(indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        out = []
        for k in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[k : k + batch_size]]
            sup = setup.source(collate_padded(items, pad_id))
            for r, it in enumerate(items):
                n = len(it["input_ids"])
                out.append(
                    {
                        "input_ids": it["input_ids"],
                        "loss_mask": it["loss_mask"],
                        "aux_hidden_states": sup.aux_hidden_states[r, :n],
                        "target_probs": sup.target_probs[r, :n],
                    }
                )
        return out

    return produce, setup.aux_layer_ids


def prepare_plan(folder: Path, plan: dict[str, Any]) -> None:
    """Write plan.json, or check that the folder's plan is this dump's (resume); one line on a mismatch."""
    if (folder / od.PLAN).is_file() or (folder / od.INDEX).is_file():
        have = od.read_json(folder / (od.PLAN if (folder / od.PLAN).is_file() else od.INDEX), "dump plan")
        problem = od.plan_mismatch(have, plan)
        for key in ("storage_dtype", "samples_per_shard"):
            if not problem and have.get(key) != plan.get(key):
                problem = f"{key}: folder has {have.get(key)!r}, this dump asks for {plan.get(key)!r}"
        if problem:
            raise od.OfflineConfigError(
                f"{folder}: holds a dump made for something else ({problem}); use another --out"
            )
        return
    if folder.exists() and any(p for p in folder.iterdir() if not p.name.startswith(".")):
        raise od.OfflineConfigError(
            f"{folder}: not empty and not a dump; choose an empty or new --out folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    od.write_json_atomic(folder / od.PLAN, plan)


def check_space(folder: Path, needed: int, log: Callable[[str], None]) -> None:
    """Refuse (one line naming the folder and sizes) a dump that would not fit on the disk."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise od.OfflineConfigError(
            f"{folder}: the dump needs {_fmt_bytes(needed)} more but only {_fmt_bytes(free)} is free there"
        )
    log(f"dump: {_fmt_bytes(needed)} to write, {_fmt_bytes(free)} free in {folder}")


def _batches(todo: list[int], per: int, n: int) -> Iterator[tuple[int, list[int]]]:
    for s in todo:
        yield s, list(range(s, min(s + per, n)))


def dump_supervision(
    recipe: Any,
    out: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    samples_per_shard: int = 64,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    device: str | None = None,
    log: Callable[[str], None] = lambda m: print(m, flush=True),
    producer: Producer | None = None,
) -> DumpResult:
    """Dump the supervision of `recipe.data.path` into `out` (this process's share of the shards).

    `batch_size`: samples per target forward (colocated / remote); 1 keeps every sample's numbers identical to
    a colocated training run at batch 1. `producer` replaces the recipe's source (tests).
    """
    from transformers import AutoTokenizer

    from modelopt_ext.training.distributed import DistEnv
    from modelopt_ext.training.parts import build_vocab, load_dataset

    t0 = time.monotonic()
    if not 0 <= rank < world_size:
        raise od.OfflineConfigError(f"--rank {rank} is outside 0..{world_size - 1}")
    folder = Path(out)
    device = device or (
        f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    )
    tok = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    env = DistEnv(rank=0, world_size=1)  # tokenising and the vocab need no process group: all ranks agree
    dataset = load_dataset(recipe, env if rank == 0 else DistEnv(rank=rank, world_size=world_size), tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    mode = recipe.data.mode
    if mode not in ("colocated", "streaming", "remote"):
        raise od.OfflineConfigError(
            f"data.mode: a dump computes supervision from colocated, streaming or remote, not {mode!r} "
            "(drop data.offline_dir: the folder is --out)"
        )
    vocab = None
    if mode == "remote":
        vocab = build_vocab(
            recipe, env, dataset, tok, od.target_identity(recipe.model.path)["vocab_size"], None
        )
    form = "target_probs" if mode == "remote" else "target_last_hidden"
    plan = od.make_plan(
        model_path=recipe.model.path,
        aux_layer_ids=od._recipe_aux(recipe),
        target_dtype=recipe.model.dtype,
        storage_dtype=dtype,
        target_form=form,
        dataset=dataset,
        samples_per_shard=samples_per_shard,
        vocab=vocab,
    )
    prepare_plan(folder, plan)
    n = plan["num_samples"]
    starts = od.shard_starts(n, samples_per_shard)
    mine = starts[rank::world_size]
    od.remove_stale_temps(folder, mine)
    todo = [s for s in mine if not (folder / od.shard_name(s)).is_file()]
    skipped = len(mine) - len(todo)
    per_token = od.token_bytes(plan, vocab.draft_vocab_size if vocab is not None else None)
    lengths = [
        dataset.length(i) if hasattr(dataset, "length") else len(dataset[i]["input_ids"]) for i in range(n)
    ]
    mean_len = sum(lengths) / max(n, 1)
    log(
        f"dump: {n} samples ({mean_len:.0f} tokens mean) of {recipe.data.path} -> {folder}; {mode} source, "
        f"{form.removeprefix('target_')} form, {dtype}, aux layers {plan['aux_layer_ids']}; "
        f"{per_token} bytes/token, {_fmt_bytes(per_token * mean_len)}/sample"
    )
    log(
        f"dump: rank {rank}/{world_size}: {len(mine)} of {len(starts)} shards "
        f"({samples_per_shard} samples each), {skipped} already done"
    )
    unfinished = [s for s in starts if not (folder / od.shard_name(s)).is_file()]
    needed = sum(per_token * sum(lengths[s : min(s + samples_per_shard, n)]) + 1024 for s in unfinished)
    check_space(folder, needed, log)
    if todo and producer is None:
        if mode == "colocated":
            producer, _ = colocated_producer(recipe, dataset, pad_id, device, batch_size)
        elif mode == "streaming":
            producer, _ = streaming_producer(recipe, dataset, rank)
        else:
            producer, _ = remote_producer(recipe, dataset, pad_id, vocab, rank, batch_size)
    written = samples = nbytes = 0
    todo_samples = sum(min(s + samples_per_shard, n) - s for s in todo)
    t_work, last_log = time.monotonic(), 0.0
    for s, idx in _batches(todo, samples_per_shard, n):
        items = producer(idx)
        nbytes += od.write_shard(folder, s, items, dtype)
        written += 1
        samples += len(idx)
        now = time.monotonic()
        if now - last_log >= 5.0 or written == len(todo):
            rate = samples / max(now - t_work, 1e-9)
            eta = (todo_samples - samples) / rate if rate > 0 else 0.0
            log(
                f"dump: rank {rank}: {written}/{len(todo)} shards, {samples}/{todo_samples} samples, "
                f"{rate:.1f} samples/s, {_fmt_bytes(nbytes / max(now - t_work, 1e-9))}/s, ETA {_fmt_s(eta)}"
            )
            last_log = now
    index = od.write_index(folder, plan)
    dt = time.monotonic() - t0
    if index is not None:
        idx = od.read_json(index, "dump index")
        log(
            f"dump: complete: {n} samples, {_fmt_bytes(idx['bytes'])} "
            f"({_fmt_bytes(idx['bytes_per_sample'])}/sample) in {folder}; this process wrote {written} shards "
            f"in {_fmt_s(dt)}; train with data.offline_dir={folder}"
        )
    else:
        left = sum(not (folder / od.shard_name(s)).is_file() for s in starts)
        log(f"dump: rank {rank} done ({written} shards written); {left} shards of other ranks still missing")
    return DumpResult(folder, written, skipped, samples, nbytes, index, dt)
