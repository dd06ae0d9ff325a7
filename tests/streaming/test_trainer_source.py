"""`build_streaming_source` gives the trainer a working SourceSetup: streamed items -> batch dict -> Supervision,
with a TargetHead read from the target folder that turns the streamed layer L into logits."""

from __future__ import annotations

import pytest
import torch
from fake_vllm import FakeVllmServer, expected_hidden
from torch.utils.data import DataLoader

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.supply.vllm.source import VllmStreamingDataset, build_streaming_source
from modelopt_ext.targets.supervision import Supervision
from modelopt_ext.training.distributed import DistEnv

HIDDEN, LAYERS = 8, 3  # default aux ids of a 3-layer target: [1, 2] -> the server captures [1, 2, 3]


@pytest.fixture
def target_dir(tmp_path):
    """A target folder as the trainer sees it in streaming mode: config + the tensors TargetHead reads.

    (The decoder layers are never read by a streaming trainer, so they are left out: transformers is not
    needed and the test stays fast.)
    """
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d = tmp_path / "target"
    d.mkdir()
    cfg = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "vocab_size": 600}
    (d / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
    save_file(
        {
            "model.norm.weight": torch.rand(HIDDEN, generator=g) + 0.5,
            "lm_head.weight": torch.randn(600, HIDDEN, generator=g),
            "model.embed_tokens.weight": torch.randn(600, HIDDEN, generator=g),
        },
        str(d / "model.safetensors"),
    )
    return d


def test_streaming_source_setup_feeds_supervision(tmp_path, target_dir):
    root = tmp_path / "shared"
    root.mkdir()
    server = FakeVllmServer(str(root), n_layers=LAYERS, hidden=HIDDEN).start()
    try:
        recipe = parse_recipe(
            {
                "model": {"path": str(target_dir), "dtype": "float32"},
                "data": {
                    "path": "unused.jsonl",
                    "server_urls": [server.url],
                    "shared_storage_root": str(root),
                },
                "training": {"output_dir": str(tmp_path / "out")},
            }
        )
        assert recipe.data.mode == "streaming"
        convs = [
            {
                "input_ids": torch.tensor([5 + i, 7, 9, 11][: 2 + i]),
                "loss_mask": torch.ones(2 + i, dtype=torch.bool),
            }
            for i in range(3)
        ]
        setup = build_streaming_source(recipe, DistEnv(), convs, pad_id=0)
        assert isinstance(setup.dataset, VllmStreamingDataset) and setup.aux_layer_ids == [1, 2]
        batch = next(iter(DataLoader(setup.dataset, batch_size=3, collate_fn=setup.collate)))
        sup = setup.source(batch)
        assert isinstance(sup, Supervision) and sup.target_last_hidden is not None
        hs = expected_hidden([7, 7, 9], LAYERS, HIDDEN)  # sample 2: ids [7, 7, 9]
        assert torch.equal(sup.target_last_hidden[2, :3], hs[:, -1])
        assert torch.equal(sup.aux_hidden_states[2, :3], hs[:, :-1].reshape(3, -1))
        logits = setup.head.logits(sup.target_last_hidden)
        assert logits.shape == (3, 4, 600)
        h = sup.target_last_hidden[2, :3]
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * setup.head.norm.weight
        torch.testing.assert_close(logits[2, :3], normed @ setup.head.lm_head.T)  # final norm, then lm_head
        assert setup.target_embeddings.shape == (600, HIDDEN)
    finally:
        server.kill()
