"""A CPU-safe variant of vLLM's `ExampleHiddenStatesConnector` (vLLM 0.32), for vLLM's CPU build.

Runs INSIDE vLLM's own environment only: it imports vLLM, so the project venv must never import it (nothing
in `modelopt_ext` does). The server loads it with
`"kv_connector": "CpuHiddenStatesConnector", "kv_connector_module_path": "modelopt_ext.supply.vllm.connector"`
and the repo root on PYTHONPATH.

Why: the stock connector's async-write step copies the captured states device->host through a CUDA stream
into pinned memory and tracks completion with a CUDA event. On the CPU build that raises
`RuntimeError: pin_memory=True requires a CUDA or other accelerator backend` on the first finished request
and kills the engine (and the CPU worker's stand-in for CUDA events has no `.query()`). The request that
triggered it still gets a 200 with a path, but no file is ever written.

The fix overrides only `_submit_async_write`: when the KV cache lives on the CPU, the states are copied out of
the cache synchronously (a plain CPU copy, no pinned memory), and the completion "event" is one whose
`query()` is already True. Everything else is the stock behaviour: the lock file pre-created with LOCK_EX in
`wait_for_save`, the thread-pool disk write that releases that lock when the file is complete, the file
layout (`hidden_states` [seq, n_layers, hidden], `token_ids` int64 [seq]). With the cache on a GPU the stock
path runs unchanged, so the same class is safe on both.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _DoneEvent:
    """Stands in for a CUDA event of a copy that has already completed (the CPU copy is synchronous)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    """`ExampleHiddenStatesConnector` whose write step also works when the KV cache is on the CPU."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        if self._kv_cache.device.type == "cuda":
            super()._submit_async_write(pending)
            return

        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slot_mapping = (offsets.reshape(1, -1) + block_ids.reshape(-1, 1) * self._block_size).flatten()
        num_tokens = pending.token_ids.shape[0]
        # Fancy indexing already copies; clone() makes the slice its own contiguous buffer, so the blocks
        # can be freed (the scheduler does so once get_finished reports the request) while the write runs.
        hidden_states = extract_from_kv_cache(self._kv_cache, slot_mapping, num_tokens).clone()
        tensors = {"hidden_states": hidden_states, "token_ids": pending.token_ids.clone()}

        assert self._req_futures.get(pending.req_id) is None, (
            "Found another KV transfer request with same req_id!"
        )
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)

        # Same lock protocol as the stock connector: the fd pre-created in wait_for_save holds LOCK_EX, and
        # the writer thread closes it (releasing readers blocked on LOCK_SH) once the file is complete.
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)

        done = _DoneEvent()
        future = self._executor.submit(self._write_tensors, tensors, done, pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = done
        self._req_futures[pending.req_id] = future
        future.add_done_callback(partial(self._on_write_done, pending.req_id))
