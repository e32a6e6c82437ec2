"""Error tables and parity plots of a checkpoint on labelled data.

    esen-train eval CHECKPOINT --data DIR_OR_FILE... [--predictions FILE.extxyz] [--json] [--out DIR] [--quiet]
                    [--energy-key K] [--forces-key K] [--stress-key K] [--config-type-key K] [--wandb]

CHECKPOINT is a checkpoint directory or a run directory (its last stage's best checkpoint).
Without --forces a checkpoint is used the way its stage trained it: direct forces for a
direct-stage checkpoint, conservative otherwise. Prints a table, or one JSON object with
--json, and writes parity.png and errors.json to --out; with --wandb it also adds its plot,
table and numbers to the wandb run of the checkpoint's run directory. The data is streamed (read,
checked, predicted and tallied a batch at a time). Progress goes to stderr (a bar on a terminal,
a line per tenth in a file; --quiet: none). Errors in the input (a structure with overlapping
atoms, a cell in the wrong unit, an element the checkpoint was not trained on, ...) end the
command with a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from esen_train.cli.common import add_label_key_arguments, fail, label_keys
from esen_train.evaluation.calculator import FORCE_MODES, ESENCalculator
from esen_train.evaluation.errors import error_table_rows, format_error_table
from esen_train.evaluation.workflow import (
    DTYPES,
    INPUT_ERRORS,
    describe,
    evaluate,
    load_calculator,
    log_to_wandb,
    write_json,
)
from esen_train.plots import plot_parity

HELP = "error tables and parity plots of a checkpoint on labelled data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default_dtype="float32")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR_OR_FILE",
                        help="dataset directories (esen-data) or ASE-readable files; errors are tabled per dataset too")
    parser.add_argument("--predictions", metavar="FILE.extxyz",
                        help="write each structure with its reference (REF_*) and predicted (ESEN_*) labels")
    parser.add_argument("--max-atoms", type=int, default=512, help="atoms per forward pass (default 512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", default="eval", help="directory for parity.png and errors.json (default ./eval)")
    add_label_key_arguments(parser, fields=("energy", "forces", "stress", "config_type"))


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    """The checkpoint and how to run it (`eval` and `md`)."""
    parser.add_argument("checkpoint", help="checkpoint directory, or run directory (its last stage's best)")
    parser.add_argument("--forces", choices=FORCE_MODES, default=None,
                        help="force head (default: the checkpoint stage's own: direct or conservative)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                        help=f"model precision (default {default_dtype})")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the results to the wandb run of the checkpoint's run directory")


def torch_device(text: str) -> str:
    """argparse type: a device name torch knows and this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({str(error).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__}, "
                                         f"built {'with' if torch.version.cuda else 'without'} CUDA)")
    return text


def calculator_of(args: argparse.Namespace) -> ESENCalculator:
    return load_calculator(args.checkpoint, args.forces, args.device, args.dtype, use_ema=not args.no_ema)


def run(args: argparse.Namespace) -> int:
    try:
        calculator = calculator_of(args)
        metrics, reservoir = evaluate(calculator, args.data, label_keys(args), args.max_atoms, args.predictions,
                                      progress=not args.quiet)
    except INPUT_ERRORS as error:
        return fail("esen-train eval", error)
    out = Path(args.out)
    names = ", ".join(Path(path).name for path in args.data)
    plot = plot_parity(reservoir.panels(), out / "parity.png", title=f"{names}: {calculator.forces_mode} forces")
    report = {**describe(calculator, args.dtype), "data": list(args.data), **metrics, "parity_plot": str(plot),
              "predictions": args.predictions}
    write_json(report, out / "errors.json")
    if args.wandb:
        log_to_wandb("eval", calculator, images={"eval/parity": plot}, tables={"eval/errors": error_table_rows(metrics)},
                     summary={f"eval/{key}": value for key, value in metrics.items()})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"checkpoint {report['checkpoint']} ({calculator.forces_mode} forces) on {names}")
        print(format_error_table(metrics))
        print(f"parity plot: {plot}")
        if args.predictions:
            print(f"predictions: {args.predictions}")
    return 0
