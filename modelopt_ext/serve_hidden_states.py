"""Serve a target's hidden states for streaming drafter training (thin CLI over `serving.hidden_states_server`).

    python -m modelopt_ext.serve_hidden_states --engine vllm --model M --shared-storage DIR \
        [--capture-ids 2,16,29,32] [--aux-layer-ids 2,16,29] [--host H --port P] [--tp N] \
        [--max-model-len N] [--dtype D] [-- extra vLLM args]

Prints the server URL once `GET /v1/models` answers, then stays in the foreground; the exit code is vLLM's.
SIGINT/SIGTERM (also during startup) stop vLLM's process group (SIGKILL after a grace period), log one line
each, and exit 128 + the signal (143 for SIGTERM). A bad --model or capture ids outside the target's layers:
one line, exit 2, before vLLM starts. Capture ids default to the drafter's aux layers (the recipe's default
rule from the target config, or --aux-layer-ids) plus the last layer L (pre-final-norm). vLLM runs from its own venv (built on first use; see `modelopt_ext.deploy.vllm_env`).
"""

from __future__ import annotations

import argparse
import signal
import sys

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.serve_hidden_states", description=__doc__.splitlines()[0]
    )
    p.add_argument("--engine", choices=["vllm"], default="vllm")
    p.add_argument("--model", required=True, help="Target model folder or hub id.")
    p.add_argument("--shared-storage", required=True, help="Folder the hidden-state files are written to.")
    p.add_argument(
        "--capture-ids",
        help="Comma-separated vLLM layer ids to capture, last one = L (overrides the default).",
    )
    p.add_argument("--aux-layer-ids", help="The drafter's aux layer ids (vLLM numbering); L is appended.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--advertise-host", help="Host name to print in the URL (default: --host).")
    p.add_argument("--tp", type=int, default=1, help="Tensor-parallel size.")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype", help="e.g. bfloat16, float32 (default: vLLM's choice).")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument(
        "--cpu-kvcache-gib", type=float, default=1.0, help="CPU build only: VLLM_CPU_KVCACHE_SPACE if unset."
    )
    p.add_argument("--flavor", choices=["cpu", "gpu"], help="Default: detected (an NVIDIA device -> gpu).")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--log", help="Server log file (default: <shared-storage>/vllm_server_<port>.log).")
    p.add_argument("extra", nargs="*", help="Extra vLLM arguments, after `--`.")
    return p


def _capture_ids(args) -> list[int]:
    """The ids to capture, checked against the target's layer count (ValueError / TargetPathError)."""
    from modelopt_ext.drafters.layers import default_capture_ids
    from modelopt_ext.targets.layers import check_capture_ids, parse_capture_ids, target_num_layers
    from modelopt_ext.targets.locate import target_config

    num_layers = target_num_layers(target_config(args.model, "--model"))
    if args.capture_ids and args.aux_layer_ids:
        raise ValueError("--capture-ids and --aux-layer-ids are exclusive")
    if args.capture_ids:
        return check_capture_ids(num_layers, parse_capture_ids(args.capture_ids))
    aux = parse_capture_ids(args.aux_layer_ids) if args.aux_layer_ids else None
    return default_capture_ids(num_layers, aux)


class _Stop(BaseException):
    """Raised by the signal handler: unwinds whatever main is waiting in (startup or serving)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _log(msg: str) -> None:
    print(f"serve_hidden_states: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Start the server, print its URL, and run until it exits or we are signalled."""
    args = _parser().parse_args(argv)
    for name in ("port", "tp"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return EXIT_BAD_INPUT
    from modelopt_ext.targets.locate import TargetPathError

    try:
        capture_ids = _capture_ids(args)
    except TargetPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as e:
        print(f"error: --capture-ids/--aux-layer-ids: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from modelopt_ext.deploy.vllm_env import VllmEnvError
    from modelopt_ext.supply.vllm.server import ServerStartError, start_hidden_states_server

    def on_signal(signum, _frame):
        # Only the first signal unwinds main; later ones must not interrupt the bounded stop below.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Stop(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    handle = None
    try:
        try:
            handle = start_hidden_states_server(
                args.model, shared_storage=args.shared_storage, capture_ids=capture_ids, host=args.host,
                port=args.port, tp=args.tp, max_model_len=args.max_model_len, dtype=args.dtype,
                flavor=args.flavor, cpu_kvcache_gib=args.cpu_kvcache_gib,
                gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                extra_args=args.extra, log_path=args.log, startup_timeout=args.startup_timeout,
                advertise_host=args.advertise_host, die_with_parent=True,
            )  # fmt: skip
        except (VllmEnvError, ServerStartError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        _log(f"vLLM pid {handle.process.pid}; capture ids {capture_ids}; log {handle.log_path}")
        print(handle.url, flush=True)
        rc = handle.process.wait()
        handle.stop()  # reap engine children left in the group
        return rc if rc >= 0 else 128 - rc
    except _Stop as stop:
        name = signal.Signals(stop.signum).name
        if handle is None:  # the startup code stopped the server it had started before re-raising
            _log(f"{name}: stopped during startup")
        else:
            _log(
                f"{name}: stopping vLLM (pid {handle.process.pid}; SIGTERM to its group, SIGKILL after 30 s)"
            )
            handle.stop()
            _log(f"vLLM stopped (exit code {handle.process.returncode})")
        return 128 + stop.signum  # 143 for SIGTERM, 130 for SIGINT: stopped on request, not finished


if __name__ == "__main__":
    raise SystemExit(main())
