"""SO(2) convolution: the eSCN trick that makes eSEN's messages cheap.

In a frame whose y axis is the edge, a rotation-equivariant linear map of spherical
coefficients only mixes coefficients of the same order |m| (across degrees l and
channels), and acts on each pair (+m, -m) like multiplication by a complex number:
    out_{+m} = W_r x_{+m} - W_i x_{-m},   out_{-m} = W_i x_{+m} + W_r x_{-m}.
So one layer is one dense matmul per order m over all edges at once:
m = 0 is a plain linear layer (with bias; it may also emit extra invariant channels,
the gates of the activation), and m > 0 is the 2x2 block matrix [[W_r, -W_i], [W_i, W_r]].

Inputs are edge-frame features [E, edge_coefficients, channels] in the order of
`coefficients.edge_order`. With `radial_channels`, the input of each order is first
multiplied channel-wise by per-edge weights from the radial MLP (distance and elements).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from esen_train.model.coefficients import degrees_per_order, edge_split_sizes


class SO2Convolution(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, lmax: int, mmax: int, extra_m0_channels: int = 0) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.extra_m0_channels = extra_m0_channels
        self.split_sizes = edge_split_sizes(lmax, mmax)
        degrees = degrees_per_order(lmax, mmax)
        self.m0 = nn.Linear(degrees[0] * in_channels, degrees[0] * out_channels + extra_m0_channels)
        # One weight per m > 0 holding W_r (first half of the rows) and W_i (second half).
        self.m_weights = nn.ParameterList()
        for count in degrees[1:]:
            linear = nn.Linear(count * in_channels, 2 * count * out_channels, bias=False)
            self.m_weights.append(nn.Parameter(linear.weight.detach() / math.sqrt(2)))
        # Sizes of the radial weights per order: the input size of each order's matmul.
        self.radial_sizes = [count * in_channels for count in degrees]

    @property
    def radial_channels(self) -> int:
        return sum(self.radial_sizes)

    def forward(self, x: torch.Tensor, radial: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [E, edge_coefficients, in] (, radial [E, radial_channels]) -> ([E, edge_coefficients, out], [E, extra])."""
        num_edges = x.shape[0]
        parts = x.split(self.split_sizes, dim=1)
        radial_parts = radial.split(self.radial_sizes, dim=1) if radial is not None else [None] * len(parts)

        x0 = parts[0].reshape(num_edges, -1)
        if radial_parts[0] is not None:
            x0 = x0 * radial_parts[0]
        out0 = self.m0(x0)
        extra, out0 = out0.split([self.extra_m0_channels, out0.shape[1] - self.extra_m0_channels], dim=1)
        outputs = [out0.view(num_edges, -1, self.out_channels)]

        for xm, rm, weight in zip(parts[1:], radial_parts[1:], self.m_weights):
            xm = xm.reshape(num_edges, 2, -1)  # [+m rows | -m rows]
            if rm is not None:
                xm = xm * rm.unsqueeze(1)
            w_real, w_imag = weight.chunk(2, dim=0)
            block = torch.cat([torch.cat([w_real, -w_imag], 1), torch.cat([w_imag, w_real], 1)], 0)
            outputs.append(F.linear(xm.view(num_edges, -1), block).view(num_edges, -1, self.out_channels))
        return torch.cat(outputs, dim=1), extra
