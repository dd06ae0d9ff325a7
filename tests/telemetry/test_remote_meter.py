"""The meter with the real remote source: RemoteTargetClient against serve_target's HTTP server (in a thread) is
classified remote, its calls count as data wait, and its requests, latency and bytes land under its URL."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from modelopt_ext.supply.target_server.handler import TargetHandler
from modelopt_ext.supply.target_server.http_server import TargetServer
from modelopt_ext.supply.target_server.source import RemoteTargetClient
from modelopt_ext.targets.tiny import tiny_llama_config
from modelopt_ext.telemetry.meter import REMOTE, TrainMeter, classify_source


def test_remote_client_is_metered_per_server():
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=64, vocab_size=96, intermediate_size=128, max_position_embeddings=64)
    handler = TargetHandler(LlamaForCausalLM(cfg).eval(), [1, 2, 3], model_name="tiny")
    server = TargetServer(handler, "127.0.0.1", 0)
    server.start_in_thread()
    try:
        with RemoteTargetClient(server.url, use_data_plane=False) as client:
            assert classify_source(client) == REMOTE
            meter = TrainMeter(kind=REMOTE, urls=["http://other:1", server.url + "/"])
            meter.start()
            batch = {
                "input_ids": torch.randint(0, 96, (2, 9)),
                "attention_mask": torch.ones(2, 9, dtype=torch.bool),
                "loss_mask": torch.ones(2, 9, dtype=torch.bool),
            }
            sups = [meter.fetch(client, batch) for _ in range(3)]
            _, total = meter.window()
    finally:
        server.close()
        handler.close()
    s = total.server_summary()
    assert s["http://other:1"]["requests"] == 0
    mine = s[server.url]
    assert mine["requests"] == 3 and mine["errors"] == 0 and mine["lat_p50_ms"] > 0
    # bytes: the Supervision batches received (aux states [2, 9, 3*64] + logits [2, 9, 96] fp32 + ids/masks)
    assert mine["mb"] * 1e6 == sum(sup.nbytes() for sup in sups) > 3 * (2 * 9 * (3 * 64 + 96) * 4)
    assert total.samples == 6 and total.tokens == 54 and 0 < total.data_wait_frac <= 1
