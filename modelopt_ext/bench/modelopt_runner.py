"""nvidia-modelopt's EAGLE-3 training, run by bench/vs_modelopt.py INSIDE modelopt's own environment.

Standalone on purpose (imports only torch, transformers and modelopt, never modelopt_ext): it runs under the
comparison venv's interpreter. It follows Model-Optimizer's examples/speculative_decoding flow through the
public API: load the target, `modelopt.torch.speculative.convert(model, [("eagle", cfg)])`, train with a
plain `transformers.Trainer`, export with `modelopt.torch.export.export_speculative_decoding`.

    python modelopt_runner.py SPEC.json      # prints one JSON line of figures last

SPEC keys: target, pad_to, data (a torch file of {"items": [{"input_ids", "loss_mask"}...]} written by vs_modelopt),
batch_size, steps, warmup, ttt_steps, lr, step_decay, aux_ids_0based, arch (eagle_architecture_config
overrides), compile (bool), device, export_dir, seed, threads.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(spec_path: str) -> int:
    """Train, export, print the figures as the last line (JSON)."""
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    import modelopt.torch.speculative as mtsp
    from modelopt.torch.export import export_speculative_decoding
    from modelopt.torch.speculative.config import eagle3_default_config
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    device = spec["device"]
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["target"], dtype=torch.float32)
    arch = {
        **eagle3_default_config,
        **spec["arch"],
        "eagle_aux_hidden_state_layer_ids": spec["aux_ids_0based"],
    }
    cfg = {
        "eagle_decoder_type": "llama",
        "eagle_offline": False,
        "eagle_ttt_steps": spec["ttt_steps"],
        "eagle_loss_decay_factor": spec["step_decay"],
        "eagle_use_torch_compile": bool(spec["compile"]),
        # Training used plain RoPE; the default export writes a YaRN rope_scaling (docs/benchmarks.md).
        "eagle_export_rope_scaling": {},
        "eagle_architecture_config": arch,
    }
    mtsp.convert(model, [("eagle", cfg)])
    items = torch.load(spec["data"], weights_only=True)["items"]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    real_tokens: list[int] = []
    widths: list[int] = []

    def collate(batch):
        # pad_to = data.max_length: fixed width, as Model-Optimizer's example collator pads to
        # training_seq_len. pad_to = 0: the batch's longest row, the same tensors our trainer sees (its TTT
        # masks are cached per TTT step for one length: the Clock callback clears them every step).
        width = spec["pad_to"] or max(len(b["input_ids"]) for b in batch)
        real_tokens.append(sum(len(b["input_ids"]) for b in batch))
        widths.append(width * len(batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        am = torch.zeros(len(batch), width, dtype=torch.long)
        lm = torch.zeros(len(batch), width, dtype=torch.long)
        for r, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[r, :n], am[r, :n], lm[r, :n] = b["input_ids"], 1, b["loss_mask"].long()
        return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}

    marks: list[float] = []
    cpu_marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not spec["pad_to"]:
                for m in model.modules():
                    if isinstance(getattr(m, "_cached_attn_blk_masks", None), dict):
                        m._cached_attn_blk_masks.clear()

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())

    total = spec["warmup"] + spec["steps"]
    args = TrainingArguments(
        output_dir=spec["export_dir"] + "-trainer",
        max_steps=total,
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,  # the Trainer's default, set here because vs_modelopt sets ours to the same
        weight_decay=0.0,
        logging_steps=max(1, total),
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not device.startswith("cuda"),
        bf16=bool(spec.get("bf16")),
        seed=spec["seed"],
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    trainer = Trainer(
        model=model, args=args, train_dataset=Data(), data_collator=collate, callbacks=[Clock()]
    )
    trainer.train()
    wall = time.perf_counter() - t_start
    w = spec["warmup"]
    measured = marks[-1] - marks[w - 1]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = "process RSS"
    model.eval()
    export_speculative_decoding(model, dtype=torch.float32, export_dir=spec["export_dir"])
    print(
        json.dumps(
            {
                "samples_per_s": spec["steps"] * spec["batch_size"] / measured,
                "samples_per_cpu_s": spec["steps"] * spec["batch_size"] / (cpu_marks[-1] - cpu_marks[w - 1]),
                "measured_s": measured,
                "first_step_s": marks[0] - t_start,
                "wall_s": wall,
                "peak_mb": peak,
                "peak_kind": kind,
                "padding_waste": 1 - sum(real_tokens) / sum(widths),
                "export_dir": spec["export_dir"],
                "modelopt_version": __import__("modelopt").__version__,
                "transformers_version": __import__("transformers").__version__,
                "torch_version": torch.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
