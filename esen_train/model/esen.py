"""eSEN: the backbone, the heads, and how forces and stress are obtained.

    model = ESEN(config)
    out = model(batch, forces="conservative" | "direct" | "none", stress=True, create_graph=False)
    out["energy"] [B], out["forces"] [N, 3], out["stress"] [B, 3, 3]

Conservative outputs are derivatives of the energy. A symmetric strain eps (zeros,
requiring grad) deforms positions and cells, pos' = pos (I + eps), cell' = cell (I + eps),
*before* edge vectors are formed, so F = -dE/dpos and stress = (1/V) dE/deps (ASE sign:
positive under tension) come from one autograd call. Structures with zero cell volume
(molecules) get zero stress. `create_graph=True` keeps the derivatives differentiable
for training (double backward); with `create_graph=False` (inference) all conservative
outputs are returned detached. Autograd is switched on inside, so callers may run under
torch.no_grad().

Direct outputs come from the direct heads (`config.direct_forces`), which live under the
`direct_heads.` prefix of the state dict: `ESEN.backbone_state_dict(state)` drops them, so
a direct-pretrained checkpoint loads with strict=True into a model without them.

Atoms without neighbours. An atom with no neighbour within the cutoff receives no message:
its features are those of its element alone (every l > 0 coefficient is zero), its energy is
its reference plus the network's value for that isolated element, and its conservative force
and stress are zero. The direct force (l = 1) is zero too, and each atom's share of the direct
stress is weighted by `neighbour_weight` (zero without neighbours; `config.direct_stress_
neighbour_weight`, off only for imported fairchem models), so a structure with no edges gets
zero stress from both heads. Every edge fades out with the envelope, so the energy, the forces
and both stresses go continuously to these values as the last neighbour leaves the cutoff.

Energy = energy_scale * (sum over atoms of the energy head) + energy_mean + sum of the
per-element reference energies, returned in float64 whatever the model's dtype. Forces and
stress are the network's derivatives (or direct heads) times force_scale and stress_scale.
These are float64 buffers: `set_energy_scale` sets the three scales to one value from the
training set's statistics (so forces stay the gradient of the energy) and
`set_reference_energies` the references, so the network only learns a residual of order
one; `set_normalisation` sets them one by one, as fairchem's normalisers do (imported models).

Gathers (per edge from per atom, per atom from per structure) use `index_select`, not
indexing with a tensor: with several CPU threads the backward of `x[index]` (index_put with
accumulate) adds up in an order that changes from run to run, so forces and parameter
gradients would differ in their last bits and a resumed run would not repeat an
uninterrupted one; the backward of `index_select` (index_add) adds in index order.

Batch fields `charge` and `spin` ([B], total charge and spin multiplicity) are read by
models with `config.charge_spin` other than "none"; a batch without them means 0 (fairchem's
defaults: neutral, spin unknown).
"""
from __future__ import annotations

from typing import Any

import torch
import torch._dynamo
from torch import nn

from esen_train.model.blocks import Block, EdgeDegreeEmbedding
from esen_train.model.charge_spin import ChargeSpinEmbedding
from esen_train.model.coefficients import edge_order
from esen_train.model.config import ModelConfig
from esen_train.model.heads import DirectForceHead, DirectStressHead, EnergyHead, sum_per_structure
from esen_train.model.layers import EquivariantRMSNorm
from esen_train.model.radial import EdgeScalars, GaussianBasis, PolynomialEnvelope
from esen_train.model.rotation import EdgeRotation, WignerD, edge_frames

FORCE_MODES = ("conservative", "direct", "none")
DIRECT_HEADS_PREFIX = "direct_heads."
# Float64 buffers that map network outputs to eV, eV/Å and eV/Å³ (see the module doc).
NORMALISATION_BUFFERS = ("energy_mean", "energy_scale", "force_scale", "stress_scale", "reference_energies")


class Backbone(nn.Module):
    """Atoms and edge vectors -> final node features [atoms, (lmax+1)^2, sphere_channels]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_coefficients = (config.lmax + 1) ** 2
        # Row Z-1 holds element Z (1..max_num_elements).
        self.element_embedding = nn.Embedding(config.max_num_elements, config.sphere_channels)
        self.source_embedding = nn.Embedding(config.max_num_elements, config.edge_channels)
        self.target_embedding = nn.Embedding(config.max_num_elements, config.edge_channels)
        nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
        self.distance_basis = GaussianBasis(config.cutoff, config.num_radial_basis, config.gaussian_width)
        self.envelope = PolynomialEnvelope(config.cutoff, config.envelope_exponent) if config.envelope else None
        self.charge_spin = ChargeSpinEmbedding(config.charge_spin, config.sphere_channels) if config.charge_spin != "none" else None
        self.wigner = WignerD(config.lmax)
        edge_rows, self.order_sizes = edge_order(config.lmax, config.mmax)
        self.register_buffer("edge_rows", edge_rows, persistent=False)
        self.edge_degree = EdgeDegreeEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = EquivariantRMSNorm(config.lmax, config.sphere_channels)

    def forward(self, element: torch.Tensor, edge_vectors: torch.Tensor, edge_index: torch.Tensor,
                structure: torch.Tensor | None = None, charge: torch.Tensor | None = None,
                spin: torch.Tensor | None = None) -> torch.Tensor:
        """element [N] (Z - 1), edge_vectors [E, 3] (r_ij = pos_j - pos_i + shift), edge_index [2, E];
        with config.charge_spin also structure [N] (each atom's structure), charge and spin [B]."""
        distance = edge_vectors.norm(dim=1)
        wigner = self.wigner(edge_frames(edge_vectors / distance.unsqueeze(1)))
        envelope = self.envelope(distance) if self.envelope is not None else None
        rotation = EdgeRotation(wigner, self.edge_rows, self.order_sizes, envelope)
        edges = EdgeScalars(
            basis=self.distance_basis(distance),
            source_element=element[edge_index[0]],
            target_element=element[edge_index[1]],
            source_table=self.source_embedding.weight,
            target_table=self.target_embedding.weight,
        )
        # [N, channels] added to l=0 of every atom of a structure, or None.
        system = None
        if self.charge_spin is not None:
            if structure is None or charge is None or spin is None:
                raise ValueError("a model with charge/spin inputs needs each atom's structure, and charge and spin")
            system = self.charge_spin(charge, spin).index_select(0, structure)
        scalars = self.element_embedding(element) if system is None else self.element_embedding(element) + system
        x = edge_vectors.new_zeros(element.shape[0], self.num_coefficients, self.element_embedding.embedding_dim)
        x = torch.cat([scalars.unsqueeze(1), x[:, 1:]], dim=1)
        x = self.edge_degree(x, edges, rotation, edge_index[1])
        for block in self.blocks:
            x = block(x, edges, rotation, edge_index, system)
        return self.norm(x)


class DirectHeads(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.forces = DirectForceHead(config.sphere_channels)
        self.stress = DirectStressHead(config.sphere_channels, config.hidden_channels)


class ESEN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.backbone = Backbone(config)
        self.energy_head = EnergyHead(config.sphere_channels, config.hidden_channels)
        self.direct_heads = DirectHeads(config) if config.direct_forces else None
        self.register_buffer("energy_mean", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("force_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("stress_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("reference_energies", torch.zeros(config.max_num_elements + 1, dtype=torch.float64))

    # ----- statistics from the training set ---------------------------------------
    def set_reference_energies(self, references: torch.Tensor) -> None:
        """Per-element energies [max_num_elements + 1], indexed by Z (entry 0 unused), eV."""
        references = torch.as_tensor(references)
        if references.shape != self.reference_energies.shape:
            raise ValueError(
                f"reference energies must have shape {tuple(self.reference_energies.shape)} "
                f"(max_num_elements + 1, indexed by Z), got {tuple(references.shape)}"
            )
        self.reference_energies.copy_(references)

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)` casts every floating buffer; the dataset statistics stay float64
        # (only their device follows the model), so large total energies keep meV precision.
        statistics = {name: self._buffers[name] for name in NORMALISATION_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in statistics.items():
            self._buffers[name] = original.to(device=self._buffers[name].device)
        return self

    def set_energy_scale(self, scale: float) -> None:
        """eV per network energy unit (e.g. the training set's force RMS times a length), for
        energy, forces and stress alike, so that forces are the gradient of the energy."""
        self.set_normalisation(energy_mean=0.0, energy_scale=scale, force_scale=scale, stress_scale=scale)

    def set_normalisation(self, energy_mean: float, energy_scale: float, force_scale: float, stress_scale: float) -> None:
        """fairchem's normalisers: energy = energy_scale * network + energy_mean (+ references),
        forces and stress = their scale times the network's. With different scales the
        conservative forces are not the gradient of the returned energy (as in fairchem)."""
        for name, scale in (("energy", energy_scale), ("force", force_scale), ("stress", stress_scale)):
            if not float(scale) > 0:
                raise ValueError(f"{name} scale must be > 0, got {scale}")
        self.energy_mean.fill_(float(energy_mean))
        self.energy_scale.fill_(float(energy_scale))
        self.force_scale.fill_(float(force_scale))
        self.stress_scale.fill_(float(stress_scale))

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units of their own when the forward pass has no double
        backward: the message-passing blocks (the root unit takes the rest)."""
        return list(self.backbone.blocks)

    @staticmethod
    def backbone_state_dict(state: dict[str, Any]) -> dict[str, Any]:
        """A state dict without the direct heads: loads strictly into a direct_forces=False model."""
        return {key: value for key, value in state.items() if not key.startswith(DIRECT_HEADS_PREFIX)}

    @staticmethod
    def direct_heads_state_dict(state: dict[str, Any]) -> dict[str, Any]:
        """The direct heads' part of a state dict (what `backbone_state_dict` drops), keyed
        `direct_heads.<head>.<parameter>`."""
        return {key: value for key, value in state.items() if key.startswith(DIRECT_HEADS_PREFIX)}

    # ----- forward ------------------------------------------------------------------
    def forward(self, batch, forces: str = "conservative", stress: bool = True, create_graph: bool = False) -> dict[str, torch.Tensor]:
        """Energy [B], and forces [N, 3] and stress [B, 3, 3] unless forces="none" (see module doc)."""
        if forces not in FORCE_MODES:
            raise ValueError(f"forces must be one of {FORCE_MODES}, got {forces!r}")
        if forces == "direct" and self.direct_heads is None:
            raise ValueError("forces='direct' needs direct heads: this model was built with direct_forces=False")
        inputs = self._inputs(batch)
        if forces == "conservative":
            with torch.enable_grad():
                pos = inputs["pos"] if inputs["pos"].requires_grad else inputs["pos"].detach().requires_grad_()
                strain = torch.zeros_like(inputs["cell"]).requires_grad_(stress)
                out = self.conservative_outputs(pos, strain, inputs, stress, create_graph)
            return out if create_graph else {key: value.detach() for key, value in out.items()}
        return self.direct_outputs(inputs, with_heads=forces == "direct", stress=stress)

    def conservative_outputs(self, pos: torch.Tensor, strain: torch.Tensor, inputs: dict, stress: bool,
                             create_graph: bool) -> dict[str, torch.Tensor]:
        """E, F = -dE/dpos and stress = dE/deps / V; pos and strain are the leaves to differentiate by."""
        cell = inputs["cell"]
        if stress:
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("ni,nij->nj", pos, symmetric.index_select(0, inputs["batch"]))
            cell = cell + torch.bmm(cell, symmetric)
        energy, network, _, _ = self._energy(pos, cell, inputs)
        leaves = [pos, strain] if stress else [pos]
        grads = torch.autograd.grad(network.sum(), leaves, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True)
        out = {"energy": energy, "forces": -self.force_scale.to(pos.dtype) * grads[0]}
        if stress:
            volume = torch.linalg.det(inputs["cell"]).abs()
            has_volume = volume > 0
            safe_volume = torch.where(has_volume, volume, torch.ones_like(volume))
            virial = self.stress_scale.to(pos.dtype) * grads[1]
            out["stress"] = torch.where(has_volume.view(-1, 1, 1), virial / safe_volume.view(-1, 1, 1), 0.0)
        return out

    def direct_outputs(self, inputs: dict, with_heads: bool, stress: bool) -> dict[str, torch.Tensor]:
        energy, _, x, edge_vectors = self._energy(inputs["pos"], inputs["cell"], inputs)
        out = {"energy": energy}
        if with_heads:
            out["forces"] = self.force_scale.to(x.dtype) * self.direct_heads.forces(x)
            if stress:
                volume = torch.linalg.det(inputs["cell"]).abs()
                if self.config.direct_stress_neighbour_weight:
                    weight = self.neighbour_weight(edge_vectors, inputs["edge_index"][1], x.shape[0])
                else:
                    weight = x.new_ones(x.shape[0])
                raw = self.stress_scale.to(x.dtype) * self.direct_heads.stress(x, weight, inputs["batch"], inputs["natoms"])
                out["stress"] = torch.where((volume > 0).view(-1, 1, 1), raw, 0.0)
        return out

    def neighbour_weight(self, edge_vectors: torch.Tensor, target: torch.Tensor, num_atoms: int) -> torch.Tensor:
        """[atoms] 1 - exp(-sum of the envelopes of the atom's edges): 0 for an atom without
        neighbours, 0.95 for three at full strength, within 3e-4 of 1 in fcc metals (bulk or surface),
        smooth in the positions (the envelope is, and vanishes at the cutoff with two
        derivatives). Without the envelope (config.envelope off) every edge counts 1."""
        distance = edge_vectors.norm(dim=1)
        envelopes = self.backbone.envelope(distance) if self.backbone.envelope is not None else torch.ones_like(distance)
        return -torch.expm1(-envelopes.new_zeros(num_atoms).index_add(0, target, envelopes))

    def _energy(self, pos: torch.Tensor, cell: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
        """Total energies [B] (eV, float64), the network's energies [B] (its units, model dtype),
        the final node features and the edge vectors."""
        source, target = inputs["edge_index"]
        shifts = torch.einsum("ek,ekl->el", inputs["cell_offsets"], cell.index_select(0, inputs["batch"][target]))
        edge_vectors = pos.index_select(0, source) - pos.index_select(0, target) + shifts
        x = self.backbone(inputs["element"], edge_vectors, inputs["edge_index"], inputs["batch"],
                          inputs["charge"], inputs["spin"])
        num_structures = inputs["natoms"].shape[0]
        network = sum_per_structure(self.energy_head(x), inputs["batch"], num_structures)
        # The references are summed and the total returned in float64: a total energy of
        # -17,600 eV (aspirin) in float32 is only good to about 1 meV.
        references = sum_per_structure(self.reference_energies[inputs["element"] + 1], inputs["batch"], num_structures)
        return self.energy_scale * network.double() + self.energy_mean + references, network, x, edge_vectors

    def _inputs(self, batch) -> dict[str, torch.Tensor]:
        """The batch fields the model reads (ARCHITECTURE.md), checked."""
        pos = batch.pos
        numbers = batch.atomic_numbers
        if numbers.numel() and (int(numbers.min()) < 1 or int(numbers.max()) > self.config.max_num_elements):
            raise ValueError(
                f"atomic_numbers must be in 1..{self.config.max_num_elements}, "
                f"got values in {int(numbers.min())}..{int(numbers.max())}"
            )
        batch_index = getattr(batch, "batch", None)
        if batch_index is None:
            batch_index = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        cell = batch.cell.to(pos.dtype).reshape(-1, 3, 3)
        natoms = batch.natoms.reshape(-1)
        if cell.shape[0] != natoms.shape[0]:
            raise ValueError(f"batch.cell has {cell.shape[0]} cells for {natoms.shape[0]} structures (natoms)")
        charge, spin = (_per_structure(batch, name, natoms) for name in ("charge", "spin"))
        return {
            "pos": pos,
            "element": numbers.long() - 1,
            "cell": cell,
            "natoms": natoms,
            "batch": batch_index,
            "edge_index": batch.edge_index,
            "cell_offsets": batch.cell_offsets.to(pos.dtype),
            "charge": charge,
            "spin": spin,
        }


def _per_structure(batch, name: str, natoms: torch.Tensor) -> torch.Tensor:
    """The batch's per-structure field `name` [B] (float64), zeros where the batch has none."""
    values = getattr(batch, name, None)
    if values is None:
        return torch.zeros(natoms.shape[0], dtype=torch.float64, device=natoms.device)
    values = values.reshape(-1).to(torch.float64)
    if values.shape[0] != natoms.shape[0]:
        raise ValueError(f"batch.{name} has {values.shape[0]} values for {natoms.shape[0]} structures (natoms)")
    return values


def compile_model(model: ESEN, **options) -> ESEN:
    """Compile the per-batch computations of `model` with torch.compile, in place.

    Input checks and the creation of the leaves to differentiate by (positions, strain)
    stay eager; the conservative and direct computations, autograd call included, are
    compiled with dynamic shapes (atom and edge counts change every batch). Double
    backward through a compiled region needs dynamo to trace the autograd call
    (torch._dynamo.config.trace_autograd_ops = True) and compiled backward functions
    that can themselves be differentiated (AOTAutograd's donated buffers off, as they
    forbid create_graph=True). `options` go to torch.compile.

    The conservative computation always runs compiled with create_graph=True: with torch
    2.13, the graph traced for create_graph=False returns zero forces (stress and energy
    are right), so inference uses the training graph and `forward` detaches its outputs.
    """
    torch._dynamo.config.trace_autograd_ops = True
    torch._functorch.config.donated_buffer = False
    options.setdefault("dynamic", True)
    compiled_conservative = torch.compile(model.conservative_outputs, **options)

    def conservative_outputs(pos, strain, inputs, stress, create_graph):
        return compiled_conservative(pos, strain, inputs, stress, True)

    model.conservative_outputs = conservative_outputs
    model.direct_outputs = torch.compile(model.direct_outputs, **options)
    return model
