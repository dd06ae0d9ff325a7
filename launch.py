"""Launch a job spec: `uv run launch.py --yaml JOB.yaml [dotted.overrides=value ...] [--dryrun] [--yes] [--detach]`.

Thin entry point; the launcher lives in launcher/ (see docs/launcher.md).
"""

from launcher.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
