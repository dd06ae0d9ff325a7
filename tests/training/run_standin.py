"""Entry point for multi-process tests: the real train CLI flow over the stand-in parts.

Usage: python tests/training/run_standin.py --config RECIPE.yaml [overrides ...] [--resume auto]
(also under `accelerate launch --multi_gpu --num_processes 2`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin import standin_parts

from modelopt_ext.config.recipe import load_recipe
from modelopt_ext.train import parse_args
from modelopt_ext.training.trainer import train

if __name__ == "__main__":
    args = parse_args()
    train(load_recipe(args.config, args.overrides), parts_factory=standin_parts, resume=args.resume)
