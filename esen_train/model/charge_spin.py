"""`ChargeSpinEmbedding`: a structure's total charge and spin multiplicity as one vector.

The same inputs and layers as fairchem's OMol models (`ChgSpinEmbedding` and `mix_csd` of
its eSCNMD backbone), so that their weights load one to one:
- "sinusoidal": charge q -> [sin(2 pi q w), cos(2 pi q w)] for fixed random frequencies w
  (sphere_channels / 2 of them, a buffer: fairchem does not train them); spin likewise,
  except that spin 0 (unknown) embeds as zeros;
- "table": a learned vector per integer charge -100..100 and spin 0..100.
The two vectors are mixed by a linear layer and SiLU into [structures, sphere_channels],
which the backbone adds to every atom's l=0 features.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

CHARGE_RANGE = (-100, 100)
SPIN_RANGE = (0, 100)


class ChargeSpinEmbedding(nn.Module):
    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "sinusoidal":
            self.register_buffer("charge_frequencies", torch.randn(channels // 2))
            self.register_buffer("spin_frequencies", torch.randn(channels // 2))
        elif kind == "table":
            self.charge_table = nn.Embedding(CHARGE_RANGE[1] - CHARGE_RANGE[0] + 1, channels)
            self.spin_table = nn.Embedding(SPIN_RANGE[1] - SPIN_RANGE[0] + 1, channels)
        else:
            raise ValueError(f"unknown charge/spin embedding {kind!r}: 'sinusoidal' or 'table'")
        self.mix = nn.Linear(2 * channels, channels)

    def forward(self, charge: torch.Tensor, spin: torch.Tensor) -> torch.Tensor:
        """charge, spin [structures] (any numeric dtype) -> [structures, channels]."""
        dtype = self.mix.weight.dtype
        if self.kind == "sinusoidal":
            charge_vector = _sinusoidal(charge.to(dtype), self.charge_frequencies)
            spin_vector = _sinusoidal(spin.to(dtype), self.spin_frequencies) * (spin != 0).to(dtype).unsqueeze(1)
        else:
            charge_vector = self.charge_table(_table_index(charge, CHARGE_RANGE, "charge"))
            spin_vector = self.spin_table(_table_index(spin, SPIN_RANGE, "spin"))
        return F.silu(self.mix(torch.cat([charge_vector, spin_vector], dim=1)))


def _sinusoidal(values: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    # The same order of products as fairchem (value * w * 2 * pi), for equal rounding.
    angles = values.unsqueeze(1) * frequencies.to(values.dtype).unsqueeze(0) * 2 * math.pi
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _table_index(values: torch.Tensor, value_range: tuple[int, int], name: str) -> torch.Tensor:
    """Row of each value in its table; a value that is not an integer in range is refused."""
    low, high = value_range
    exact = values.to(torch.float64)
    if exact.numel() and (bool((exact != exact.round()).any()) or exact.min() < low or exact.max() > high):
        raise ValueError(f"{name} must be an integer in {low}..{high} for this model, got {values.tolist()}")
    return values.long() - low
