"""A tiny local target model: a small Llama, a locally trained tokenizer, and a synthetic chat language.

Tests, the quickstart and the benchmarks need a target that loads offline (no hub), runs on a 2-core CPU,
is accepted by vLLM's CPU build (head_dim >= 64), and whose next-token distribution is peaked enough that a
drafter can learn it (acceptance lengths mean something). So the target is briefly fitted on the same
synthetic language `write_tiny_conversations` writes: templated conversations whose assistant answers are
deterministic functions of the question (counting, weekdays, copying, fixed facts).

CLI: `python -m modelopt_ext.tiny --out DIR [--data FILE --num-conversations N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from modelopt_ext.util.fileio import exclusive_lock, replace_dir_atomically

# The chat template (ChatML form): the same text the fitting loop trains on, so the target "speaks" it.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"

# Bumped whenever the language, the tokenizer or the fitting changes, so stale builds are not reused.
_BUILD_VERSION = 1
DEFAULT_NUM_CONVERSATIONS = 2000  # the tiny data set (2000 at batch 8: 250 steps per epoch on one process)
_MARKER = "tiny_build.json"

_NUMBERS = [str(i) for i in range(40)]
_DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
_ANIMALS = {
    "cat": ("small", "fish", "sleeps all day"),
    "dog": ("loyal", "bones", "runs in the park"),
    "bird": ("light", "seeds", "sings in the morning"),
    "horse": ("strong", "hay", "pulls the cart"),
    "fish": ("quiet", "plankton", "swims in the river"),
    "cow": ("calm", "grass", "stands in the field"),
    "fox": ("clever", "mice", "hides in the forest"),
    "bee": ("busy", "nectar", "makes sweet honey"),
}
_SYSTEM_PROMPTS = ["you are a helpful assistant .", "answer the question in full sentences ."]


def _ask_count(rng: random.Random) -> tuple[str, str]:
    start = rng.randrange(0, 30)
    end = start + rng.randrange(3, 10)
    nums = " ".join(str(i) for i in range(start, end + 1))
    return f"count from {start} to {end} .", f"sure . {nums} . done counting from {start} to {end} ."


def _ask_day(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(7)
    day, nxt = _DAYS[i], _DAYS[(i + 1) % 7]
    return f"what day comes after {day} ?", f"the day after {day} is {nxt} . the day before {nxt} is {day} ."


def _ask_repeat(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_COLORS, rng.randrange(2, 5))
    seq = " ".join(words)
    return (
        f"repeat the colors {seq} twice .",
        f"here they are : {seq} , {seq} . i repeated the colors twice .",
    )


def _ask_animal(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(sorted(_ANIMALS))
    adj, food, habit = _ANIMALS[name]
    return (
        f"tell me about the {name} .",
        f"the {name} is {adj} . the {name} eats {food} . the {name} {habit} . that is all about the {name} .",
    )


def _ask_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(0, 20), rng.randrange(0, 20)
    return f"what is {a} plus {b} ?", f"{a} plus {b} is {a + b} . the answer is {a + b} ."


_TASKS = (_ask_count, _ask_day, _ask_repeat, _ask_animal, _ask_add)


def make_conversation(rng: random.Random) -> list[dict]:
    """One conversation (OpenAI form: role/content) of 1-3 turns, maybe with a system prompt."""
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    for _ in range(rng.randrange(1, 4)):
        question, answer = rng.choice(_TASKS)(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def write_tiny_conversations(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` conversations of the synthetic language as JSONL (atomic).

    Both common forms appear (OpenAI `messages` and ShareGPT `conversations`), so readers are exercised on both.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sharegpt_role = {"system": "system", "user": "human", "assistant": "gpt"}
    lines = []
    for i in range(n):
        messages = make_conversation(rng)
        if i % 2:
            row = {
                "id": f"tiny-{i}",
                "conversations": [
                    {"from": sharegpt_role[m["role"]], "value": m["content"]} for m in messages
                ],
            }
        else:
            row = {"id": f"tiny-{i}", "messages": messages}
        lines.append(json.dumps(row))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def _render(messages: list[dict]) -> str:
    """The chat template, in Python, for the corpus the tokenizer and the target are fitted on."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (the Llama-3 / Qwen kind) trained on the corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_tokenizer(
    out_dir: str | Path | None = None, *, vocab_size: int = 1024, seed: int = 0, corpus_size: int = 4000
):
    """The tiny target's tokenizer alone (no model, no fitting): for data tests. Saved to `out_dir` if given."""
    rng = random.Random(seed)
    tokenizer = _train_tokenizer([_render(make_conversation(rng)) for _ in range(corpus_size)], vocab_size)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _fit(
    model,
    tokenizer,
    texts: list[str],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    lr: float,
    log=None,
) -> float:
    """Next-token training on the rendered conversations, packed into `seq_len` chunks (no padding waste).

    Returns the final loss (mean of the last 10 steps). Runs on one thread: on a shared 2-core machine,
    two OpenMP threads competing with other processes were 5-10x slower than one.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    stream = torch.tensor([i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids])
    n_chunks = len(stream) // seq_len
    chunks = stream[: n_chunks * seq_len].view(n_chunks, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    # Linear warmup then linear decay to 10%: a short fit converges without a tuned schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, steps - warmup))
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    losses = []
    try:
        for step in range(steps):
            ids = chunks[torch.randint(n_chunks, (batch_size,), generator=g)]
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if log and (step + 1) % 25 == 0:
                log(f"tiny: fit step {step + 1}/{steps} loss {sum(losses[-25:]) / 25:.3f}")
    finally:
        torch.set_num_threads(threads)
        model.eval()
    tail = losses[-10:]
    return sum(tail) / len(tail)


def _build_params(**kw) -> dict:
    return {"version": _BUILD_VERSION, **kw}


# The tiny shape (build_tiny_target's defaults): head_dim 64, which vLLM's CPU build needs.
TINY_SHAPE = {"num_layers": 4, "hidden_size": 128, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 256,
              "vocab_size": 1024}  # fmt: skip


def tiny_llama_config(**overrides):
    """The tiny Llama's transformers `LlamaConfig`: `TINY_SHAPE` (each key overridable), head_dim =
    hidden_size / num_heads, 2048 positions, untied embeddings, no special tokens; any other LlamaConfig field
    in `overrides` is applied last.

    The one definition of the tiny shape: the fitted target (`build_tiny_target`), random targets in tests
    and benchmarks (e.g. `LlamaForCausalLM(tiny_llama_config(hidden_size=64))`).
    """
    from transformers import LlamaConfig

    shape = {**TINY_SHAPE, **{k: overrides.pop(k) for k in list(overrides) if k in TINY_SHAPE}}
    kw = {
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["hidden_size"] // shape["num_heads"],
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        **overrides,
    }
    return LlamaConfig(**kw)


def build_tiny_target(
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    seed: int = 0,
    fit_steps: int = 300,
    fit_batch_size: int = 8,
    fit_seq_len: int = 128,
    fit_lr: float = 5e-3,
    corpus_size: int = 4000,
    force: bool = False,
    log=None,
) -> Path:
    """Write a tiny, briefly fitted Llama target with its tokenizer and chat template to `out_dir` (atomic).

    An existing build with the same parameters is reused (and the reuse is logged); `force` rebuilds.
    Deterministic for a given seed on a given machine. Returns `out_dir`.
    """
    # Progress is a log, not a result: stderr, so callers that print tables on stdout stay parseable.
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    head_dim = hidden_size // num_heads
    if hidden_size % num_heads or head_dim < 64:
        raise ValueError(
            f"hidden_size/num_heads must be an integer >= 64 (vLLM's CPU build), got {hidden_size}/{num_heads}"
        )
    params = _build_params(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seed=seed,
        fit_steps=fit_steps,
        fit_batch_size=fit_batch_size,
        fit_seq_len=fit_seq_len,
        fit_lr=fit_lr,
        corpus_size=corpus_size,
    )
    if not force and _matching_build(out_dir, params):
        log(f"tiny: reusing the existing tiny target in {out_dir} (same build parameters; --force rebuilds)")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, helpers) may ask for the same build at once: one builds, the others
    # wait for it and reuse it.
    with exclusive_lock(out_dir.with_name(out_dir.name + ".lock"), 1800.0, f"another build of {out_dir}"):
        if not force and _matching_build(out_dir, params):
            log(f"tiny: reusing the tiny target another process just built in {out_dir}")
            return out_dir
        return _build(out_dir, params, log)


def _matching_build(out_dir: Path, params: dict) -> bool:
    marker = out_dir / _MARKER
    if not marker.is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("params") == params
    except (OSError, ValueError):
        return False


def _build(out_dir: Path, params: dict, log) -> Path:
    num_layers, hidden_size = params["num_layers"], params["hidden_size"]
    num_heads, vocab_size, seed = params["num_heads"], params["vocab_size"], params["seed"]
    fit_steps, fit_batch_size = params["fit_steps"], params["fit_batch_size"]
    fit_seq_len, fit_lr, corpus_size = params["fit_seq_len"], params["fit_lr"], params["corpus_size"]
    head_dim = hidden_size // num_heads
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    t0 = time.monotonic()
    rng = random.Random(seed)
    texts = [_render(make_conversation(rng)) for _ in range(corpus_size)]
    tokenizer = _train_tokenizer(texts, vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.pad_token_id

    shape = {k: params[k] for k in TINY_SHAPE}
    config = tiny_llama_config(
        **shape,  # vocab_size may exceed the tokenizer's size: padded rows, as real targets have
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    loss = _fit(
        model,
        tokenizer,
        texts,
        steps=fit_steps,
        batch_size=fit_batch_size,
        seq_len=fit_seq_len,
        seed=seed,
        lr=fit_lr,
        log=log,
    )

    with replace_dir_atomically(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False).save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"params": params, "fit_loss": loss}, indent=2) + "\n")
    log(
        f"tiny: wrote {out_dir} (Llama {num_layers}x{hidden_size}, head_dim {head_dim}, vocab {vocab_size}, "
        f"tokenizer {len(tokenizer)} tokens; fitted {fit_steps} steps to loss {loss:.3f} in {time.monotonic() - t0:.1f} s)"
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or reuse) the tiny target, and optionally write conversations of its language."""
    p = argparse.ArgumentParser(prog="python -m modelopt_ext.tiny", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Folder for the tiny target (reused when already built).")
    p.add_argument("--data", help="Also write conversations of the tiny language to this JSONL file.")
    p.add_argument("--num-conversations", type=int, default=DEFAULT_NUM_CONVERSATIONS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="Rebuild even when a matching build exists.")
    args = p.parse_args(argv)
    if args.num_conversations <= 0:
        print(f"error: --num-conversations must be > 0, got {args.num_conversations}", file=sys.stderr)
        return 2
    build_tiny_target(args.out, seed=args.seed, force=args.force)
    if args.data:
        write_tiny_conversations(args.data, args.num_conversations, seed=args.seed + 1)
        print(f"tiny: wrote {args.num_conversations} conversations to {args.data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
