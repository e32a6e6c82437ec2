"""Message passing: the edge-degree embedding and the eSEN block.

Every message is built in its edge's frame and rotated back by `EdgeRotation`,
which carries the smooth envelope (unless config.envelope is off), so an edge contributes
nothing (and no force) as its length reaches the cutoff. Messages are summed onto the centre atom i (edge_index[1]).
"""
from __future__ import annotations

import torch
from torch import nn

from esen_train.model.config import ModelConfig
from esen_train.model.layers import (
    EquivariantRMSNorm,
    GridFeedForward,
    SpectralFeedForward,
)
from esen_train.model.radial import EdgeScalars, RadialMLP
from esen_train.model.rotation import EdgeRotation
from esen_train.model.so2 import SO2Convolution


def sum_over_neighbours(messages: torch.Tensor, target: torch.Tensor, num_atoms: int) -> torch.Tensor:
    out = messages.new_zeros((num_atoms,) + messages.shape[1:])
    return out.index_add(0, target, messages)


class EdgeDegreeEmbedding(nn.Module):
    """Initial l >= 0 features from the neighbourhood's shape.

    A radial MLP gives each edge m = 0 coefficients (one per degree and channel) in the
    edge frame; rotated back they are radial weights times Y_l(r_hat). Their sum over
    neighbours, divided by `rescale`, is added to the element embedding.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.degrees = config.lmax + 1
        self.channels = config.sphere_channels
        self.rescale = config.edge_degree_rescale
        self.radial = RadialMLP(config.num_radial_basis, config.edge_channels, [self.degrees * self.channels])

    def forward(self, x: torch.Tensor, edges: EdgeScalars, rotation: EdgeRotation, target: torch.Tensor) -> torch.Tensor:
        m0 = self.radial(edges)[0].view(-1, self.degrees, self.channels)
        return x + sum_over_neighbours(rotation.rotate_to_nodes([m0]), target, x.shape[0]) / self.rescale


class Edgewise(nn.Module):
    """Message j -> i: rotate [x_j, x_i] into the edge frame, SO(2) conv weighted by the
    radial MLP, gate nonlinearity, SO(2) conv, rotate back (times the envelope), sum over j."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        lmax, mmax = config.lmax, config.mmax
        hidden = config.hidden_channels
        # The gate, not a grid: on a finite grid a pointwise nonlinearity in the edge frame
        # is not exactly invariant to the frame's roll about the edge, and the roll is an
        # arbitrary (and, for some edge directions, discontinuous) choice.
        self.conv1 = SO2Convolution(2 * config.sphere_channels, hidden, lmax, mmax, gated=True)
        self.conv2 = SO2Convolution(hidden, config.sphere_channels, lmax, mmax)
        self.radial = RadialMLP(config.num_radial_basis, config.edge_channels, self.conv1.radial_sizes)

    def forward(self, x: torch.Tensor, edges: EdgeScalars, rotation: EdgeRotation, edge_index: torch.Tensor) -> torch.Tensor:
        source, target = edge_index
        orders = rotation.rotate_to_edges(x.index_select(0, source), x.index_select(0, target))
        orders = self.conv2(self.conv1(orders, self.radial(edges)))
        return sum_over_neighbours(rotation.rotate_to_nodes(orders), target, x.shape[0])


class Block(nn.Module):
    """Pre-norm residual block: x + Edgewise(Norm(x) [+ system on l=0]), then
    x + FeedForward(Norm(x)). `system` [atoms, channels] is the charge/spin embedding of each
    atom's structure (models with config.charge_spin), added after the first norm as in
    fairchem's eSCNMD block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        lmax, channels = config.lmax, config.sphere_channels
        self.edge_norm = EquivariantRMSNorm(lmax, channels)
        self.edgewise = Edgewise(config)
        self.atom_norm = EquivariantRMSNorm(lmax, channels)
        if config.feed_forward == "spectral":
            self.feed_forward = SpectralFeedForward(channels, config.hidden_channels, lmax)
        else:
            self.feed_forward = GridFeedForward(channels, config.hidden_channels, lmax, config.grid_resolution)

    def forward(self, x: torch.Tensor, edges: EdgeScalars, rotation: EdgeRotation, edge_index: torch.Tensor,
                system: torch.Tensor | None = None) -> torch.Tensor:
        normed = self.edge_norm(x)
        if system is not None:
            normed = torch.cat([normed[:, :1] + system.unsqueeze(1), normed[:, 1:]], dim=1)
        x = x + self.edgewise(normed, edges, rotation, edge_index)
        return x + self.feed_forward(self.atom_norm(x))
