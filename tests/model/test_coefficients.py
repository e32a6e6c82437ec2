"""coefficients.py: where each (l, m) lives, checked against e3nn's own layout and against
what a rotation about the edge (the y axis) does to each order."""
from __future__ import annotations

import math

import torch
from e3nn import o3

from esen_train.model.coefficients import (
    degree_of_each_coefficient,
    degrees_per_order,
    edge_order,
    node_index,
    rows_of_each_order,
)
from tests.model_helpers import DTYPE, wigner_d


def test_node_index_is_e3nn_order():
    """e3nn lays out degree l at l^2 .. (l+1)^2 - 1, orders m = -l..l in turn."""
    irreps = o3.Irreps("0e + 1o + 2e + 3o")
    for l, block in zip(range(4), irreps.slices()):
        assert [node_index(l, m) for m in range(-l, l + 1)] == list(range(block.start, block.stop))


def test_degree_of_each_coefficient():
    assert degree_of_each_coefficient(0).tolist() == [0]
    assert degree_of_each_coefficient(2).tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert degree_of_each_coefficient(3).dtype == torch.long
    assert degree_of_each_coefficient(3).tolist() == [l for l in range(4) for _ in range(2 * l + 1)]


def test_rows_of_each_order_and_their_counts():
    assert rows_of_each_order(2, 1) == [[0, 2, 6], [3, 7, 1, 5]]
    assert rows_of_each_order(2, 2) == [[0, 2, 6], [3, 7, 1, 5], [8, 4]]
    for lmax in range(1, 5):
        for mmax in range(1, lmax + 1):
            rows = rows_of_each_order(lmax, mmax)
            counts = degrees_per_order(lmax, mmax)
            assert counts == [lmax + 1 - m for m in range(mmax + 1)]
            assert [len(order) for order in rows] == [counts[0]] + [2 * count for count in counts[1:]]
            kept = sorted(sum(rows, []))
            # Every coefficient with |m| <= mmax appears exactly once, and no other.
            expected = sorted(node_index(l, m) for l in range(lmax + 1) for m in range(-l, l + 1) if abs(m) <= mmax)
            assert kept == expected


def test_edge_order_is_the_orders_rows_concatenated_with_their_sizes():
    rows, sizes = edge_order(2, 1)
    assert rows.tolist() == [0, 2, 6, 3, 7, 1, 5] and rows.dtype == torch.long
    assert sizes == [3, 4]
    rows, sizes = edge_order(3, 3)
    assert sorted(rows.tolist()) == list(range(16)) and sizes == [4, 6, 4, 2]


def test_a_rotation_about_y_turns_each_order_pair_by_m_times_the_angle():
    """The grouping by order is what the SO(2) convolution relies on: under a rotation by t
    about y, orders[0] is unchanged and x_+m + i x_-m is multiplied by exp(i m t), alike for
    every degree: a complex number, with which the complex weights of every order commute."""
    lmax = 3
    angle = 0.37
    wigner = wigner_d(lmax, o3.matrix_y(torch.tensor(angle, dtype=DTYPE)))
    rows = rows_of_each_order(lmax, lmax)
    zero = torch.tensor(rows[0])
    assert torch.allclose(wigner[zero][:, zero], torch.eye(len(zero), dtype=DTYPE), atol=1e-14)
    for m in range(1, lmax + 1):
        order = torch.tensor(rows[m])
        plus, minus = order.chunk(2)
        block = wigner[order][:, order]
        cos, sin = math.cos(m * angle), math.sin(m * angle)
        identity = torch.eye(len(plus), dtype=DTYPE)
        expected = torch.cat([torch.cat([cos * identity, -sin * identity], 1),
                              torch.cat([sin * identity, cos * identity], 1)], 0)
        assert torch.allclose(block, expected, atol=1e-14), m
        # Nothing leaks from an order into the others.
        rest = torch.tensor([i for i in range((lmax + 1) ** 2) if i not in rows[m]])
        assert wigner[order][:, rest].abs().max() < 1e-14
