"""The `esen-train import-fairchem` and `esen-train export-fairchem` subcommands.

    esen-train import-fairchem FAIRCHEM_CHECKPOINT --out DIR [--overwrite]
    esen-train export-fairchem CHECKPOINT --out FILE [--dataset NAME] [--overwrite]

import-fairchem writes a checkpoint directory (model.pt, import.json) that eval, md, the
calculator and <stage>.init_from read; export-fairchem writes a fairchem-core 2.x checkpoint
(an eSCNMD model) that fairchem's `load_predict_unit` / FAIRChemCalculator read. A file or
model that cannot be converted exactly ends the command with a one-line message naming
what, and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esen_train.evaluation.checkpoint import CheckpointError
from esen_train.fairchem.files import FairchemFormatError

INPUT_ERRORS = (FairchemFormatError, CheckpointError, FileExistsError, FileNotFoundError)


def add_import_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("import-fairchem", help="a fairchem eSEN checkpoint as a checkpoint of this project")
    parser.add_argument("checkpoint", help="fairchem checkpoint file (.pt): eSEN v1 (fairchem-core 1.x) or eSCNMD (2.x)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write (model.pt, import.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run_import)
    return parser


def run_import(args: argparse.Namespace) -> int:
    from esen_train.fairchem.importer import import_fairchem, write_imported

    try:
        imported = import_fairchem(args.checkpoint)
        out = write_imported(imported, Path(args.out), overwrite=args.overwrite)
    except INPUT_ERRORS as error:
        return _fail("import-fairchem", error)
    summary = imported.summary
    print(f"imported {summary['format']} ({summary['stage']}, {summary['parameters']:,} parameters, "
          f"{summary['used_weights']} weights used for inference) into {out}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    print(f"  settings and normalisation: {out / 'import.json'}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export-fairchem", help="a checkpoint as a fairchem-core 2.x (eSCNMD) checkpoint")
    parser.add_argument("checkpoint", help="checkpoint directory, or run directory (its last stage's best)")
    parser.add_argument("--out", required=True, help="fairchem checkpoint file to write (.pt)")
    parser.add_argument("--dataset", help="dataset name of its tasks, the task_name of fairchem's calculator "
                                          "(default: the imported model's own, else esen_train)")
    parser.add_argument("--max-neighbors", type=int, help="fairchem's cap on neighbours per atom (default: the "
                                                          "imported model's own, else fairchem's 300)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    from esen_train.fairchem.exporter import export_fairchem
    from esen_train.fairchem.files import write_inference_checkpoint

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        exported = export_fairchem(args.checkpoint, dataset=args.dataset, max_neighbors=args.max_neighbors)
        write_inference_checkpoint(exported, out)
    except INPUT_ERRORS as error:
        return _fail("export-fairchem", error)
    dataset = exported.tasks_config[0]["datasets"][0]
    kind = "direct" if exported.model_config["backbone"]["direct_forces"] else "conservative"
    print(f"wrote {out}: fairchem-core 2.x eSCNMD checkpoint ({kind}); load it with "
          f"fairchem.core.units.mlip_unit.load_predict_unit({str(out)!r}) and FAIRChemCalculator(unit, task_name={dataset!r})")
    return 0


def _fail(command: str, error: Exception) -> int:
    print(f"esen-train {command}: {error}", file=sys.stderr)
    return 2
