"""RoPE settings of a config dict, in either transformers generation's spelling (shared by the drafters)."""

from __future__ import annotations


def rope_from_dict(g: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) config dict."""
    params = g.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", g.get("rope_theta", 10000.0)))
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(g.get("rope_theta", 10000.0))
        rest = dict(g.get("rope_scaling") or {})
    if "type" in rest and "rope_type" not in rest:
        rest["rope_type"] = rest.pop("type")
    if rest.get("rope_type", "default") == "default" and set(rest) <= {"rope_type"}:
        return theta, None
    return theta, rest
