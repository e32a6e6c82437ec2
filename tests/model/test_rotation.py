"""rotation.py: Wigner-D matrices against e3nn's, the edge frames, and `EdgeRotation`."""
from __future__ import annotations

import math

import pytest
import torch
from e3nn import o3

from esen_train.model.coefficients import edge_order, rows_of_each_order
from esen_train.model.rotation import EdgeRotation, WignerD, edge_frames
from tests.model_helpers import DTYPE, random_rotation, wigner_d

Y_AXIS = torch.tensor([0.0, 1.0, 0.0], dtype=DTYPE)


def special_directions() -> torch.Tensor:
    """Unit vectors where a frame is most likely to break: the pole +y and -y, the plane
    y = 0 (where the frame switches between its two charts), and a hair away from each."""
    in_plane = [[math.cos(t), 0.0, math.sin(t)] for t in (0.0, 0.7, 2.0, -2.9)]
    near = [[1e-9, 1.0, 0.0], [0.0, -1.0, -1e-9], [0.6, 1e-12, 0.8], [0.6, -1e-12, -0.8], [1e-300, 1.0, 1e-300]]
    directions = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]] + in_plane + near, dtype=DTYPE)
    return directions / directions.norm(dim=1, keepdim=True)


def random_directions(count: int, seed: int) -> torch.Tensor:
    vectors = torch.randn(count, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return vectors / vectors.norm(dim=1, keepdim=True)


# ----- Wigner-D -------------------------------------------------------------------------
@pytest.mark.parametrize("lmax", [1, 2, 3, 4])
def test_wigner_d_equals_e3nns(lmax):
    rotations = torch.stack([random_rotation(seed) for seed in range(8)]
                            + [torch.eye(3, dtype=DTYPE), o3.matrix_y(torch.tensor(0.4, dtype=DTYPE))])
    ours = WignerD(lmax)(rotations)
    assert ours.dtype == DTYPE and ours.shape == (10, (lmax + 1) ** 2, (lmax + 1) ** 2)
    for rotation, wigner in zip(rotations, ours):
        assert (wigner - wigner_d(lmax, rotation)).abs().max() < 1e-12


def test_wigner_d_of_half_turns_and_edge_frames_satisfies_its_definition():
    """Y(R x) = D(R) Y(x) for the rotations the model builds, half turns included (where
    Euler angles are singular), and D is block-diagonal, orthogonal and a homomorphism."""
    lmax = 3
    half_turns = torch.stack([torch.diag(torch.tensor(signs, dtype=DTYPE)) for signs in
                              ([-1.0, -1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0])])
    rotations = torch.cat([half_turns, edge_frames(special_directions()), edge_frames(random_directions(5, 0))])
    wigner = WignerD(lmax)(rotations)
    points = random_directions(20, 1)
    harmonics = o3.spherical_harmonics(list(range(lmax + 1)), points, normalize=False)
    for rotation, matrix in zip(rotations, wigner):
        rotated = o3.spherical_harmonics(list(range(lmax + 1)), points @ rotation.T, normalize=False)
        assert (rotated - harmonics @ matrix.T).abs().max() < 1e-12
        assert (matrix @ matrix.T - torch.eye(matrix.shape[0], dtype=DTYPE)).abs().max() < 1e-12
    block = torch.block_diag(*[torch.ones(2 * l + 1, 2 * l + 1, dtype=DTYPE) for l in range(lmax + 1)])
    assert torch.all(wigner[:, block == 0] == 0)
    product = WignerD(lmax)((rotations[3] @ rotations[-1]).unsqueeze(0))[0]
    assert (product - wigner[3] @ wigner[-1]).abs().max() < 1e-12


# ----- edge frames ----------------------------------------------------------------------
def test_edge_frames_map_each_direction_onto_y_and_are_proper_rotations():
    directions = torch.cat([special_directions(), random_directions(200, 2)])
    frames = edge_frames(directions)
    assert (frames @ directions.unsqueeze(-1)).squeeze(-1).sub(Y_AXIS).abs().max() < 1e-14
    identity = torch.eye(3, dtype=DTYPE).expand_as(frames)
    assert (frames @ frames.transpose(1, 2) - identity).abs().max() < 1e-14
    assert (torch.linalg.det(frames) - 1).abs().max() < 1e-14


def frames_of_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """Edge vectors (any length) -> frames, normalised as the model does."""
    return edge_frames(vectors / vectors.norm(dim=1, keepdim=True))


def test_edge_frames_have_finite_first_and_second_derivatives_everywhere():
    """Conservative training differentiates the forces (first derivatives of the frames)
    once more: both must be finite, also on the pole and on the plane where charts meet."""
    vectors = torch.cat([special_directions(), random_directions(10, 3)]) * 2.3
    vectors.requires_grad_()
    wigner = WignerD(3)(frames_of_vectors(vectors))
    weights = torch.randn(wigner.shape, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    (first,) = torch.autograd.grad((weights * wigner).sum(), vectors, create_graph=True)
    (second,) = torch.autograd.grad(first.square().sum(), vectors)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()


@pytest.mark.parametrize("direction", [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.3, -0.5, 0.8], [-0.2, 0.9, 0.1]])
def test_edge_frame_derivatives_match_finite_differences_inside_a_chart(direction):
    vector = torch.tensor([direction], dtype=DTYPE) * 1.7
    assert torch.autograd.gradcheck(frames_of_vectors, (vector.requires_grad_(),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("direction", [[1.0, 0.0, 0.0], [0.6, 0.0, -0.8]])
def test_edge_frame_derivative_on_the_plane_y_0_is_that_of_the_chart_it_belongs_to(direction):
    """On y = 0 the frame is that of the +y chart (the -y chart takes over below it), so its
    derivative must be the +y chart's: one-sided differences from y >= 0 reproduce it.
    (A chart that folded the sign, |u . y|, would give a derivative of no chart at all.)"""
    vector = torch.tensor([direction], dtype=DTYPE) * 2.0
    analytic = torch.autograd.functional.jacobian(frames_of_vectors, vector)  # [1, 3, 3, 1, 3]
    step = 1e-5
    for axis in range(3):
        shift = torch.zeros_like(vector)
        shift[0, axis] = step
        # Second-order forward difference, all points at y >= 0: inside the +y chart.
        values = [frames_of_vectors(vector + k * shift) for k in range(3)]
        numerical = (-3 * values[0] + 4 * values[1] - values[2]) / (2 * step)
        assert (analytic[0, :, :, 0, axis] - numerical[0]).abs().max() < 1e-8


# ----- EdgeRotation ---------------------------------------------------------------------
def edge_rotation(directions: torch.Tensor, lmax: int, mmax: int, envelope: torch.Tensor) -> EdgeRotation:
    wigner = WignerD(lmax)(edge_frames(directions))
    return EdgeRotation(wigner, *edge_order(lmax, mmax), envelope)


def test_the_edges_own_harmonics_have_only_order_zero_in_its_frame():
    """Y(u) seen from the frame of edge u is Y(y): everything in orders[0], and there Y_l^0(y)."""
    lmax = 3
    directions = torch.cat([special_directions(), random_directions(20, 5)])
    harmonics = o3.spherical_harmonics(list(range(lmax + 1)), directions, normalize=False)
    rotation = edge_rotation(directions, lmax, lmax, torch.ones(len(directions), dtype=DTYPE))
    orders = rotation.rotate_to_edges(harmonics.unsqueeze(-1))
    pole = o3.spherical_harmonics(list(range(lmax + 1)), Y_AXIS.unsqueeze(0), normalize=False)[0]
    expected = pole[rows_of_each_order(lmax, 0)[0]].view(1, -1, 1).expand_as(orders[0])
    assert (orders[0] - expected).abs().max() < 1e-12
    assert all(order.abs().max() < 1e-12 for order in orders[1:])


@pytest.mark.parametrize("mmax", [1, 2])
def test_rotating_to_an_edge_and_back_keeps_the_kept_orders_times_the_envelope(mmax):
    """to_node(to_edge(x)) is the envelope times the projection onto the orders |m| <= mmax of
    the edge frame: the identity when mmax = lmax; the order-zero shortcut agrees."""
    lmax, channels = 2, 3
    directions = torch.cat([special_directions(), random_directions(6, 6)])
    envelope = torch.linspace(0.1, 1.0, len(directions), dtype=DTYPE)
    rotation = edge_rotation(directions, lmax, mmax, envelope)
    x = torch.randn(len(directions), (lmax + 1) ** 2, channels, generator=torch.Generator().manual_seed(7), dtype=DTYPE)
    back = rotation.rotate_to_nodes(rotation.rotate_to_edges(x))

    wigner = WignerD(lmax)(edge_frames(directions))
    kept = torch.zeros((lmax + 1) ** 2, dtype=DTYPE)
    kept[sum(rows_of_each_order(lmax, mmax), [])] = 1.0
    projection = wigner.transpose(1, 2) @ torch.diag(kept) @ wigner
    expected = envelope.view(-1, 1, 1) * (projection @ x)
    assert (back - expected).abs().max() < 1e-12
    if mmax == lmax:
        assert (back - envelope.view(-1, 1, 1) * x).abs().max() < 1e-12

    orders = rotation.rotate_to_edges(x)
    only_zero = rotation.rotate_to_nodes(orders[:1])
    with_zeros = rotation.rotate_to_nodes([orders[0]] + [torch.zeros_like(order) for order in orders[1:]])
    assert (only_zero - with_zeros).abs().max() < 1e-14


def test_rotating_parts_equals_rotating_their_concatenation_and_gives_contiguous_gradients():
    """rotate_to_edges(a, b) is rotate_to_edges(cat([a, b], channels)), and the gradients that
    reach a and b are contiguous: each came from a gather, whose backward (index_add) is many
    times slower on a strided gradient (the reason the parts are rotated one by one)."""
    lmax = 2
    directions = random_directions(12, 8)
    rotation = edge_rotation(directions, lmax, lmax, torch.ones(len(directions), dtype=DTYPE))
    generator = torch.Generator().manual_seed(9)
    a = torch.randn(12, (lmax + 1) ** 2, 3, generator=generator, dtype=DTYPE, requires_grad=True)
    b = torch.randn(12, (lmax + 1) ** 2, 4, generator=generator, dtype=DTYPE, requires_grad=True)
    parts = rotation.rotate_to_edges(a, b)
    joined = rotation.rotate_to_edges(torch.cat([a, b], dim=2))
    assert all((part - whole).abs().max() < 1e-14 for part, whole in zip(parts, joined))

    gradients = {}
    a.register_hook(lambda grad: gradients.setdefault("a", grad))
    b.register_hook(lambda grad: gradients.setdefault("b", grad))
    sum(order.square().sum() for order in parts).backward()
    assert gradients["a"].is_contiguous() and gradients["b"].is_contiguous()
