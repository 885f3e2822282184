"""Command line: ``python -m medexgen_lib run --profile demo [--from NN] [--to NN] [-p key value]``."""

from __future__ import annotations

import argparse
import logging
import sys

from medexgen_lib.config import ConfigError
from medexgen_lib.pipeline import StageFailed, format_summary, run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medexgen_lib",
                                     description="MedExGen: chest X-ray report generation")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the numbered notebooks headless with papermill")
    run.add_argument("--profile", default="demo", help="config preset: demo or full")
    run.add_argument("--from", dest="start", help="first stage to run, e.g. 03")
    run.add_argument("--to", dest="stop", help="last stage to run, e.g. 05")
    run.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                     help="config override, e.g. -p data.n_phantom_studies 200")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    try:
        results = run_pipeline(args.profile, dict(args.p), args.start, args.stop)
    except (StageFailed, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
