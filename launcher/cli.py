"""Command line: `uv run launch.py --yaml JOB.yaml [dotted.overrides=value ...] [--dryrun] [--yes] [--detach]`,
or `uv run launch.py --migrate MODELOPT_SPEC.yaml [--write]`.

Exit codes: 0 success; 1 a task failed or submission failed; 2 bad job spec or usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from modelopt_ext.util.errors import EXIT_BAD_INPUT, ConfigError

EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Validate a job spec and run it: on Slurm (sbatch via nemo_run) or on this machine.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--yaml", metavar="JOB.yaml", help="the job spec")
    what.add_argument(
        "--migrate",
        metavar="SPEC.yaml",
        help="print the equivalent of a Model-Optimizer launcher spec for this project (docs/migrating.md)",
    )
    p.add_argument(
        "--write", action="store_true", help="with --migrate: write SPEC.migrated.yaml next to SPEC instead"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="dotted overrides of the spec")
    p.add_argument("--dryrun", action="store_true", help="print the plan and exact scripts; submit nothing")
    p.add_argument("--yes", "-y", action="store_true", help="submit to Slurm without asking")
    p.add_argument("--detach", action="store_true", help="return once submitted (do not follow the jobs)")
    p.add_argument(
        "--job-dir", help="where runs, logs and scratch go (default: $MODELOPT_JOB_DIR, spec, runs/)"
    )
    p.add_argument(
        "--measured",
        metavar="METRICS.json",
        help="with --dryrun: a finished run's metrics.json; print how many serve nodes keep each streaming "
        "task's trainers fed at its measured rates (docs/scaling.md)",
    )
    p.add_argument("--run-id", help="name of this run's folder (default: a UTC timestamp)")
    return p


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> int:
    """Entry point of launch.py; returns the process exit code."""
    stdin = stdin or sys.stdin
    parser = _parser()
    args = parser.parse_args(argv)
    if args.migrate:
        return _migrate(args.migrate, args.write)
    if args.measured and not args.dryrun:
        print("error: --measured goes with --dryrun (sizing advice for the spec's plan)", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad_overrides = [o for o in args.overrides if "=" not in o]
    if bad_overrides:
        for o in bad_overrides:
            print(f"error: override {o!r}: expected KEY.PATH=VALUE", file=sys.stderr)
        return EXIT_BAD_INPUT

    from launcher.api import LaunchError, run_job  # after argparse: `--help` stays instant

    def echo(line: str) -> None:
        print(line, flush=True)

    try:
        checked = run_job(
            args.yaml, args.overrides, mode="validate", job_dir=args.job_dir, run_id=args.run_id
        )
        job = checked.job
        rates = None
        if args.measured:
            from launcher.sizing import load_rates

            rates = load_rates(args.measured)
        if args.dryrun:
            result = run_job(
                args.yaml, args.overrides, mode="dryrun", job_dir=args.job_dir, run_id=checked.run_id
            )
            _print_dryrun(result)
            if rates is not None:
                from launcher.sizing import advice_lines

                print()
                for line in advice_lines(job, rates, args.measured):
                    print(line)
            return 0
        if job.kind == "slurm" and not args.yes:
            _print_plan(checked)
            if not stdin.isatty():
                print(
                    "error: not submitting: stdin is not a terminal to confirm on; add --yes to submit "
                    "(or --dryrun to only print the scripts)",
                    file=sys.stderr,
                )
                return EXIT_BAD_INPUT
            where = job.tasks[0].slurm.host or "localhost"
            print(
                f"Submit {len(job.tasks)} task(s) of {job.name} to Slurm on {where}? [y/N] ",
                end="",
                flush=True,
            )
            if stdin.readline().strip().lower() not in ("y", "yes"):
                print("not submitted")
                return EXIT_FAILED
        if job.kind == "local":
            _print_plan(checked)
        result = run_job(
            args.yaml,
            args.overrides,
            mode="submit",
            detach=True if args.detach else None,
            job_dir=args.job_dir,
            run_id=checked.run_id,
            echo=echo,
        )
    except ConfigError as e:
        for line in e.lines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted (submitted Slurm jobs keep running; see squeue)", file=sys.stderr)
        return 130
    _print_summary(result)
    return 0 if result.ok else EXIT_FAILED


def _migrate(source: str, write: bool) -> int:
    from launcher.modelopt_compat import migrate, migrated_path, render
    from modelopt_ext.config.overrides import load_yaml_file
    from modelopt_ext.util.fileio import write_text_atomic

    try:
        data = load_yaml_file(source)
    except ConfigError as e:
        for line in e.lines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = render(migrate(data), source)
    if not write:
        print(text, end="")
        return 0
    out = migrated_path(source)
    write_text_atomic(out, text)
    print(f"wrote {out}; check it with: uv run launch.py --yaml {out} --dryrun")
    return 0


def _print_plan(result) -> None:
    job = result.job
    print(f"job {job.name} ({job.kind}), run {result.run_id}; tasks: {', '.join(t.name for t in job.tasks)}")
    if job.spec.pipeline.note:
        print(f"note: {job.spec.pipeline.note}")
    if job.spec.pipeline.skip:
        print("pipeline.skip is true: nothing will run")
    if job.skipped:
        print(f"skipped (skip: true): {', '.join(job.skipped)}")
    for t in result.tasks:
        print(f"[{t.name}] role plan:")
        for line in t.plan:
            print(f"  {line}")


def _print_dryrun(result) -> None:
    _print_plan(result)
    if result.job.spec.pipeline.skip:
        print("\ndry run: nothing rendered or submitted (pipeline.skip is true)")
        return
    for t in result.tasks:
        kind = "sbatch script" if t.kind == "slurm" else "local script"
        print(f"\n===== {t.name}: {kind} ({t.dryrun_script}) =====")
        if t.sbatch_command:
            print(f"# submitted with: {t.sbatch_command}")
        print(t.script_text.rstrip("\n"))
        if t.inline_script:
            print(f"\n----- {t.name}: inline script it runs ({t.inline_script[0]}) -----")
            print(t.inline_script[1].rstrip("\n"))
    print(f"\ndry run: nothing submitted; scripts written to {result.dryrun_dir}")


def _print_summary(result) -> None:
    if result.detached:
        ids = ", ".join(f"{k}={v}" for k, v in result.job_ids.items())
        print(f"detached: submitted {ids}; follow with: squeue -j {','.join(result.job_ids.values())}")
    else:
        print("summary:")
    for t in result.tasks:
        jid = f" job {t.job_id}" if t.job_id else ""
        code = f" exit {t.exit_code}" if t.exit_code and t.exit_code not in ("0:0", "") else ""
        why = f": {t.reason}" if t.reason and t.reason != "None" and not t.ok else ""
        print(f"  {t.name}{jid}: {t.state}{code}{why}")
        for p in t.log_paths:
            print(f"    log: {p}")
    print(f"scratch: {result.scratch_dir}")
