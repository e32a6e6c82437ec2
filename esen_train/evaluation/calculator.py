"""`ESENCalculator`: an eSEN model behind ASE's Calculator interface.

    calc = ESENCalculator.from_checkpoint("runs/tiny", forces="conservative", dtype=torch.float64)
    atoms.calc = calc
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

Each structure is turned into the batch format of ARCHITECTURE.md (positions, atomic
numbers, cell, pbc, the full neighbour list within the model's cutoff, and the total charge
and spin multiplicity from `atoms.info["charge"]` and `atoms.info["spin"]`, 0 where absent,
as fairchem's calculator reads them) and passed through the model. `calculate_batch` does
many structures in one forward pass. Stress is reported for structures periodic in all three
directions only, as ASE expects. An atom without neighbours within the cutoff has the energy
the model gives its element alone and zero force; a structure of 0 atoms is refused
(ValueError naming its position in the batch).

Every structure is checked before its neighbour list is built (`check_structure`): a cell in
nm instead of Å would otherwise give millions of edges, overlapping atoms meaningless forces,
and an element the checkpoint was not trained on an energy from an untrained embedding and a
zero reference energy.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress
from torch_geometric.data import Batch, Data

from esen_train.data.neighbors import build_neighbor_list
from esen_train.data.validate import UnphysicalGeometry, check_geometry
from esen_train.model import ESEN
from esen_train.model.config import load_model_config
from esen_train.model.model_file import CheckpointInfo, load_model

FORCE_MODES = ("conservative", "direct")


class UntrainedElements(ValueError):
    """Elements the checkpoint's training data did not have."""

    def __init__(self, unknown: list[int], trained: list[int], checkpoint: Path):
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
        super().__init__(
            f"{names} not among the elements {checkpoint} was trained on "
            f"({' '.join(chemical_symbols[z] for z in trained)}): its predictions for them would be meaningless"
        )
        self.unknown = unknown


class ESENCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model: ESEN,
        forces: str = "conservative",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        checkpoint: CheckpointInfo | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if forces not in FORCE_MODES:
            raise ValueError(f"forces must be one of {FORCE_MODES}, got {forces!r}")
        if forces == "direct" and not model.config.direct_forces:
            where = f" ({checkpoint.path}, stage {checkpoint.stage})" if checkpoint else ""
            raise ValueError(f"forces='direct' needs a model with direct force heads; this one has none{where}")
        self.forces_mode = forces
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.cutoff = float(model.config.cutoff)
        self.checkpoint = checkpoint
        # The elements of the training data, where the checkpoint records them.
        self.elements = None if checkpoint is None or checkpoint.elements is None else set(checkpoint.elements)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        forces: str = "conservative",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        use_ema: bool = True,
    ) -> ESENCalculator:
        """A checkpoint directory or a run directory (its last stage's best checkpoint)."""
        model, info = load_model(path, device=device, dtype=dtype, use_ema=use_ema)
        return cls(model, forces=forces, device=device, dtype=dtype, checkpoint=info)

    @classmethod
    def from_config(
        cls,
        path_or_name: str | Path,
        seed: int = 0,
        forces: str = "conservative",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ESENCalculator:
        """Fresh weights drawn with `seed` for a config file or a name in configs/model/.
        With forces="direct" the model gets direct heads even where the config has none."""
        config = load_model_config(str(path_or_name))
        if forces == "direct":
            config = replace(config, direct_forces=True)
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
            torch.manual_seed(seed)
            model = ESEN(config)
        return cls(model, forces=forces, device=device, dtype=dtype)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        want_stress = "stress" in properties
        if want_stress and not self.atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a structure periodic in all three directions")
        # Energy and forces always come together; stress (an extra gradient) only when asked,
        # so MD, which asks for forces alone, does not pay for it.
        self.results = self.calculate_batch([self.atoms], stress=want_stress)[0]

    def calculate_batch(self, atoms_list: Sequence[Atoms], stress: bool = True) -> list[dict]:
        """Energy, free energy, forces and (with `stress`, fully periodic structures only) Voigt
        stress of every structure, from one forward pass over all of them, as ASE result dicts."""
        if not atoms_list:
            return []
        for index, atoms in enumerate(atoms_list):
            if len(atoms) == 0:
                raise ValueError(f"structure {index} of {len(atoms_list)} has 0 atoms: a structure needs at least one")
            try:
                self.check_structure(atoms)
            except UnphysicalGeometry as error:
                if len(atoms_list) == 1:
                    raise
                raise UnphysicalGeometry(error.field, f"structure {index} of the batch: {error.reason}") from None
        batch = Batch.from_data_list([self.atoms_to_data(atoms) for atoms in atoms_list]).to(self.device)
        want_stress = stress and any(atoms.pbc.all() for atoms in atoms_list)
        output = self._forward(batch, want_stress)
        energy = output["energy"].detach().double().cpu().numpy()
        forces = output["forces"].detach().double().cpu().numpy()
        stresses = output["stress"].detach().double().cpu().numpy() if want_stress else None
        ends = np.cumsum([len(atoms) for atoms in atoms_list])
        results = []
        for index, (atoms, end) in enumerate(zip(atoms_list, ends)):
            result = {
                "energy": float(energy[index]),
                "free_energy": float(energy[index]),
                "forces": forces[end - len(atoms) : end],
            }
            if want_stress and atoms.pbc.all():
                result["stress"] = full_3x3_to_voigt_6_stress(stresses[index])
            results.append(result)
        return results

    def _forward(self, batch: Batch, want_stress: bool) -> dict[str, torch.Tensor]:
        if self.forces_mode == "conservative":
            # Forces and stress are gradients of the energy: autograd must be on, even when
            # the caller runs under torch.no_grad().
            with torch.enable_grad():
                return self.model(batch, forces="conservative", stress=want_stress)
        with torch.no_grad():
            return self.model(batch, forces="direct", stress=want_stress)

    def check_structure(self, atoms: Atoms) -> None:
        """Raise `UntrainedElements` for an element the checkpoint was not trained on, and
        `UnphysicalGeometry` for a cell or positions no physical structure has."""
        if self.elements is not None:
            unknown = sorted(set(atoms.numbers.tolist()) - self.elements)
            if unknown:
                raise UntrainedElements(unknown, sorted(self.elements), self.checkpoint.path)
        check_geometry(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)

    def atoms_to_data(self, atoms: Atoms) -> Data:
        """One structure in the batch format of ARCHITECTURE.md (no labels, not checked)."""
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = atoms.cell.array if pbc.any() else np.zeros((3, 3))
        edge_index, cell_offsets = build_neighbor_list(atoms.positions, cell, pbc, self.cutoff)
        return Data(
            pos=torch.as_tensor(atoms.positions, dtype=self.dtype),
            atomic_numbers=torch.as_tensor(atoms.numbers, dtype=torch.long),
            cell=torch.as_tensor(cell, dtype=self.dtype).unsqueeze(0),
            pbc=torch.as_tensor(pbc).unsqueeze(0),
            natoms=torch.tensor([len(atoms)], dtype=torch.long),
            edge_index=torch.as_tensor(edge_index, dtype=torch.long),
            cell_offsets=torch.as_tensor(cell_offsets, dtype=self.dtype),
            charge=torch.tensor([float(atoms.info.get("charge", 0))], dtype=torch.float64),
            spin=torch.tensor([float(atoms.info.get("spin", 0))], dtype=torch.float64),
            num_nodes=len(atoms),
        )
