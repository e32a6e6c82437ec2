"""Our eSEN as one side of benchmarks/model_vs_fairchem.py (runs with the project's Python).

    python benchmarks/esen_side.py     # a case server: see case_server.py

The batch arrives as arrays (model_vs_fairchem.write_batches) and is turned into the
torch_geometric batch of ARCHITECTURE.md, the one the loader gives the model.
esen_train is imported from this checkout, or from ESEN_TRAIN_SOURCE when the driver
benchmarks a commit (--ours-commit; it exports that commit's esen_train there and names
it in ESEN_TRAIN_COMMIT).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, os.environ.get("ESEN_TRAIN_SOURCE", str(REPO)))
import case_server  # noqa: E402
from esen_train.model import ESEN, ModelConfig  # noqa: E402


def model_config(hyper: dict, direct_forces: bool) -> ModelConfig:
    """The driver's hyperparameters (ModelConfig's fields) as a ModelConfig."""
    return ModelConfig(**hyper, direct_forces=direct_forces)


def batch_of(arrays: dict[str, np.ndarray], device: str) -> Data:
    return Data(**case_server.batch_tensors(arrays, device))


def model_version() -> str:
    """The commit benchmarked, or the checkout's last commit of esen_train/model and
    whether its files differ from it."""
    if "ESEN_TRAIN_COMMIT" in os.environ:
        return os.environ["ESEN_TRAIN_COMMIT"]
    model_dir = REPO / "esen_train" / "model"
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", model_dir], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", model_dir], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    return f"{commit or 'unknown'}{' + uncommitted changes' if changed else ''}"


def build(case: dict, arrays: dict[str, np.ndarray]) -> tuple[torch.nn.Module, case_server.Predict]:
    direct = case["mode"] == "direct"
    model = ESEN(model_config(case["model"], direct_forces=direct)).to(case["device"])
    batch = batch_of(arrays, case["device"])
    forces = "direct" if direct else "conservative"

    def predict() -> dict:
        return model(batch, forces=forces, stress=case["stress"], create_graph=model.training)

    return model, predict


if __name__ == "__main__":
    case_server.main(build, {"esen_train.model": model_version()})
