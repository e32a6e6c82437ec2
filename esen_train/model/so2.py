"""SO(2) convolution: the eSCN trick that makes eSEN's messages cheap.

In a frame whose y axis is the edge, a rotation-equivariant linear map of spherical
coefficients only mixes coefficients of the same order |m| (across degrees l and
channels), and acts on each pair (+m, -m) like multiplication by a complex number:
    out_{+m} = W_r x_{+m} - W_i x_{-m},   out_{-m} = W_i x_{+m} + W_r x_{-m}.
So one layer is one dense matmul per order m over all edges at once: m = 0 is a plain
linear layer (with bias), and m > 0 is a complex matrix W_r + i W_i acting on
x_{+m} + i x_{-m}, written as one real matrix (see `complex_linear`).

`gated=True` adds eSEN's gate nonlinearity to the output: the m = 0 layer also emits one
gate per degree l >= 1 and channel (invariant, so any function of it is equivariant);
the l = 0 outputs go through SiLU and every l >= 1 output is multiplied by sigmoid(its
degree's gate). Doing it here, on the separate outputs of each matmul, slices no
full-size tensor (slicing costs zero-filled copies in every backward pass).

Features are edge-frame `orders` (see coefficients.py). With `radial`, the input of each
order is first multiplied channel-wise by per-edge weights from the radial MLP.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from esen_train.model.coefficients import degrees_per_order


class SO2Convolution(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, lmax: int, mmax: int, gated: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.lmax = lmax
        self.gated = gated
        self.degrees = degrees = degrees_per_order(lmax, mmax)
        # Output rows of the m = 0 layer: [gates (lmax * out, if gated) | l = 0 | l = 1..lmax].
        self.gate_channels = lmax * out_channels if gated else 0
        self.m0 = nn.Linear(degrees[0] * in_channels, self.gate_channels + degrees[0] * out_channels)
        # One weight per m > 0 holding W_r (first half of the rows) and W_i (second half).
        self.m_weights = nn.ParameterList()
        for count in degrees[1:]:
            linear = nn.Linear(count * in_channels, 2 * count * out_channels, bias=False)
            self.m_weights.append(nn.Parameter(linear.weight.detach() / math.sqrt(2)))
        # The radial weights of each order: one per input coefficient and channel.
        self.radial_sizes = [count * in_channels for count in degrees]

    def forward(self, orders: list[torch.Tensor], radial: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """orders with in_channels [, radial: per order m, [E, radial_sizes[m]]] -> orders with out_channels."""
        # Every shape is spelled out (no -1): with no edges (an isolated atom) the tensors
        # have 0 elements and a -1 would be ambiguous.
        num_edges, channels = orders[0].shape[0], self.out_channels
        radial = radial if radial is not None else [None] * len(orders)

        x0 = orders[0].reshape(num_edges, self.radial_sizes[0])
        if radial[0] is not None:
            x0 = x0 * radial[0]
        weight, bias = self.m0.weight, self.m0.bias
        if self.gated:
            # Separate matmuls with slices of the weight, so that no output is sliced.
            gates, scalars, rest = (
                F.linear(x0, w, b) for w, b in zip(
                    weight.split([self.gate_channels, channels, self.lmax * channels]),
                    bias.split([self.gate_channels, channels, self.lmax * channels]),
                )
            )
            gates = torch.sigmoid(gates).view(num_edges, self.lmax, channels)
            out0 = torch.cat([F.silu(scalars).unsqueeze(1), rest.view(num_edges, self.lmax, channels) * gates], dim=1)
        else:
            out0 = F.linear(x0, weight, bias).view(num_edges, self.degrees[0], channels)
        outputs = [out0]

        for m, (x, radial_m, weight) in enumerate(zip(orders[1:], radial[1:], self.m_weights), 1):
            size, count = self.radial_sizes[m], self.degrees[m]  # per sign of m: inputs, degrees
            if radial_m is not None:  # the same weights for +m and -m
                x = (x.reshape(num_edges, 2, size) * radial_m.unsqueeze(1)).view(num_edges, 2 * size)
            else:
                x = x.reshape(num_edges, 2 * size)
            out = complex_linear(x, *weight.chunk(2, dim=0)).view(num_edges, 2, count, channels)
            if self.gated:  # orders[m] holds degrees m..lmax: gates m-1..lmax-1
                out = out * gates[:, m - 1:].unsqueeze(1)
            outputs.append(out.view(num_edges, 2 * count, channels))
        return outputs


def complex_linear(x: torch.Tensor, w_real: torch.Tensor, w_imag: torch.Tensor) -> torch.Tensor:
    """(W_r + i W_i)(x_+ + i x_-) = (W_r x_+ - W_i x_-) + i (W_i x_+ + W_r x_-), for x = [x_+, x_-]
    along the last axis, returning [out_+, out_-] the same way.

    One matmul by the real matrix [[W_r, -W_i], [W_i, W_r]]: the same FLOPs as four matmuls
    by W_r and W_i, but one output of twice the size instead of four halves. In conservative
    training (a double backward) four halves would be mid-size blocks that glibc keeps in its
    heap and fragments, raising peak memory on Cu above fairchem's (benchmarks/README.md).
    Gauss's three-matmul form saves a quarter of the FLOPs but keeps x_+ + x_- alive for the
    backward pass, which cost more memory still."""
    real_form = torch.cat([torch.cat([w_real, -w_imag], dim=1), torch.cat([w_imag, w_real], dim=1)], dim=0)
    return F.linear(x, real_form)
