"""Make a node's Python able to run this project (argument parsing over modelopt_ext/deploy/node_env.py).

Pure standard library: this runs before anything else is importable.

    python -m modelopt_ext.provision node --env-root DIR [--wheelhouse DIR] [--timeout S]   # prints the python
                                                      # to use instead of this one (nothing: this one is fine)
    python -m modelopt_ext.provision check                                                  # what is missing
    python -m modelopt_ext.provision wheelhouse --dest DIR                                  # for offline nodes
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelopt_ext.deploy.node_env import (
    DEFAULT_TIMEOUT_S,
    ProvisionError,
    ensure_node_python,
    fill_wheelhouse,
    log,
    missing_requirements,
    node_requirements,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelopt_ext.provision", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    node = sub.add_parser(
        "node", help="print the Python to use instead of this one (building it if needed); nothing: this one"
    )
    node.add_argument("--env-root", required=True, help="shared folder for node environments (job scratch)")
    node.add_argument("--wheelhouse", default=os.environ.get("NODE_WHEELHOUSE") or None,
                      help="install from this folder only (default: $NODE_WHEELHOUSE; unset: the package index)")
    node.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the whole build")
    check = sub.add_parser("check", help="list what this Python lacks; exit 1 when something does")
    check.add_argument("--quiet", action="store_true")
    wh = sub.add_parser("wheelhouse", help="download what `node` would install, for offline nodes")
    wh.add_argument("--dest", required=True)
    wh.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "node":
            wheelhouse = Path(args.wheelhouse) if args.wheelhouse else None
            chosen = ensure_node_python(Path(args.env_root), wheelhouse, args.timeout)
            # Nothing missing: print nothing, so the caller keeps the interpreter exactly as it named it
            # (a wrapper script or a symlink stays what it is).
            if chosen != Path(sys.executable):
                print(chosen)
        elif args.cmd == "check":
            missing = missing_requirements(node_requirements())
            if not args.quiet:
                print("\n".join(missing) if missing else f"{sys.executable}: nothing missing")
            return 1 if missing else 0
        else:
            pins = fill_wheelhouse(Path(args.dest), args.timeout)
            print(f"{len(pins)} wheel(s) in {args.dest}" + (f": {' '.join(pins)}" if pins else " (nothing missing)"))
    except ProvisionError as e:
        log(f"error: {e}")
        return 2
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
