"""Readouts from the final node features [atoms, (lmax+1)^2, channels].

- `EnergyHead`: an MLP on each atom's l=0 channels -> one number per atom.
- `DirectForceHead`: a channel mix of the l=1 coefficients (a vector per atom; in e3nn's
  basis l=1 is (x, y, z)). Equivariant by construction, not a gradient: not conservative.
- `DirectStressHead`: isotropic part from an MLP on l=0, traceless symmetric part from a
  channel mix of l=2, each averaged over the structure's atoms (stress is intensive),
  assembled into a symmetric 3x3 matrix with e3nn's Cartesian-tensor change of basis.
  Each atom's isotropic part is weighted by how much it has neighbours (`ESEN.neighbour_weight`):
  an atom without any has zero l=2 features and must add no stress either.
"""
from __future__ import annotations

import torch
from e3nn.io import CartesianTensor
from torch import nn


def scalar_mlp(channels: int, hidden_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(channels, hidden_channels),
        nn.SiLU(),
        nn.Linear(hidden_channels, hidden_channels),
        nn.SiLU(),
        nn.Linear(hidden_channels, 1),
    )


def sum_per_structure(values: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    out = values.new_zeros((num_structures,) + values.shape[1:])
    return out.index_add(0, batch, values)


def _symmetric_matrix_basis() -> torch.Tensor:
    """e3nn's (0e, 2e) -> symmetric 3x3 change of basis, [6, 3, 3], computed in float64
    (e3nn builds it in the default dtype; float32 would limit the stress to 1e-8)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return CartesianTensor("ij=ji").reduced_tensor_products().change_of_basis.clone()
    finally:
        torch.set_default_dtype(default)


class EnergyHead(nn.Module):
    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.mlp = scalar_mlp(channels, hidden_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> [atoms] per-atom energies in network units."""
        return self.mlp(x[:, 0]).squeeze(-1)


class DirectForceHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels).uniform_(-channels ** -0.5, channels ** -0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> [atoms, 3] in network units."""
        return x[:, 1:4] @ self.weight


class DirectStressHead(nn.Module):
    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.isotropic = scalar_mlp(channels, hidden_channels)
        self.traceless_weight = nn.Parameter(torch.empty(channels).uniform_(-channels ** -0.5, channels ** -0.5))
        # [6, 3, 3]: (0e, 2e) coefficients -> symmetric Cartesian matrix.
        self.register_buffer("change_of_basis", _symmetric_matrix_basis(), persistent=False)

    def forward(self, x: torch.Tensor, neighbour_weight: torch.Tensor, batch: torch.Tensor,
                natoms: torch.Tensor) -> torch.Tensor:
        """x [atoms, (lmax+1)^2, C], neighbour_weight [atoms] (0 without neighbours)
        -> [structures, 3, 3] in network units."""
        isotropic = self.isotropic(x[:, 0]) * neighbour_weight.unsqueeze(1)
        per_atom = torch.cat([isotropic, x[:, 4:9] @ self.traceless_weight], dim=1)  # [atoms, 6]
        mean = sum_per_structure(per_atom, batch, natoms.shape[0]) / natoms.unsqueeze(1).to(x.dtype)
        return torch.einsum("bk,kij->bij", mean, self.change_of_basis.to(x.dtype))
