"""Serving: vLLM/SGLang launchers, vLLM environment and hidden-state servers."""
