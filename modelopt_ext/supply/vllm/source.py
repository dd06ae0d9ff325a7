"""Streaming supervision from vLLM hidden-state servers: a map-style dataset over tokenized conversations.

Each item is fetched from a vLLM server started with `extract_hidden_states` + a hidden-state connector
(see docs/streaming.md and docs/vllm.md):

    POST <server>/v1/completions {"model", "prompt": [token ids], "max_tokens": 1, "temperature": 0}
    -> {"kv_transfer_params": {"hidden_states_path": "<shared root>/<req>.safetensors"}, ...}
    file: token_ids int64 [T] (must equal the prompt), hidden_states [T, n_captured, H]

The captured layers are the drafter's aux layers (vLLM numbering) followed by layer L (the last decoder layer's
output BEFORE the final norm). They become `aux_hidden_states` [T, n_aux*H] and `target_last_hidden` [T, H];
the trainer turns the latter into logits with `TargetHead`. For the trainer: `collate_streamed` pads items
into a batch dict and `StreamedSource` turns that into a `Supervision`; `build_streaming_source` assembles
both (plus the TargetHead) for `data.mode: streaming`. `collate_supervision` pads straight to a `Supervision`.

Map-style on purpose: with a DistributedSampler every rank reads only its shard, DataLoader workers give fetch
concurrency, and resuming is the sampler's position (an item depends only on its index). Per process (the
main process or a DataLoader worker) there is one HTTP client, created lazily after fork, and one
`ServerPool`: each request goes to the healthy server with the fewest requests in flight from this rank's
workers (ties round-robin from where `server_pool.first_server` starts this process; `StreamingOptions.balance`).

Faults: transient errors (connection refused/reset, timeouts, 5xx, 429, a file not yet complete) are retried
with exponential backoff, on another healthy server when there is one; a server failing repeatedly leaves the
rotation (circuit breaker; one timeout is enough) and is probed again later. A server that answers with a path outside the shared
storage root or token ids different from the prompt is treated as faulty (logged loudly, sample retried
elsewhere). A sample is never skipped: either it is delivered, or the job stops with one clear line
(`StreamingError`): no healthy server for `all_down_timeout_s`, or every server rejected the same sample.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from torch.utils.data import Dataset

from modelopt_ext.supply.server_pool import (
    LEAST_OUTSTANDING,
    BreakerPolicy,
    NoHealthyServerError,
    ServerPool,
    SharedServerStats,
    first_server,
    local_rank_from_env,
)
from modelopt_ext.supply.target_server.auth import TokenFileError, read_token_file
from modelopt_ext.supply.vllm import files as hs_file
from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.telemetry.latency import LatencyHistogram
from modelopt_ext.telemetry.meter import PREFETCHED
from modelopt_ext.util.errors import ConfigError

log = logging.getLogger(__name__)


class StreamingError(RuntimeError):
    """The streaming source cannot deliver a sample; the message is one line saying why.

    It stays one line when a DataLoader re-raises it from a worker (the DataLoader builds the exception again
    from "Caught StreamingError in DataLoader worker process N.\nOriginal Traceback ...": keep the last line).
    """

    def __init__(self, message: str):
        if "\n" in message and "StreamingError: " in message:
            where = message.splitlines()[0].partition(" in ")[2].rstrip(".")
            message = message.rstrip().rsplit("StreamingError: ", 1)[1].strip()
            message = f"{message} ({where})" if where else message
        super().__init__(message)


class StreamingConfigError(ConfigError, ValueError):
    """Bad streaming settings (one line naming the field); the CLIs exit 2 on ConfigError."""

    def __init__(self, problem: str):
        super().__init__([problem])


class _Transient(Exception):
    """A failure worth retrying (maybe elsewhere); counts against the server's health.

    `trip`: take the server out of rotation at once (a timeout: it already cost a whole timeout).
    """

    def __init__(self, message: str, trip: bool = False):
        super().__init__(message)
        self.trip = trip


class _ServerFault(Exception):
    """The server answered something wrong (bad path, wrong tokens, bad payload); counts against its health."""


class _SampleRejected(Exception):
    """The server refused this sample (HTTP 400/413/422): not the server's fault; try others, then stop."""


@dataclass
class StreamingOptions:
    """Tuning knobs of the streaming source (defaults suit a cluster; tests shrink the waits)."""

    request_timeout_s: float = 300.0  # long prompts on a busy server take a while
    connect_timeout_s: float = 10.0
    lock_timeout_s: float = 120.0  # wait for vLLM's writer to release the file lock
    max_attempts_per_sample: int = 12  # transient failures of one sample before giving up (all servers)
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    balance: str = LEAST_OUTSTANDING  # server choice: least_outstanding | round_robin (server_pool.py)


def _first_server(num_servers: int, local_rank: int) -> int:
    """Where this process (a DataLoader worker of `local_rank`, or the rank itself) starts: `first_server`."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return first_server(num_servers, local_rank)
    return first_server(num_servers, local_rank, info.id, max(info.num_workers, 1))


def _worker_slot() -> int:
    """This process's slot in the shared in-flight counts: its DataLoader worker id (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


class VllmStreamingDataset(Dataset):
    """Map-style dataset: item i = the conversation `base[i]` plus its target supervision from a vLLM server.

    `base` items are dicts with `input_ids` (int64 [T]) and `loss_mask` (bool [T]), e.g. `ConversationDataset`.
    Returned items add `aux_hidden_states` [T, n_aux*H] and `target_last_hidden` [T, H] (the server's dtype).
    `num_aux_layers` / `hidden_size` (when given) are checked against every file.
    """

    def __init__(
        self,
        base: Dataset,
        *,
        server_urls: Sequence[str],
        shared_storage_root: str | os.PathLike,
        model: str | None = None,
        num_aux_layers: int | None = None,
        hidden_size: int | None = None,
        auth_token_file: str | os.PathLike | None = None,
        num_workers: int = 0,
        local_rank: int | None = None,
        options: StreamingOptions | None = None,
    ):
        urls = [u.rstrip("/") for u in server_urls]
        if not urls:
            raise StreamingConfigError(
                "data.server_urls is empty: streaming needs at least one hidden-state server URL"
            )
        if len(set(urls)) != len(urls):
            raise StreamingConfigError(f"data.server_urls lists a server twice: {urls}")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise StreamingConfigError(f"data.server_urls entry {u!r} is not an http(s) URL")
        self.base = base
        self.urls = urls
        try:
            self.root = str(hs_file.shared_root(shared_storage_root))
        except ValueError as e:
            raise StreamingConfigError(str(e)) from None
        self.model = model
        self.num_aux_layers = num_aux_layers
        self.hidden_size = hidden_size
        self.num_workers = num_workers
        self.local_rank = local_rank_from_env() if local_rank is None else local_rank
        self.options = options or StreamingOptions()
        self._token = None
        if auth_token_file:
            try:
                self._token = read_token_file(auth_token_file, what="data.auth_token_file")
            except TokenFileError as e:
                raise StreamingConfigError(str(e)) from None
        # Created here, in the parent, so DataLoader workers add to the same counters (telemetry).
        self.stats = SharedServerStats(urls, slots=max(num_workers, 1))
        self.latency = LatencyHistogram(urls, shared=True)  # per-request latency of successes, for p50/p95
        self._pid: int | None = None  # per-process state below is (re)built lazily after fork
        self._client: httpx.Client | None = None
        self._pool: ServerPool | None = None
        self._models: dict[str, str] = {}

    @classmethod
    def from_config(cls, base: Dataset, data_cfg: Any, **kw: Any) -> VllmStreamingDataset:
        """Build from a `DataConfig` (server_urls, shared_storage_root, auth_token_file, num_workers)."""
        if not data_cfg.shared_storage_root:
            raise StreamingConfigError(
                "data.shared_storage_root is required when data.server_urls is set (streaming)"
            )
        return cls(
            base,
            server_urls=data_cfg.server_urls,
            shared_storage_root=data_cfg.shared_storage_root,
            auth_token_file=data_cfg.auth_token_file,
            num_workers=data_cfg.num_workers,
            **{"options": StreamingOptions(breaker=BreakerPolicy(all_down_timeout_s=data_cfg.server_grace_s)), **kw},
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getstate__(self) -> dict:
        # Workers started with spawn get the config and the shared counters, never a live client.
        state = dict(self.__dict__)
        state.update(_pid=None, _client=None, _pool=None, _models={})
        return state

    # -- per-process state ------------------------------------------------------------------------------
    def _ensure_process_state(self) -> None:
        if self._pid == os.getpid():
            return
        # After fork the parent's client (sockets, locks) must not be reused: build a fresh one.
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        timeout = httpx.Timeout(self.options.request_timeout_s, connect=self.options.connect_timeout_s)
        self._client = httpx.Client(timeout=timeout, headers=headers, trust_env=False)
        slot = _worker_slot()
        self.stats.reset_slot(slot)  # a previous worker in this slot may have been stopped mid-request
        self._pool = ServerPool(
            self.urls,
            start_offset=_first_server(len(self.urls), self.local_rank),
            policy=self.options.breaker,
            stats=self.stats,
            balance=self.options.balance,
            slot=slot,
        )
        self._models = {}
        self._pid = os.getpid()

    @property
    def pool(self) -> ServerPool:
        """This process's server pool (health, round-robin cursor)."""
        self._ensure_process_state()
        assert self._pool is not None
        return self._pool

    def server_stats(self) -> dict[str, dict[str, float]]:
        """Per-server counters summed over this rank's processes: requests, errors, latency_s, bytes, ...."""
        return self.stats.snapshot()

    # -- fetching ----------------------------------------------------------------------------------------
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.base[idx]
        input_ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        loss_mask = torch.as_tensor(item["loss_mask"]).bool()
        aux, last = self.fetch(input_ids.tolist(), sample=idx)
        return {
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "aux_hidden_states": aux,
            "target_last_hidden": last,
        }

    def fetch(self, token_ids: list[int], sample: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Supervision for one prompt: (aux [T, n_aux*H], last [T, H]), with retries and failover."""
        self._ensure_process_state()
        pool, opt = self._pool, self.options
        assert pool is not None
        failed_on: list[str] = []  # servers this sample failed on, in order (failover prefers others)
        rejected_by: dict[str, str] = {}
        attempt = 0
        while True:
            url = pool.acquire(avoid=set(failed_on) | set(rejected_by))
            if url is None:
                try:
                    pool.check_all_down_timeout()
                except NoHealthyServerError as e:
                    raise StreamingError(f"sample {sample}: {e}") from None
                time.sleep(min(max(pool.seconds_until_available(), 0.01), 1.0))
                continue
            if url in rejected_by:
                # Only servers that refused this sample are in rotation now: nobody can deliver it.
                pool.release(url)
                raise StreamingError(
                    f"sample {sample} rejected by {sorted(rejected_by)} and no other server is in rotation: "
                    f"{rejected_by[url]}"
                )
            t0 = time.monotonic()
            try:
                aux, last, nbytes = self._fetch_once(url, token_ids)
            except _SampleRejected as e:
                pool.release(url)
                log.error("server %s rejected sample %s: %s", url, sample, e)
                rejected_by[url] = str(e)
                if len(rejected_by) == len(self.urls):
                    raise StreamingError(f"sample {sample} rejected by every server: {rejected_by}") from None
                continue
            except (_Transient, _ServerFault) as e:
                dt = time.monotonic() - t0
                level = logging.ERROR if isinstance(e, _ServerFault) else logging.WARNING
                log.log(level, "sample %s: request to %s failed: %s", sample, url, e)
                pool.record_failure(url, str(e), dt, trip=getattr(e, "trip", False))
                failed_on.append(url)
                # While no server is healthy, probes of dead servers are the all-down timer's business, not
                # this sample's: the job then fails with "no healthy server", the true cause.
                if pool.healthy():
                    attempt += 1
                if attempt >= opt.max_attempts_per_sample:
                    raise StreamingError(
                        f"sample {sample} failed {attempt} times (servers tried: {sorted(set(failed_on))}); "
                        f"last error from {url}: {e}"
                    ) from None
                # Back off only before retrying a server this sample already failed on (e.g. the only one);
                # a fresh healthy server can be tried at once.
                if not [u for u in pool.healthy() if u not in failed_on]:
                    delay = min(opt.backoff_max_s, opt.backoff_base_s * 2 ** max(attempt - 1, 0))
                    time.sleep(delay * (0.5 + random.random() / 2))
                continue
            except BaseException:
                pool.release(url)  # anything else (an interrupt, a bug): never leave it counted in flight
                raise
            dt = time.monotonic() - t0
            pool.record_success(url, dt, nbytes)
            self.latency.observe(url, dt)
            return aux, last

    def _model_for(self, url: str) -> str:
        if self.model:
            return self.model
        if url not in self._models:
            try:
                r = self._client.get(f"{url}/v1/models")
            except httpx.HTTPError as e:
                raise _Transient(f"GET /v1/models: {type(e).__name__}: {e}") from None
            self._raise_for_status(r)
            try:
                self._models[url] = r.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise _ServerFault(f"GET /v1/models answered without a model id: {r.text[:200]!r}") from None
        return self._models[url]

    @staticmethod
    def _raise_for_status(r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        body = r.text[:300].replace("\n", " ")
        msg = f"HTTP {r.status_code}: {body}"
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise _Transient(msg)
        if r.status_code in (400, 413, 422):
            raise _SampleRejected(msg)
        raise _ServerFault(msg)  # 401/403 (token), 404 (model/route): this server is misconfigured

    def _fetch_once(self, url: str, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        assert self._client is not None
        body = {"model": self._model_for(url), "prompt": token_ids, "max_tokens": 1, "temperature": 0}
        try:
            r = self._client.post(f"{url}/v1/completions", json=body)
        except httpx.TimeoutException as e:
            raise _Transient(
                f"{type(e).__name__} after {self.options.request_timeout_s:.0f}s: {e}", trip=True
            ) from None
        except httpx.HTTPError as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        self._raise_for_status(r)
        try:
            path = r.json()["kv_transfer_params"]["hidden_states_path"]
        except (ValueError, KeyError, TypeError):
            raise _ServerFault(
                f"response has no kv_transfer_params.hidden_states_path: {r.text[:200]!r}"
            ) from None
        try:
            tensors, nbytes = hs_file.read_hidden_states(
                path, self.root, lock_timeout_s=self.options.lock_timeout_s
            )
        except hs_file.PathRejected as e:
            raise _ServerFault(str(e)) from None
        except hs_file.FileIncomplete as e:
            raise _Transient(str(e)) from None
        aux, last = split_captured(tensors, token_ids, self.num_aux_layers, self.hidden_size, path)
        return aux, last, nbytes


def split_captured(
    tensors: dict[str, torch.Tensor],
    token_ids: Sequence[int],
    num_aux_layers: int | None,
    hidden_size: int | None,
    path: str = "<file>",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One file's tensors, checked against the prompt (`files.check_hidden_states`), split into
    (aux [T, n_aux*H], last [T, H]); a malformed file is the server's fault."""
    try:
        f = hs_file.check_hidden_states(
            tensors, path, expected_token_ids=token_ids, hidden_size=hidden_size,
            expected_num_layers=None if num_aux_layers is None else num_aux_layers + 1,
        )  # fmt: skip
    except hs_file.MalformedFile as e:
        raise _ServerFault(str(e)) from None
    return hs_file.split_aux_last(f.hidden_states)


def collate_streamed(items: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad streamed items into a batch dict (the trainer's collate; runs in DataLoader workers).

    Keys: input_ids int64 [B,T], attention_mask / loss_mask bool [B,T], aux_hidden_states [B,T,n_aux*H],
    target_last_hidden [B,T,H] (zeros on padding). `StreamedSource` turns it into a `Supervision`.
    """
    if not items:
        raise ValueError("collate_streamed needs at least one item")
    b, t = len(items), max(len(it["input_ids"]) for it in items)
    aux0, last0 = items[0]["aux_hidden_states"], items[0]["target_last_hidden"]
    out = {
        "input_ids": torch.full((b, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.bool),
        "loss_mask": torch.zeros((b, t), dtype=torch.bool),
        "aux_hidden_states": torch.zeros((b, t, aux0.shape[-1]), dtype=aux0.dtype),
        "target_last_hidden": torch.zeros((b, t, last0.shape[-1]), dtype=last0.dtype),
    }
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        out["input_ids"][i, :n] = it["input_ids"]
        out["attention_mask"][i, :n] = True
        out["loss_mask"][i, :n] = it["loss_mask"]
        out["aux_hidden_states"][i, :n] = it["aux_hidden_states"]
        out["target_last_hidden"][i, :n] = it["target_last_hidden"]
    return out


class StreamedSource:
    """The trainer's `source` for streamed batches: batch dict (already on device) -> `Supervision`.

    The supervision was fetched by the dataset in DataLoader workers, so this only re-labels tensors; the
    trainer's `TargetHead` later turns `target_last_hidden` (pre-final-norm) into target logits.
    """

    telemetry_kind = PREFETCHED  # the dataset's workers fetched; its server_stats() counts the servers

    def __call__(self, batch: dict[str, torch.Tensor]) -> Supervision:
        return Supervision(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            loss_mask=batch["loss_mask"],
            aux_hidden_states=batch["aux_hidden_states"],
            target_last_hidden=batch["target_last_hidden"],
        )


def collate_supervision(items: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> Supervision:
    """Right-pad streamed items into one `Supervision` (target form: `target_last_hidden`)."""
    return StreamedSource()(collate_streamed(items, pad_id))


def build_streaming_source(recipe: Any, env: Any, dataset: Any, pad_id: int, vocab: Any = None) -> Any:
    """The trainer's `SourceSetup` for `data.mode: streaming` (see supply/sources.py `register_source`).

    Wraps the rank's conversations `dataset` in a `VllmStreamingDataset`; reads only the target's final norm,
    lm_head and embeddings (`TargetHead`), never the whole target. The servers must capture the recipe's aux
    layer ids (default rule when unset) followed by layer L.
    """
    from functools import partial

    from modelopt_ext.drafters.layers import recipe_layer_ids
    from modelopt_ext.supply.setup import SourceSetup
    from modelopt_ext.targets.head import TargetHead

    data = recipe.data
    if not data.shared_storage_root:
        raise StreamingConfigError(
            "data.shared_storage_root is required when data.server_urls is set (streaming)"
        )
    head = TargetHead.from_pretrained(
        recipe.model.path, dtype=getattr(torch, recipe.model.dtype), device=env.device
    )
    aux = recipe_layer_ids(recipe)
    ds = VllmStreamingDataset.from_config(
        dataset, data, num_aux_layers=len(aux), hidden_size=int(head.lm_head.shape[1]), local_rank=env.local_rank
    )
    return SourceSetup(
        dataset=ds,
        collate=partial(collate_streamed, pad_id=pad_id),
        source=StreamedSource(),
        head=head,
        aux_layer_ids=aux,
        target_embeddings=head.embed_tokens,
    )
