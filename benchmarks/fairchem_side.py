"""fairchem-core's eSEN as one side of benchmarks/model_vs_fairchem.py.

    .venvs/fairchem/bin/python benchmarks/fairchem_side.py   # a case server: see case_server.py

Runs inside fairchem-core's own virtualenv (the driver creates it), where esen_train is
not importable. fairchem-core 2.x has eSEN as `eSCNMDBackbone` (models/uma/escn_md.py),
the backbone of its eSEN and UMA models, with the heads its eSEN recipes use:
- direct: `MLP_Energy_Head` + `Linear_Force_Head` (an SO(3) linear map of l = 0, 1);
- conservative: `MLP_EFS_Head`, forces (and stress, from the position and cell
  gradients) by autograd, `create_graph` when in training mode.
The graph is the driver's (otf_graph=False), the same edges our model gets, and the
execution backend is fairchem's "general" one, the one it trains with.
"""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import case_server  # noqa: E402
from fairchem.core.datasets.atomic_data import AtomicData  # noqa: E402
from fairchem.core.models.uma.escn_md import (  # noqa: E402
    Linear_Force_Head,
    MLP_EFS_Head,
    MLP_Energy_Head,
    eSCNMDBackbone,
)


def backbone(hyper: dict, direct: bool, stress: bool) -> eSCNMDBackbone:
    """The driver's hyperparameters (our ModelConfig's names) in fairchem's names, with the
    normalisation and activation our model has."""
    return eSCNMDBackbone(
        max_num_elements=hyper["max_num_elements"],
        sphere_channels=hyper["sphere_channels"],
        hidden_channels=hyper["hidden_channels"],
        edge_channels=hyper["edge_channels"],
        lmax=hyper["lmax"],
        mmax=hyper["mmax"],
        num_layers=hyper["num_layers"],
        num_distance_basis=hyper["num_radial_basis"],
        cutoff=hyper["cutoff"],
        norm_type="rms_norm_sh",
        act_type="gate",
        ff_type=hyper["feed_forward"],
        otf_graph=False,
        direct_forces=direct,
        regress_forces=True,
        regress_stress=stress and not direct,
        use_dataset_embedding=False,
    )


class FairchemESEN(nn.Module):
    """Backbone and heads; returns the same dict as our model."""

    def __init__(self, hyper: dict, direct: bool, stress: bool) -> None:
        super().__init__()
        self.direct = direct
        self.backbone = backbone(hyper, direct, stress)
        if direct:
            self.energy_head = MLP_Energy_Head(self.backbone)
            self.force_head = Linear_Force_Head(self.backbone)
        else:
            self.head = MLP_EFS_Head(self.backbone, wrap_property=False)

    def forward(self, data: AtomicData) -> dict:
        embedding = self.backbone(data)
        if self.direct:
            out = {"energy": self.energy_head(data, embedding)["energy"]}
            out["forces"] = self.force_head(data, embedding)["forces"]
            return out
        return {key: value for key, value in self.head(data, embedding).items() if key != "embeddings"}


def atomic_data(arrays: dict[str, np.ndarray], device: str) -> AtomicData:
    natoms = torch.from_numpy(arrays["natoms"])
    num_atoms = int(natoms.sum())
    return AtomicData(
        **case_server.batch_tensors(arrays, device),
        nedges=torch.from_numpy(arrays["nedges"]).to(device),
        charge=torch.zeros(len(natoms), dtype=torch.long, device=device),
        spin=torch.zeros(len(natoms), dtype=torch.long, device=device),
        fixed=torch.zeros(num_atoms, dtype=torch.long, device=device),
        tags=torch.zeros(num_atoms, dtype=torch.long, device=device),
        sid=[str(i) for i in range(len(natoms))],
    )


def build(case: dict, arrays: dict[str, np.ndarray]) -> tuple[nn.Module, case_server.Predict]:
    model = FairchemESEN(case["model"], direct=case["mode"] == "direct", stress=case["stress"]).to(case["device"])
    data = atomic_data(arrays, case["device"])

    def predict() -> dict:
        return model(data)

    return model, predict


if __name__ == "__main__":
    case_server.main(build, {"fairchem-core": version("fairchem-core")})
