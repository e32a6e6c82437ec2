"""layers.py: per-atom layers rotate with their input (one random rotation per atom), the
RMS norm computes what it says, and the grid feed-forward is equivariant up to the grid's
sampling error, which vanishes as the grid is refined."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from esen_train.model.layers import (
    EquivariantRMSNorm,
    GateActivation,
    GridFeedForward,
    SO3Linear,
    SphereGrid,
    SpectralFeedForward,
)
from tests.model_helpers import DTYPE, random_rotation, rotate_features, wigner_d

ATOMS, CHANNELS = 5, 4


def features(lmax: int, channels: int = CHANNELS, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ATOMS, (lmax + 1) ** 2, channels, generator=generator, dtype=DTYPE) + 0.5


def per_atom_rotations(lmax: int) -> torch.Tensor:
    return torch.stack([wigner_d(lmax, random_rotation(seed)) for seed in range(ATOMS)])


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """float64, every parameter (norm scales and biases included) moved off its initial value."""
    torch.manual_seed(1)
    module = module.to(DTYPE)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return module


def equivariance_error(layer, x: torch.Tensor, wigner: torch.Tensor, *args) -> float:
    with torch.no_grad():
        out = layer(x, *args)
        rotated = layer(rotate_features(x, wigner), *args)
        return float((rotated - rotate_features(out, wigner)).abs().max() / out.abs().max())


# ----- the RMS norm ---------------------------------------------------------------------
def test_rms_norm_is_the_degree_balanced_rms_with_a_scale_per_degree():
    lmax = 3
    norm = randomised(EquivariantRMSNorm(lmax, CHANNELS))
    x = features(lmax)
    centred = x.clone()
    centred[:, 0] -= x[:, 0].mean(dim=1, keepdim=True)
    # Mean square of each degree (over its 2l+1 orders and the channels), averaged over degrees.
    mean_square = sum(centred[:, l * l:(l + 1) ** 2].square().mean(dim=(1, 2)) for l in range(lmax + 1)) / (lmax + 1)
    expected = centred / torch.sqrt(mean_square + norm.eps).view(-1, 1, 1)
    for l in range(lmax + 1):
        expected[:, l * l:(l + 1) ** 2] *= norm.weight[l]
    expected[:, 0] += norm.bias
    assert (norm(x) - expected).abs().max() < 1e-14 * expected.abs().max()


def test_rms_norm_is_equivariant_and_its_scalars_and_degree_norms_invariant():
    lmax = 3
    norm = randomised(EquivariantRMSNorm(lmax, CHANNELS))
    x = features(lmax)
    wigner = per_atom_rotations(lmax)
    assert equivariance_error(norm, x, wigner) < 1e-14
    out, rotated = norm(x), norm(rotate_features(x, wigner))
    tolerance = 1e-14 * out.abs().max()
    assert (rotated[:, 0] - out[:, 0]).abs().max() < tolerance
    for l in range(1, lmax + 1):
        degree = slice(l * l, (l + 1) ** 2)
        assert (rotated[:, degree].norm(dim=1) - out[:, degree].norm(dim=1)).abs().max() < tolerance


# ----- linear maps, gates, spectral feed-forward -----------------------------------------
def test_so3_linear_mixes_channels_per_degree_and_is_equivariant():
    lmax = 3
    linear = randomised(SO3Linear(CHANNELS, 6, lmax))
    x = features(lmax)
    assert equivariance_error(linear, x, per_atom_rotations(lmax)) < 1e-14
    out = linear(x)
    for l in range(lmax + 1):
        expected = x[:, l * l:(l + 1) ** 2] @ linear.weight[l].T + (linear.bias if l == 0 else 0)
        assert (out[:, l * l:(l + 1) ** 2] - expected).abs().max() < 1e-14


def test_gate_activation_is_silu_on_scalars_and_a_sigmoid_gate_per_degree():
    lmax = 2
    gate = GateActivation(lmax)
    x = features(lmax)
    gates = torch.randn(ATOMS, lmax * CHANNELS, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    out = gate(x, gates)
    assert (out[:, 0] - F.silu(x[:, 0])).abs().max() < 1e-15
    for l in range(1, lmax + 1):
        factor = torch.sigmoid(gates.view(ATOMS, lmax, CHANNELS)[:, l - 1]).unsqueeze(1)
        assert (out[:, l * l:(l + 1) ** 2] - x[:, l * l:(l + 1) ** 2] * factor).abs().max() < 1e-15
    assert equivariance_error(gate, x, per_atom_rotations(lmax), gates) < 1e-14


@pytest.mark.parametrize("lmax", [2, 3])
def test_spectral_feed_forward_is_exactly_equivariant(lmax):
    feed_forward = randomised(SpectralFeedForward(CHANNELS, 8, lmax))
    assert equivariance_error(feed_forward, features(lmax), per_atom_rotations(lmax)) < 1e-13


# ----- the sphere grid -------------------------------------------------------------------
@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_sphere_grid_round_trip_is_exact_at_the_default_resolution(lmax):
    grid = SphereGrid(lmax, resolution=0)
    x = features(lmax)
    assert (grid.from_grid(grid.to_grid(x)) - x).abs().max() < 1e-13


def test_grid_feed_forward_is_equivariant_up_to_a_sampling_error_that_vanishes_on_finer_grids():
    """A pointwise MLP on grid values makes degrees above lmax, which a finite grid aliases:
    the error is several percent at eSEN's default grid and falls fast as the grid is refined."""
    lmax = 2
    x, wigner = features(lmax), per_atom_rotations(lmax)
    errors = []
    for resolution in (0, 12, 16, 24):
        torch.manual_seed(3)
        errors.append(equivariance_error(GridFeedForward(CHANNELS, 16, lmax, resolution).to(DTYPE), x, wigner))
    assert errors[0] < 0.1
    assert errors[-1] < 1e-6
    assert all(finer < coarser / 5 for coarser, finer in zip(errors[1:], errors[2:]))
