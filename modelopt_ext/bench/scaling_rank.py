"""One trainer rank of the scaling benchmark: the real Trainer, with the drafter's step replaced by time.

    RANK=0 WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=... python -m modelopt_ext.bench.scaling_rank cfg.json

Everything between the servers and the loss is the project's code: the sampler, the DataLoader and its
workers, `VllmStreamingDataset` (server pool, failover) or `RemoteTargetClient`, the telemetry meter, the
gloo all-reduces of a data-parallel step, checkpoints. The drafter is a one-parameter module and its loss
sleeps so that a rank consumes `demand` samples/s when data is ready: the sleep is the step period
(batch / demand) minus the step's own overhead, so the simulated demand does not depend on how loaded this
machine is. The overhead is the MINIMUM over the recent steps of the time outside the loss and outside data
waits: a rank that waits in the all-reduce for a starved peer is not doing work, and taking that wait as
overhead would make it sleep less and consume faster than `demand` (the last rank to arrive waits for nobody,
so the minimum over a few steps is the true overhead).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch


class _Vocab:
    """What a checkpoint needs from a draft vocabulary (a one-token mapping file)."""

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        one = {"d2t": torch.zeros(1, dtype=torch.long), "t2d": torch.ones(1, dtype=torch.bool)}
        save_file(one, str(Path(folder) / "vocab_mapping.safetensors"))


class CalibratedStep:
    """The loss function: sleep so that one rank consumes `demand` samples/s, whatever the step overhead."""

    def __init__(self, demand: float, batch_size: int):
        self.period_s = batch_size / demand
        self.meter: Any = None  # the Trainer's TrainMeter (set once the Trainer exists): its data-wait totals
        self._prev_end: float | None = None
        self._prev_wait = 0.0
        self._overheads: deque[float] = deque(maxlen=16)

    def _waited(self) -> float:
        m = self.meter
        return (m.wait_s + m.startup_s) if m is not None else 0.0

    def __call__(self, model, sup, vocab, head):
        now = time.monotonic()
        if self._prev_end is not None:
            self._overheads.append(max(0.0, (now - self._prev_end) - (self._waited() - self._prev_wait)))
        overhead = min(self._overheads) if self._overheads else 0.0
        time.sleep(max(0.0, self.period_s - overhead))
        self._prev_end = time.monotonic()
        self._prev_wait = self._waited()
        loss = (model(torch.ones(1, 1)) ** 2).sum()
        return loss, {"loss_0": loss.detach()}


def conversations(n: int, tokens: int) -> list[dict[str, torch.Tensor]]:
    """n prompts of `tokens` tokens each (distinct first tokens: a mixed-up reply would be caught)."""
    return [
        {
            "input_ids": (torch.arange(tokens) * 7 + i) % 50_000 + 1,
            "loss_mask": torch.ones(tokens, dtype=torch.bool),
        }
        for i in range(n)
    ]


def run(cfg: dict[str, Any]) -> None:
    """Train `cfg['steps']` steps on this rank (process group from the env vars)."""
    from modelopt_ext.config.recipe import parse_recipe
    from modelopt_ext.supply.server_pool import BreakerPolicy
    from modelopt_ext.training.distributed import init_distributed, shutdown_distributed
    from modelopt_ext.training.parts import TrainingParts
    from modelopt_ext.training.trainer import Trainer

    torch.set_num_threads(1)
    out = Path(cfg["out"])
    step = CalibratedStep(cfg["demand"], cfg["batch_size"])
    recipe = parse_recipe(
        {
            "model": {"path": str(out / "no-target"), "dtype": "float32"},
            "data": {
                "path": "unused.jsonl",
                "server_urls": cfg["urls"],
                "shared_storage_root": cfg.get("root"),
                "num_workers": cfg["workers"],
                "mode": "remote" if cfg["protocol"] == "serve_target" else "streaming",
                "call_ahead": cfg.get("call_ahead", 1),
            },
            "training": {
                "output_dir": str(out),
                "max_steps": cfg["steps"],
                "batch_size": cfg["batch_size"],
                "log_interval": cfg["log_interval"],
                "save_interval": 10 * cfg["steps"],
                "export_at_end": False,
                "dtype": "float32",
                "lr": 1e-4,
                "warmup_steps": 0,
            },
        }
    )

    def parts(recipe, env, resume) -> TrainingParts:
        n = cfg["steps"] * cfg["batch_size"] * env.world_size
        base = conversations(n, cfg["tokens"])
        if cfg["protocol"] == "serve_target":
            from functools import partial

            from modelopt_ext.data.dataset import collate_padded
            from modelopt_ext.supply.server_pool import first_server
            from modelopt_ext.supply.target_server.source import RemoteTargetClient

            urls = cfg["urls"]
            source = RemoteTargetClient(urls[first_server(len(urls), env.local_rank)], use_data_plane=False)
            dataset, collate = base, partial(collate_padded, pad_id=0)
        else:
            from functools import partial

            from modelopt_ext.supply.vllm.source import (
                StreamedSource,
                StreamingOptions,
                VllmStreamingDataset,
                collate_streamed,
            )

            options = StreamingOptions(
                request_timeout_s=30.0,
                balance=cfg["balance"],
                breaker=BreakerPolicy(all_down_timeout_s=60.0),
            )
            dataset = VllmStreamingDataset(
                base,
                server_urls=cfg["urls"],
                shared_storage_root=cfg["root"],
                num_aux_layers=cfg["layers"] - 1,
                hidden_size=cfg["hidden"],
                num_workers=cfg["workers"],
                local_rank=env.local_rank,
                options=options,
            )
            source, collate = StreamedSource(), partial(collate_streamed, pad_id=0)
        return TrainingParts(
            dataset=dataset,
            collate=collate,
            source=source,
            model=torch.nn.Linear(1, 1, bias=False),
            model_config={},
            vocab=_Vocab(),
            head=None,
            loss_fn=step,
        )

    env = init_distributed(timeout_s=300.0)
    try:
        trainer = Trainer(recipe, parts, env=env)
        step.meter = trainer.meter
        trainer.train()
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    """`python -m modelopt_ext.bench.scaling_rank CONFIG.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m modelopt_ext.bench.scaling_rank CONFIG.json", file=sys.stderr)
        return 2
    run(json.loads(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
