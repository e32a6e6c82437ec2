"""Functions of the interatomic distance: Gaussian basis, smooth envelope, radial MLP."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class GaussianBasis(nn.Module):
    """exp(-(d - mu_k)^2 / (2 (width * spacing)^2)) for centres mu_k evenly spaced on [0, cutoff]."""

    def __init__(self, cutoff: float, num_basis: int, width: float) -> None:
        super().__init__()
        spacing = cutoff / max(num_basis - 1, 1)
        self.coefficient = -0.5 / (width * spacing) ** 2
        # A constant of the settings: float64 (cast at use) and out of checkpoints, so a float64
        # model has exact centres even when its weights come from a float32 checkpoint.
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_basis, dtype=torch.float64), persistent=False)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coefficient * (distance.unsqueeze(-1) - self.centres.to(distance.dtype)).square())


class PolynomialEnvelope(nn.Module):
    """u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x = d / cutoff < 1, else 0.

    u(1) = u'(1) = u''(1) = 0, so every message fades out smoothly as a neighbour approaches
    the cutoff: energy and forces stay continuous when it crosses. Evaluated in the
    factored form u(x) = (1 - x)^3 * sum_k C(k+2, 2) x^k (k < p), which has no cancellation
    near x = 1: the value there is tiny, not round-off.
    """

    def __init__(self, cutoff: float, exponent: int) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.coefficients = [(k + 1) * (k + 2) / 2 for k in range(exponent)]

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        x = distance / self.cutoff
        series = torch.full_like(x, self.coefficients[-1])
        for coefficient in reversed(self.coefficients[:-1]):  # Horner
            series = series * x + coefficient
        value = (1 - x).pow(3) * series
        return torch.where(x < 1, value, torch.zeros_like(value))


class RadialMLP(nn.Module):
    """Linear -> LayerNorm -> SiLU -> Linear -> LayerNorm -> SiLU -> Linear on edge scalars,
    the output split into groups of `out_sizes` channels.

    The edge scalars are [Gaussian basis of d, source-element embedding, target-element
    embedding]. The first linear layer is applied term by term: the element terms are
    computed once per element (a [elements, width] table) and gathered per edge, which
    is exactly W @ concat(...) but skips two thirds of the first layer's work.
    """

    def __init__(self, num_basis: int, edge_channels: int, out_sizes: list[int]) -> None:
        super().__init__()
        self.num_basis = num_basis
        self.edge_channels = edge_channels
        self.out_sizes = out_sizes
        self.layers = nn.Sequential(
            nn.Linear(num_basis + 2 * edge_channels, edge_channels),
            nn.LayerNorm(edge_channels),
            nn.SiLU(),
            nn.Linear(edge_channels, edge_channels),
            nn.LayerNorm(edge_channels),
            nn.SiLU(),
            nn.Linear(edge_channels, sum(out_sizes)),
        )

    def forward(self, edges: EdgeScalars) -> list[torch.Tensor]:
        """-> one [E, size] tensor per entry of `out_sizes`."""
        first = self.layers[0]
        w_basis, w_source, w_target = first.weight.split(
            [self.num_basis, self.edge_channels, self.edge_channels], dim=1
        )
        source_table = edges.source_table @ w_source.T  # [elements, edge_channels]
        target_table = edges.target_table @ w_target.T
        hidden = torch.addmm(first.bias, edges.basis, w_basis.T)
        hidden = hidden + source_table.index_select(0, edges.source_element) + target_table.index_select(0, edges.target_element)
        hidden = self.layers[1:-1](hidden)
        # Split the last layer's weights, not its output: separate outputs need no slicing
        # (whose backward zero-fills and copies full-size tensors).
        last = self.layers[-1]
        return [
            F.linear(hidden, weight, bias)
            for weight, bias in zip(last.weight.split(self.out_sizes), last.bias.split(self.out_sizes))
        ]


@dataclass
class EdgeScalars:
    """Rotation-invariant inputs of the radial MLPs, shared by all layers of one forward pass."""

    basis: torch.Tensor  # [E, num_basis] Gaussians of the distance
    source_element: torch.Tensor  # [E] embedding row of the neighbour j
    target_element: torch.Tensor  # [E] embedding row of the centre i
    source_table: torch.Tensor  # [elements, edge_channels] source-element embedding
    target_table: torch.Tensor  # [elements, edge_channels] target-element embedding
