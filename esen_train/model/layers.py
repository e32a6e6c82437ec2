"""Per-atom equivariant layers on features [atoms, (lmax+1)^2, channels] (e3nn order).

- `EquivariantRMSNorm`: one RMS over all coefficients (each degree weighted equally), a
  learned scale per degree and channel, and centring + bias on l=0 only.
- `SO3Linear`: a channel mixing per degree (one weight matrix per l, bias on l=0).
- `GateActivation`: SiLU on l=0; every l>0 coefficient times sigmoid(its degree's gate
  scalar). (The same gate on edges is part of `SO2Convolution(gated=True)`.)
- `SpectralFeedForward`: SO3Linear -> gate -> SO3Linear (exactly equivariant).
- `GridFeedForward`: features sampled on a sphere grid, pointwise MLP, projected back
  (equivariant up to the grid's sampling error, the way eSEN's "grid" MLP is).
"""
from __future__ import annotations

import torch
from e3nn import o3
from torch import nn
from torch.nn import functional as F

from esen_train.model.coefficients import degree_of_each_coefficient


class EquivariantRMSNorm(nn.Module):
    def __init__(self, lmax: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax = lmax
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        degree = degree_of_each_coefficient(lmax)
        self.register_buffer("degree", degree, persistent=False)
        # Each degree counts once in the RMS, whatever its 2l+1 coefficients.
        self.register_buffer("balance", 1.0 / ((2 * degree + 1) * (lmax + 1)).double(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars = x[:, :1] - x[:, :1].mean(dim=2, keepdim=True)
        x = torch.cat([scalars, x[:, 1:]], dim=1)
        mean_square = torch.einsum("nic,i->n", x.square(), self.balance.to(x.dtype)) / x.shape[2]
        scale = torch.rsqrt(mean_square + self.eps).view(-1, 1, 1)
        out = x * scale * self.weight.index_select(0, self.degree)
        return torch.cat([out[:, :1] + self.bias, out[:, 1:]], dim=1)


class SO3Linear(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        bound = in_channels ** -0.5
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_channels, in_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [F.linear(x[:, :1], self.weight[0], self.bias)]
        for l in range(1, self.lmax + 1):
            outputs.append(F.linear(x[:, l * l:(l + 1) ** 2], self.weight[l]))
        return torch.cat(outputs, dim=1)


class GateActivation(nn.Module):
    """SiLU on l=0; every l > 0 coefficient times sigmoid(its degree's gate), on node features."""

    def __init__(self, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        self.register_buffer("degree", degree_of_each_coefficient(lmax), persistent=False)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [N, (lmax+1)^2, C], gates [N, lmax * C]."""
        # Row 0: sigmoid(x_l=0), so that x * it is SiLU(x); row l: sigmoid(gate of degree l).
        factors = torch.cat([torch.sigmoid(x[:, :1]), torch.sigmoid(gates).view(x.shape[0], self.lmax, x.shape[2])], dim=1)
        return x * factors[:, self.degree]


class SpectralFeedForward(nn.Module):
    def __init__(self, channels: int, hidden_channels: int, lmax: int) -> None:
        super().__init__()
        self.gate_scalars = nn.Linear(channels, lmax * hidden_channels)
        self.linear_in = SO3Linear(channels, hidden_channels, lmax)
        self.gate = GateActivation(lmax)
        self.linear_out = SO3Linear(hidden_channels, channels, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = F.silu(self.gate_scalars(x[:, 0]))
        return self.linear_out(self.gate(self.linear_in(x), gates))


class SphereGrid(nn.Module):
    """Sampling of degree <= lmax coefficients on a latitude x longitude grid and back (e3nn)."""

    def __init__(self, lmax: int, resolution: int) -> None:
        super().__init__()
        latitude = resolution or 2 * (lmax + 1)
        longitude = resolution or 2 * (lmax + 1) + 1
        to_matrix, from_matrix = _grid_matrices(lmax, latitude, longitude)
        self.register_buffer("to_matrix", to_matrix, persistent=False)  # [points, size]
        self.register_buffer("from_matrix", from_matrix, persistent=False)  # [points, size]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pk,nkc->npc", self.to_matrix.to(x.dtype), x)

    def from_grid(self, values: torch.Tensor) -> torch.Tensor:
        return torch.einsum("pk,npc->nkc", self.from_matrix.to(values.dtype), values)


def _grid_matrices(lmax: int, latitude: int, longitude: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e3nn's maps coefficients -> grid values and back, both [points, (lmax+1)^2], computed in
    float64 (e3nn computes its quadrature weights in the default dtype, whatever `dtype` says:
    float32 would leave the round trip grid -> coefficients good to 1e-7 only)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        size, points = (lmax + 1) ** 2, latitude * longitude
        to_grid = o3.ToS2Grid(lmax, (latitude, longitude), normalization="integral")
        from_grid = o3.FromS2Grid((latitude, longitude), lmax, normalization="integral")
        to_matrix = to_grid(torch.eye(size)).reshape(size, -1).T
        from_matrix = from_grid(torch.eye(points).view(points, latitude, longitude))
        return to_matrix, from_matrix
    finally:
        torch.set_default_dtype(default)


class GridFeedForward(nn.Module):
    def __init__(self, channels: int, hidden_channels: int, lmax: int, resolution: int) -> None:
        super().__init__()
        self.grid = SphereGrid(lmax, resolution)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden_channels, bias=False),
            nn.SiLU(),
            nn.Linear(hidden_channels, hidden_channels, bias=False),
            nn.SiLU(),
            nn.Linear(hidden_channels, channels, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.from_grid(self.mlp(self.grid.to_grid(x)))
