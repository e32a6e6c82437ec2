"""Where each spherical-harmonic coefficient lives, in node order and in edge order.

Node features are [atoms, (lmax+1)^2, channels] in e3nn's order: degree l = 0..lmax, and
within a degree the orders m = -l..l (index l^2 + l + m). e3nn's real spherical harmonics
have the y axis as their pole: Y_l^0 is symmetric about y, and a rotation about y by an
angle t turns each pair (Y_l^{+m}, Y_l^{-m}) by m*t, the same way for every l.

In an edge-aligned frame (edge along y) only orders |m| <= mmax are kept, and they are
grouped by order, each group one dense block of the SO(2) convolution. Edge-frame
features are a list indexed by m ("orders"):
    orders[0]: [E, lmax + 1, channels]            (l = 0..lmax, m = 0)
    orders[m]: [E, 2 * (lmax + 1 - m), channels]  (order +m for l = m..lmax, then -m likewise)
"""
from __future__ import annotations

import torch


def node_index(l: int, m: int) -> int:
    """Position of (l, m) in a node feature."""
    return l * l + l + m


def degree_of_each_coefficient(lmax: int) -> torch.Tensor:
    """[(lmax+1)^2] long: the degree l of every node coefficient."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def rows_of_each_order(lmax: int, mmax: int) -> list[list[int]]:
    """For m = 0..mmax, the node indices of the coefficients in `orders[m]` (flattened)."""
    rows = [[node_index(l, 0) for l in range(lmax + 1)]]
    for m in range(1, mmax + 1):
        rows.append([node_index(l, m) for l in range(m, lmax + 1)] + [node_index(l, -m) for l in range(m, lmax + 1)])
    return rows


def edge_order(lmax: int, mmax: int) -> tuple[torch.Tensor, list[int]]:
    """The edge frame's layout as the rotation takes it: the node row of every edge
    coefficient (orders m = 0..mmax concatenated) and how many coefficients each order has."""
    rows = rows_of_each_order(lmax, mmax)
    return torch.tensor(sum(rows, [])), [len(order_rows) for order_rows in rows]


def degrees_per_order(lmax: int, mmax: int) -> list[int]:
    """How many degrees l carry order m, for m = 0..mmax: [lmax+1, lmax, ..., lmax+1-mmax]."""
    return [lmax + 1 - m for m in range(mmax + 1)]
