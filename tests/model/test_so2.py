"""so2.py: the SO(2) convolution commutes with rotations about the edge (the y axis of the
edge frame), gated or not, with radial weights or not, for mmax = lmax and mmax < lmax."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3

from esen_train.model.coefficients import rows_of_each_order
from esen_train.model.so2 import SO2Convolution, complex_linear
from tests.model_helpers import DTYPE, wigner_d


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_orders(x: torch.Tensor, rows: list[list[int]]) -> list[torch.Tensor]:
    """Edge-frame coefficients [E, (lmax+1)^2, C] -> orders (coefficients.py)."""
    return [x[:, order] for order in rows]


def to_coefficients(orders: list[torch.Tensor], rows: list[list[int]], lmax: int) -> torch.Tensor:
    """orders -> [E, (lmax+1)^2, C], zeros for the orders above mmax."""
    out = orders[0].new_zeros(orders[0].shape[0], (lmax + 1) ** 2, orders[0].shape[2])
    out[:, sum(rows, [])] = torch.cat(orders, dim=1)
    return out


def rolls_about_y(count: int, lmax: int) -> torch.Tensor:
    """One rotation about y per edge (angles spread over the full turn), as D [E, n, n]."""
    angles = torch.linspace(-3.0, 3.1, count, dtype=DTYPE)
    return torch.stack([wigner_d(lmax, o3.matrix_y(angle)) for angle in angles])


def convolution(in_channels: int, out_channels: int, lmax: int, mmax: int, gated: bool) -> SO2Convolution:
    """Seeded, with the bias made non-zero so that its place (m = 0 only) is tested."""
    torch.manual_seed(0)
    conv = SO2Convolution(in_channels, out_channels, lmax, mmax, gated=gated).to(DTYPE)
    with torch.no_grad():
        conv.m0.bias.normal_()
    return conv


@pytest.mark.parametrize("lmax, mmax", [(2, 2), (2, 1), (3, 2), (3, 3)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_radial", [False, True])
def test_convolution_commutes_with_a_rotation_about_the_edge(lmax, mmax, gated, with_radial):
    edges, in_channels, out_channels = 7, 3, 4
    rows = rows_of_each_order(lmax, mmax)
    conv = convolution(in_channels, out_channels, lmax, mmax, gated)
    x = torch.randn(edges, (lmax + 1) ** 2, in_channels, generator=generator(1), dtype=DTYPE)
    radial = [torch.randn(edges, size, generator=generator(2 + m), dtype=DTYPE)
              for m, size in enumerate(conv.radial_sizes)] if with_radial else None
    roll = rolls_about_y(edges, lmax)

    rolled_then_convolved = to_coefficients(conv(to_orders(roll @ x, rows), radial), rows, lmax)
    convolved_then_rolled = roll @ to_coefficients(conv(to_orders(x, rows), radial), rows, lmax)
    assert rolled_then_convolved.shape == (edges, (lmax + 1) ** 2, out_channels)
    assert (rolled_then_convolved - convolved_then_rolled).abs().max() < 1e-12 * convolved_then_rolled.abs().max()
    # The test has teeth: the output is not zero and a roll changes it.
    assert (convolved_then_rolled - to_coefficients(conv(to_orders(x, rows), radial), rows, lmax)).abs().max() > 1e-3


def test_convolution_mixes_degrees_within_each_order():
    """An SO(2) convolution couples different degrees l of the same order m (what makes it
    more than a per-degree channel mix): a single input degree reaches every output degree."""
    lmax, mmax = 2, 2
    rows = rows_of_each_order(lmax, mmax)
    conv = convolution(2, 2, lmax, mmax, gated=False)
    x = torch.zeros(1, (lmax + 1) ** 2, 2, dtype=DTYPE)
    x[0, 4:9] = 1.0  # degree 2 only
    out = to_coefficients(conv(to_orders(x, rows)), rows, lmax) - to_coefficients(
        conv(to_orders(torch.zeros_like(x), rows)), rows, lmax)  # remove the bias
    for l in (1, 2):
        assert out[0, l * l:(l + 1) ** 2].abs().max() > 1e-3


def test_complex_linear_is_complex_matrix_multiplication():
    w_real, w_imag = (torch.randn(5, 4, generator=generator(seed), dtype=DTYPE) for seed in (3, 4))
    x = torch.randn(6, 8, generator=generator(5), dtype=DTYPE)
    out = complex_linear(x, w_real, w_imag)
    expected = torch.complex(x[:, :4], x[:, 4:]) @ torch.complex(w_real, w_imag).T
    assert (out - torch.cat([expected.real, expected.imag], dim=1)).abs().max() < 1e-14


def test_radial_sizes_are_one_weight_per_input_coefficient_and_channel():
    conv = SO2Convolution(3, 4, lmax=3, mmax=2)
    assert conv.radial_sizes == [4 * 3, 3 * 3, 2 * 3]
