"""`data.mode: remote`: the trainer's SourceSetup over serve_target gives the loss the same targets as colocated."""

from __future__ import annotations

import pytest
import torch

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.data.draft_vocab import DraftVocab
from modelopt_ext.supply.target_server.source import RemoteTargetError, build_remote_source
from modelopt_ext.targets.head import resolve_target
from modelopt_ext.training.distributed import DistEnv

from .conftest import AUX, VOCAB, make_batch


def _recipe(model_dir, urls, tmp_path, aux=AUX):
    return parse_recipe(
        {
            "model": {"path": str(model_dir), "dtype": "float32", "aux_layer_ids": aux},
            "data": {"path": "unused.jsonl", "server_urls": urls, "mode": "remote"},
            "training": {"output_dir": str(tmp_path / "out")},
        }
    )


def test_remote_source_matches_colocated_targets_bit_for_bit(
    server, tiny_model_dir, tiny_model, colocated, tmp_path
):
    vocab = DraftVocab.from_selected_ids(torch.arange(0, VOCAB, 3), VOCAB)
    recipe = _recipe(tiny_model_dir, ["http://127.0.0.1:9", server.url], tmp_path)
    # Local rank 1 of its node starts at data.server_urls[1] (server_pool.first_server): the live server.
    env = DistEnv(rank=3, local_rank=1)
    setup = build_remote_source(recipe, env, ["conversations"], pad_id=0, vocab=vocab)
    assert setup.aux_layer_ids == AUX and setup.head is None and setup.dataset == ["conversations"]
    assert torch.equal(setup.target_embeddings, tiny_model.get_input_embeddings().weight)
    batch = make_batch()
    remote = setup.source(batch)
    assert remote.target_probs is not None and remote.target_probs.shape[-1] == vocab.selected_ids.numel()
    probs_r, mask_r = resolve_target(remote, None, vocab)
    probs_c, mask_c = resolve_target(colocated(batch), None, vocab)
    assert torch.equal(probs_r, probs_c) and torch.equal(mask_r, mask_c)
    assert mask_c.any() and not mask_c.all()
    assert torch.equal(remote.aux_hidden_states, colocated(batch).aux_hidden_states)
    setup.source.close()


def test_remote_source_refuses_a_server_with_other_aux_layers(server, tiny_model_dir, tmp_path):
    with pytest.raises(RemoteTargetError, match=r"aux_layer_ids server=\[1, 2, 3\] expected=\[1, 2\]"):
        build_remote_source(
            _recipe(tiny_model_dir, [server.url], tmp_path, aux=[1, 2]), DistEnv(), [], 0, None
        )


def _serve_target(model_dir, tmp_path, name, port=0):
    """serve_target as its own process (what a serve node runs); returns (process, url)."""
    from modelopt_ext.supply.target_server.process import start_serve_target

    args = ["--target", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--aux-layer-ids", ",".join(map(str, AUX)), "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    return start_serve_target(args, tmp_path, timeout_s=120, name=name)


@pytest.mark.e2e
def test_remote_source_fails_over_and_returns_to_a_restarted_server(tiny_model_dir, tmp_path):
    """Two real serve_target processes; the rank's own server is SIGKILLed mid-run: batches go to the other
    (none lost), and once it is restarted on its port (having forgotten this client) it is prepared again
    (model check, draft vocabulary) and takes this rank's batches again."""
    import time

    from modelopt_ext.supply.server_pool import BreakerPolicy

    a, url_a = _serve_target(tiny_model_dir, tmp_path, "a")
    b, url_b = _serve_target(tiny_model_dir, tmp_path, "b")
    procs = [a, b]
    try:
        vocab = DraftVocab.from_selected_ids(torch.arange(0, VOCAB, 3), VOCAB)
        setup = build_remote_source(
            _recipe(tiny_model_dir, [url_a, url_b], tmp_path), DistEnv(rank=0), ["c"], 0, vocab
        )
        source = setup.source
        fast = BreakerPolicy(cooldown_s=0.2, max_cooldown_s=0.4)
        source.pool.policy = fast
        for br in source.pool.breakers.values():
            br.policy, br.cooldown_s = fast, fast.cooldown_s
        batch = make_batch()
        reference = source(batch)
        assert source.url == url_a
        a.kill()
        a.wait()
        for _ in range(3):  # no batch lost: each is answered by the other server
            assert torch.equal(source(batch).target_probs, reference.target_probs)
            assert source.url == url_b
        stats = source.server_stats()
        assert stats[url_a]["down_events"] == 1 and stats[url_a]["errors"] >= 1
        a2, url_a2 = _serve_target(tiny_model_dir, tmp_path, "a2", port=int(url_a.rsplit(":", 1)[1]))
        procs.append(a2)
        assert url_a2 == url_a
        deadline = time.monotonic() + 20
        while source.url != url_a and time.monotonic() < deadline:
            time.sleep(0.1)
            source(batch)
        assert source.url == url_a, "the restarted server never got batches again"
        assert torch.equal(source(batch).target_probs, reference.target_probs)  # vocab mapping sent again
        assert source.server_stats()[url_a]["up_events"] == 1
        source.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_remote_source_gives_up_when_no_server_is_healthy_for_the_grace(tiny_model, tiny_model_dir, tmp_path):
    from modelopt_ext.supply.server_pool import BreakerPolicy, NoHealthyServerError
    from modelopt_ext.supply.target_server.source import FailoverRemoteSource

    clock = {"t": 0.0}

    def sleep(s):
        clock["t"] += s

    def make(url):
        return RemoteTargetClient(url)

    from modelopt_ext.supply.target_server.source import RemoteTargetClient

    source = FailoverRemoteSource(
        ["http://127.0.0.1:9", "http://127.0.0.1:11"],
        make,
        lambda c: None,
        policy=BreakerPolicy(failure_threshold=1, cooldown_s=0.0, all_down_timeout_s=0.0),
        sleep=sleep,
    )
    with pytest.raises(NoHealthyServerError, match="no healthy hidden-state server"):
        source(make_batch())


def test_remote_source_gives_up_at_once_when_a_stop_was_requested():
    """After SIGTERM (the trainer's stop_requested), a batch no server answers is given up at once rather
    than after the grace: the job is ending and the trainer would be killed while waiting."""
    import time

    from modelopt_ext.supply.server_pool import BreakerPolicy
    from modelopt_ext.supply.target_server.source import FailoverRemoteSource, RemoteTargetClient

    source = FailoverRemoteSource(
        ["http://127.0.0.1:9", "http://127.0.0.1:11"],
        RemoteTargetClient,
        lambda c: None,
        policy=BreakerPolicy(all_down_timeout_s=600),
    )
    source.stop_requested = lambda: True
    t0 = time.monotonic()
    with pytest.raises(RemoteTargetError, match="stop requested and no hidden-state server answers"):
        source(make_batch())
    assert time.monotonic() - t0 < 30


def test_a_batch_every_server_refuses_is_one_error_not_a_wait(server, tiny_model_dir, tmp_path):
    """HTTP 4xx for the batch itself: tried on each server (re-prepared), then one RemoteTargetError."""
    port = server.url.rsplit(":", 1)[1]
    urls = [server.url, f"http://localhost:{port}"]  # two names of one real server
    setup = build_remote_source(_recipe(tiny_model_dir, urls, tmp_path), DistEnv(rank=0), ["c"], pad_id=0)
    bad = make_batch()
    bad["input_ids"] = bad["input_ids"] + VOCAB
    with pytest.raises(RemoteTargetError, match=r"answered 400: input_ids outside \[0, 256\)"):
        setup.source(bad)
    assert torch.equal(setup.source(make_batch()).input_ids, make_batch()["input_ids"])  # still usable
    setup.source.close()
