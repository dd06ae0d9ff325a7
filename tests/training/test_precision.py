"""Precision: fp32 on CPU by default, bf16 autocast when asked (the GPU default), fp32 master weights."""

import math

import torch
from safetensors.torch import load_file
from standin import standin_parts

from modelopt_ext.config.recipe import parse_recipe
from modelopt_ext.training.trainer import resolve_autocast, train


def test_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_autocast("auto", torch.device("cpu")) is None
    assert resolve_autocast("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_autocast("float32", torch.device("cuda", 0)) is None
    assert resolve_autocast("bfloat16", torch.device("cpu")) is torch.bfloat16


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path, capsys):
    recipe = parse_recipe(
        {
            "model": {"path": "standin"},
            "data": {"path": "standin.jsonl"},
            "training": {
                "output_dir": str(tmp_path),
                "max_steps": 3,
                "batch_size": 2,
                "dtype": "bfloat16",
                "save_interval": 3,
                "lr": 0.01,
            },
        }
    )
    result = train(recipe, standin_parts)
    assert "bf16 autocast" in capsys.readouterr().out
    assert math.isfinite(result.metrics["loss"])
    weights = load_file(str(result.checkpoint / "model.safetensors"))
    assert weights["fc.weight"].dtype == torch.float32
