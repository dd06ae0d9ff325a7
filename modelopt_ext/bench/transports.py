"""Benchmark serve_target's transports on a target (prints a table; not a timed test).

    python -m modelopt_ext.bench.transports [--target DIR] [--batch 4] [--seq 256] [--iters 20]
        [--draft-vocab 256]

Starts a real serve_target process on loopback, then measures per transport (in-process colocated compute as
the reference, the wire format over HTTP, the gloo data plane) and per target form (full logits, probs over
the draft vocabulary): requests/s, samples/s, supervision MB/s and bytes per sample; plus an in-process
memcpy of the same bytes (the limit of any transport). Without --target it saves a random Llama with the
tiny target's shape (4 layers, hidden 128, vocab 1024): throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _tiny_random_target(out: Path) -> Path:
    from transformers import LlamaForCausalLM

    from modelopt_ext.targets.tiny import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config()
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _start_server(target: Path, tmp: Path, threads: int) -> tuple[subprocess.Popen, str]:
    from modelopt_ext.supply.target_server.process import ServeTargetStartError, start_serve_target

    env = {**os.environ, "MODELOPT_EXT_NCCL_PORT": "0"}
    args = ["--target", str(target), "--port", "0", "--device", "cpu", "--threads", str(threads)]
    try:
        return start_serve_target(args, tmp, env=env)
    except ServeTargetStartError as e:
        raise SystemExit(f"bench: {e}") from None


def _time(fn, iters: int) -> float:
    fn()  # warm-up (allocations, connection, group formation)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m modelopt_ext.bench.transports", description=__doc__.split("\n")[0]
    )
    p.add_argument("--target", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--draft-vocab", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads here and in the server")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from modelopt_ext.drafters.eagle3 import default_aux_layer_ids
    from modelopt_ext.supply.colocated import ColocatedSource, num_target_layers
    from modelopt_ext.supply.target_server.source import RemoteTargetClient

    with tempfile.TemporaryDirectory(prefix="serve_target_bench_") as d:
        tmp = Path(d)
        target = Path(args.target) if args.target else _tiny_random_target(tmp / "target")
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        source = ColocatedSource(model, default_aux_layer_ids(num_target_layers(model)))
        vocab = model.get_input_embeddings().weight.shape[0]
        g = torch.Generator().manual_seed(0)
        batch = {
            "input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.bool),
            "loss_mask": torch.ones(args.batch, args.seq, dtype=torch.bool),
        }
        draft_ids = torch.randperm(vocab, generator=g)[: args.draft_vocab].sort().values
        rows = []
        sup = source(batch)
        flat = [t for t in sup.tensors().values() if t is not None]
        s = _time(lambda: [t.clone() for t in flat], args.iters)
        rows.append(("memcpy (in process)", "logits", s, sup.nbytes()))
        rows.append(("colocated compute", "logits", _time(lambda: source(batch), args.iters), sup.nbytes()))
        proc, url = _start_server(target, tmp, args.threads)
        try:
            for dp in (False, True):
                for form in ("logits", "probs"):
                    client = RemoteTargetClient(url, use_data_plane=dp, target_form=form)
                    client.set_vocab_mapping(draft_ids)
                    s = _time(lambda c=client: c(batch), args.iters)
                    rows.append((f"serve_target {client.transport}", form, s, int(client.last_meta["bytes"])))
                    client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    print(f"target {target.name if args.target else 'random tiny (4x128, V=1024)'}; batch {args.batch}x{args.seq}; "
          f"draft vocab {args.draft_vocab}; torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'path':<26} {'form':<7} {'req/s':>8} {'samples/s':>10} {'MB/s':>9} {'bytes/sample':>13}")
    for name, form, sec, nbytes in rows:
        print(
            f"{name:<26} {form:<7} {1 / sec:>8.1f} {args.batch / sec:>10.1f} {nbytes / sec / 1e6:>9.1f} "
            f"{nbytes / args.batch:>13,.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
