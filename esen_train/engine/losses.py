"""Training loss and validation errors.

Loss terms follow the eSEN paper: per-atom energy MAE, per-atom force L2 norm, stress MAE.
Each term is a sum over this rank's batch divided by the count over the *global* batch
(all ranks), times the world size because DDP, FSDP and ZeRO average gradients over ranks.
So the gradient equals one process's on the whole global batch, whatever the rank count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from esen_train.engine import distributed

# Force vectors shorter than this (eV/Å) have no direction to compare (the same rule as
# `esen-train eval`): atoms without neighbours, whose forces are zero, are left out of the cosine.
COSINE_MIN_FORCE = 1e-6


@dataclass
class LossWeights:
    energy: float
    forces: float
    stress: float


def batch_counts(batch) -> Tensor:
    """Local counts [structures, atoms, structures with stress] as a float64 tensor."""
    return torch.tensor(
        [batch.natoms.numel(), batch.natoms.sum().item(), batch.has_stress.sum().item()],
        dtype=torch.float64,
    )


def error_sums(out: dict[str, Tensor], batch) -> dict[str, Tensor]:
    """Summed per-structure / per-atom errors of one batch (differentiable)."""
    natoms = batch.natoms.to(out["energy"].dtype)
    sums = {"energy": ((out["energy"] - batch.energy).abs() / natoms).sum()}
    if "forces" in out:
        sums["forces"] = torch.linalg.vector_norm(out["forces"] - batch.forces, dim=-1).sum()
    if "stress" in out:
        stress_error = (out["stress"] - batch.stress).abs().mean(dim=(-2, -1))
        sums["stress"] = (stress_error * batch.has_stress).sum()
    return sums


def training_loss(
    out: dict[str, Tensor], batch, weights: LossWeights, global_counts: Tensor, world_size: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to backpropagate on this rank, and this rank's share of the logged
    global-batch means (summed over ranks, each share gives the global value)."""
    sums = error_sums(out, batch)
    structures, atoms, stressed = (max(c, 1.0) for c in global_counts.tolist())
    loss = weights.energy * sums["energy"] / structures
    shares = {"energy_mae_mev_per_atom": 1000 * sums["energy"].detach() / structures}
    if "forces" in sums:
        loss = loss + weights.forces * sums["forces"] / atoms
        component_error = (out["forces"].detach() - batch.forces).abs().sum()
        shares["force_mae_mev_per_A"] = 1000 * component_error / (3 * atoms)
    if "stress" in sums and global_counts[2] > 0:
        loss = loss + weights.stress * sums["stress"] / stressed
        shares["stress_mae_mev_per_A3"] = 1000 * sums["stress"].detach() / stressed
    shares["loss"] = loss.detach()
    return loss * world_size, shares


class ErrorAccumulator:
    """Accumulates validation errors over batches and ranks; reports meV units."""

    def __init__(self) -> None:
        # energy_abs/atom, force_abs, force_cos, stress_abs, structures, atoms, force_rows, stress_count,
        # cosine_rows
        self.totals = torch.zeros(9, dtype=torch.float64)

    @torch.no_grad()
    def add(self, out: dict[str, Tensor], batch) -> None:
        natoms = batch.natoms.to(torch.float64)
        energy_error = (out["energy"].double() - batch.energy.double()).abs() / natoms
        self.totals[0] += energy_error.sum()
        self.totals[4] += natoms.numel()
        self.totals[5] += natoms.sum()
        if "forces" in out:
            predicted, target = out["forces"].double(), batch.forces.double()
            self.totals[1] += (predicted - target).abs().sum()
            self.totals[6] += predicted.shape[0]
            directed = (predicted.norm(dim=-1) > COSINE_MIN_FORCE) & (target.norm(dim=-1) > COSINE_MIN_FORCE)
            self.totals[2] += torch.nn.functional.cosine_similarity(predicted[directed], target[directed], dim=-1).sum()
            self.totals[8] += directed.sum()
        if "stress" in out:
            mask = batch.has_stress
            self.totals[3] += (out["stress"].double() - batch.stress.double())[mask].abs().sum()
            self.totals[7] += mask.sum() * 9

    def result(self) -> dict[str, float]:
        totals = distributed.all_reduce_sum(self.totals.clone())
        result = {"energy_mae_mev_per_atom": 1000 * (totals[0] / totals[4]).item()}
        if totals[6] > 0:
            result["force_mae_mev_per_A"] = 1000 * (totals[1] / (3 * totals[6])).item()
        if totals[8] > 0:
            result["force_cosine"] = (totals[2] / totals[8]).item()
        if totals[7] > 0:
            result["stress_mae_mev_per_A3"] = 1000 * (totals[3] / totals[7]).item()
        return result


class ParitySample:
    """Reference and predicted values of the first validation structures this rank sees, for a
    parity plot: batches are kept until `max_atoms` atoms, so a large validation set costs
    little memory. `panels()` gives energy per atom, force components and, where labelled,
    stress components as (label, reference, predicted) arrays (`esen_train.plots.plot_parity`)."""

    def __init__(self, max_atoms: int = 20_000) -> None:
        self.max_atoms = max_atoms
        self.atoms = 0
        self.pairs: dict[str, tuple[list, list]] = {"energy": ([], []), "forces": ([], []), "stress": ([], [])}

    @torch.no_grad()
    def add(self, out: dict[str, Tensor], batch) -> None:
        if self.atoms >= self.max_atoms:
            return
        self.atoms += int(batch.natoms.sum())
        natoms = batch.natoms.double()
        self._keep("energy", batch.energy.double() / natoms, out["energy"].double() / natoms)
        if "forces" in out:
            self._keep("forces", batch.forces, out["forces"])
        if "stress" in out and batch.has_stress.any():
            self._keep("stress", batch.stress[batch.has_stress], out["stress"][batch.has_stress])

    def _keep(self, name: str, reference: Tensor, predicted: Tensor) -> None:
        references, predictions = self.pairs[name]
        references.append(reference.detach().double().cpu().numpy())
        predictions.append(predicted.detach().double().cpu().numpy())

    def panels(self) -> list[tuple]:
        labels = {"energy": "energy (eV/atom)", "forces": "force components (eV/Å)", "stress": "stress components (eV/Å³)"}
        return [(labels[name], np.concatenate(references), np.concatenate(predictions))
                for name, (references, predictions) in self.pairs.items() if references]
