"""Fixtures for the target-server tests: a tiny random Llama target on disk and in memory, batches, servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modelopt_ext.supply.colocated import ColocatedSource
from modelopt_ext.supply.target_server.data_plane import DataPlaneServer
from modelopt_ext.supply.target_server.handler import TargetHandler
from modelopt_ext.supply.target_server.http_server import TargetServer
from modelopt_ext.targets.tiny import tiny_llama_config

VOCAB = 256
LAYERS = 4
HIDDEN = 64
AUX = [1, 2, 3]


def tiny_config() -> LlamaConfig:
    """Small enough for a 2-core machine (a forward is a few ms), head_dim 32, fp32."""
    return tiny_llama_config(hidden_size=HIDDEN, num_layers=LAYERS, vocab_size=VOCAB, intermediate_size=128,
                             max_position_embeddings=256)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny target saved as a model folder (what serve_target loads)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peakier logits: argmax ties would make probs tests vacuous
    out = tmp_path_factory.mktemp("tiny_target")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> LlamaForCausalLM:
    """The same weights loaded the way serve_target loads them."""
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def colocated(tiny_model) -> ColocatedSource:
    """The reference: supervision computed in this process."""
    return ColocatedSource(tiny_model, AUX)


def make_batch(b: int = 3, t: int = 17, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded collated batch like `collate_padded` gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t
    attn = torch.arange(t)[None, :] < lengths[:, None]
    loss = attn & (torch.rand(b, t, generator=g) > 0.3)
    return {"input_ids": ids * attn, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture
def handler(tiny_model) -> TargetHandler:
    """A handler with a loopback gloo data plane (store on a free port), no sockets until init_nccl."""
    h = TargetHandler(
        tiny_model,
        AUX,
        model_name="tiny",
        data_plane=DataPlaneServer("127.0.0.1", 0, handshake_timeout_s=10, op_timeout_s=5),
    )
    yield h
    h.close()


@pytest.fixture
def server(handler) -> Iterator[TargetServer]:
    """serve_target's HTTP server in a thread of this process (real sockets, real gloo groups)."""
    srv = TargetServer(handler, "127.0.0.1", 0)
    srv.start_in_thread()
    yield srv
    srv.close()


@pytest.fixture
def token_file(tmp_path) -> Path:
    p = tmp_path / "private" / "token"
    p.parent.mkdir(mode=0o700)
    p.write_text("s3cret-token\n")
    os.chmod(p, 0o600)
    return p


def assert_same_supervision(a, b) -> None:
    """Bit-for-bit equality of every Supervision field (torch.equal, same dtype, both None or both set)."""
    for name, x in a.tensors().items():
        y = getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            assert torch.equal(x.cpu(), y.cpu()), f"{name} differs"
