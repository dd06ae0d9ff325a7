"""A REAL vLLM hidden-state server (CPU build, fp32) on the tiny target vs transformers.

Checks the contract the streaming dataset relies on: the response names a file inside the shared storage,
the file holds the prompt's token ids and the captured layers, layer ids < L equal transformers'
`hidden_states[k]` within 1e-5 relative, id L is the last decoder layer's output BEFORE the final norm (and
the final norm of it equals transformers' `hidden_states[L]`), concurrent requests get their own files, and
the CLI stops vLLM (its whole process group) on SIGTERM. One server start for the whole module.
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

# Timeout covers the fixtures too: tiny-target build + a server start took 800 s on 2 cores shared with
# two other vLLM servers; alone it is ~60-110 s.
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(2400)]

TOL_REL = 1e-5


@pytest.fixture(scope="module")
def hf_model(tiny_target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_target) -> list[list[int]]:
    """A chat-rendered prompt and random-token prompts of several lengths (1 token up to 700)."""
    from transformers import AutoTokenizer

    from modelopt_ext.targets.tiny import make_conversation

    tok = AutoTokenizer.from_pretrained(tiny_target)
    chat = tok.apply_chat_template(make_conversation(random.Random(3)), tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    rng = random.Random(0)
    vocab = len(tok)
    return [chat] + [[rng.randrange(vocab) for _ in range(n)] for n in (1, 17, 256, 700)]


def _hf_reference(model, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' hidden_states (L+1 tensors [T, H]) and the last decoder layer's pre-norm output."""
    captured = {}

    def hook(_mod, _inp, out):
        captured["pre_norm"] = (out[0] if isinstance(out, tuple) else out).detach()

    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    return [h[0] for h in out.hidden_states], captured["pre_norm"][0]


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _fetch(server, ids: list[int]):
    from modelopt_ext.supply.vllm.files import read_hidden_states_file
    from modelopt_ext.supply.vllm.server import request_hidden_states

    resp = request_hidden_states(server.url, server.model_id, ids)
    path = resp["kv_transfer_params"]["hidden_states_path"]
    assert os.path.dirname(os.path.realpath(path)) == os.path.realpath(server.storage)
    f = read_hidden_states_file(
        path,
        server.storage,
        expected_token_ids=ids,
        expected_num_layers=len(server.capture_ids),
        lock_timeout_s=60,
    )
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")  # deleted after reading
    return f


def test_captured_layers_match_transformers(hs_server, hf_model, prompts):
    num_layers = hf_model.config.num_hidden_layers
    capture_ids = hs_server.capture_ids
    assert capture_ids[-1] == num_layers
    worst = {k: 0.0 for k in capture_ids}
    worst_normed = 0.0
    t0 = time.monotonic()
    for ids in prompts:
        f = _fetch(hs_server, ids)
        assert f.hidden_states.dtype == torch.float32
        assert tuple(f.hidden_states.shape) == (len(ids), len(capture_ids), hf_model.config.hidden_size)
        assert torch.equal(f.token_ids, torch.tensor(ids))
        hf_states, pre_norm = _hf_reference(hf_model, ids)
        for j, k in enumerate(capture_ids):
            ref = pre_norm if k == num_layers else hf_states[k]
            worst[k] = max(worst[k], _rel_max(f.hidden_states[:, j], ref))
        # The server's layer L is pre-norm: it must NOT be transformers' hidden_states[L]...
        assert _rel_max(f.hidden_states[:, -1], hf_states[num_layers]) > 1e-2
        # ...but the target's final norm applied to it is.
        with torch.no_grad():
            normed = hf_model.model.norm(f.hidden_states[:, -1])
        worst_normed = max(worst_normed, _rel_max(normed, hf_states[num_layers]))
    print(
        f"\nvLLM vs transformers fp32 ({len(prompts)} prompts, {time.monotonic() - t0:.1f} s): max-abs relative "
        + ", ".join(f"id {k}: {v:.1e}" for k, v in worst.items())
        + f"; norm(id {num_layers}) vs hidden_states[{num_layers}]: {worst_normed:.1e}"
    )
    assert all(v <= TOL_REL for v in worst.values()), worst
    assert worst_normed <= TOL_REL


def test_concurrent_requests_get_their_own_files(hs_server):
    rng = random.Random(1)
    batch = [[rng.randrange(500) for _ in range(rng.randrange(8, 200))] for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        files = list(pool.map(lambda ids: _fetch(hs_server, ids), batch))
    for ids, f in zip(batch, files):
        assert f.token_ids.tolist() == ids
    assert os.listdir(hs_server.storage) == []


def test_cli_sigterm_stops_vllm_process_group(hs_server):
    """Runs last: the CLI forwards SIGTERM to vLLM's group and exits once vLLM has exited."""
    hs_server.cli.send_signal(signal.SIGTERM)
    rc = hs_server.cli.wait(90)
    assert rc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(hs_server.vllm_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"vLLM's process group {hs_server.vllm_pid} still alive 30 s after the CLI exited")
