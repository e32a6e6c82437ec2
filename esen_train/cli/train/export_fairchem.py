"""A checkpoint as a fairchem-core 2.x (eSCNMD) checkpoint.

    esen-train export-fairchem CHECKPOINT --out FILE [--dataset NAME] [--max-neighbors N] [--overwrite]

Writes a fairchem-core 2.x checkpoint (an eSCNMD model) that fairchem's `load_predict_unit` /
FAIRChemCalculator read. A model that cannot be converted exactly ends the command with a
one-line message naming what, and exit code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from esen_train.cli.common import fail
from esen_train.fairchem.files import FairchemFormatError
from esen_train.model.model_file import CheckpointError

HELP = "a checkpoint as a fairchem-core 2.x (eSCNMD) checkpoint"
INPUT_ERRORS = (FairchemFormatError, CheckpointError, FileExistsError, FileNotFoundError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or run directory (its last stage's best)")
    parser.add_argument("--out", required=True, help="fairchem checkpoint file to write (.pt)")
    parser.add_argument("--dataset", help="dataset name of its tasks, the task_name of fairchem's calculator "
                                          "(default: the imported model's own, else esen_train)")
    parser.add_argument("--max-neighbors", type=int, help="fairchem's cap on neighbours per atom (default: the "
                                                          "imported model's own, else fairchem's 300)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from esen_train.fairchem.exporter import export_fairchem
    from esen_train.fairchem.files import write_inference_checkpoint

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        exported = export_fairchem(args.checkpoint, dataset=args.dataset, max_neighbors=args.max_neighbors)
        write_inference_checkpoint(exported, out)
    except INPUT_ERRORS as error:
        return fail("esen-train export-fairchem", error)
    dataset = exported.tasks_config[0]["datasets"][0]
    kind = "direct" if exported.model_config["backbone"]["direct_forces"] else "conservative"
    print(f"wrote {out}: fairchem-core 2.x eSCNMD checkpoint ({kind}); load it with "
          f"fairchem.core.units.mlip_unit.load_predict_unit({str(out)!r}) and FAIRChemCalculator(unit, task_name={dataset!r})")
    return 0
