"""Fixtures for the data tests: the tiny language's tokenizer (trained locally, no fitting, no hub)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The tiny target's byte-level BPE tokenizer, trained once per session and saved."""
    from modelopt_ext.targets.tiny import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out, corpus_size=1000)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded through AutoTokenizer, as users load it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer(tiny_tokenizer_dir, tmp_path_factory):
    """The same BPE with Llama-3-style special tokens added (for the Llama-3-like template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    out = tmp_path_factory.mktemp("tok3")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)
