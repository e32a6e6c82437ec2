"""A fairchem eSEN checkpoint as a checkpoint of this project.

    esen-train import-fairchem FAIRCHEM_CHECKPOINT --out DIR [--overwrite]

Writes a checkpoint directory (model.pt, import.json) that eval, md, the calculator and
<stage>.init_from read. A file or model that cannot be converted exactly ends the command with
a one-line message naming what, and exit code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from esen_train.cli.common import fail
from esen_train.fairchem.files import FairchemFormatError
from esen_train.model.model_file import CheckpointError

HELP = "a fairchem eSEN checkpoint as a checkpoint of this project"
INPUT_ERRORS = (FairchemFormatError, CheckpointError, FileExistsError, FileNotFoundError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="fairchem checkpoint file (.pt): eSEN v1 (fairchem-core 1.x) or eSCNMD (2.x)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (model.pt, import.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from esen_train.fairchem.importer import import_fairchem, write_imported

    try:
        imported = import_fairchem(args.checkpoint)
        out = write_imported(imported, Path(args.out), overwrite=args.overwrite)
    except INPUT_ERRORS as error:
        return fail("esen-train import-fairchem", error)
    summary = imported.summary
    print(f"imported {summary['format']} ({summary['stage']}, {summary['parameters']:,} parameters, "
          f"{summary['used_weights']} weights used for inference) into {out}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    print(f"  settings and normalisation: {out / 'import.json'}")
    return 0
