"""Build the tiny local target: `python -m modelopt_ext.tiny --out DIR` (see `modelopt_ext.targets.tiny`)."""

from modelopt_ext.targets.tiny import main

if __name__ == "__main__":
    raise SystemExit(main())
