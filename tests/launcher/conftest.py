"""Helpers for launcher tests: write small job specs to a tmp folder; run the CLI in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def write_spec(tmp_path: Path):
    """write_spec(dict_or_yaml_text) -> path of a job spec file in tmp_path."""
    counter = iter(range(1000))

    def write(spec) -> Path:
        path = tmp_path / f"spec{next(counter)}.yaml"
        text = textwrap.dedent(spec) if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False)
        path.write_text(text)
        return path

    return write


REPO_ROOT = Path(__file__).resolve().parents[2]


def _cli_reporting_torch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`launcher.cli.main(args)` in a fresh interpreter; its stdout ends with TORCH_IMPORTED=True|False (did
    the run import torch or transformers?)."""
    code = textwrap.dedent(
        f"""
        import sys
        from launcher.cli import main
        rc = main({args!r})
        print("TORCH_IMPORTED=" + str("torch" in sys.modules or "transformers" in sys.modules))
        sys.exit(rc)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=240,
        check=False,
    )  # fmt: skip


@pytest.fixture
def cli_reporting_torch():
    """cli_reporting_torch(args, env) -> CompletedProcess (see _cli_reporting_torch)."""
    return _cli_reporting_torch
