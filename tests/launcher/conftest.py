"""Helpers for launcher tests: write small job specs to a tmp folder."""

from __future__ import annotations

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
