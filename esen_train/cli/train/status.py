"""Where a run is: `esen-train status RUN [--json]` prints its state, stage, step, metrics,
best checkpoint and time left (or RUN/status.json with --json)."""
from __future__ import annotations

import argparse
import json

from esen_train.cli.common import fail
from esen_train.engine.status import StatusError, format_status, read_status

HELP = "where a run is: state, stage, step, metrics, best checkpoint, time left"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="run directory")
    parser.add_argument("--json", action="store_true", help="print RUN/status.json (with process_alive) instead")


def run(args: argparse.Namespace) -> int:
    try:
        status = read_status(args.run_dir)
    except StatusError as error:
        return fail("esen-train status", error)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
