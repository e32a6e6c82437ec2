"""radial.py: the Gaussian basis, the polynomial envelope (smooth to zero at the cutoff) and
the radial MLP's term-by-term first layer."""
from __future__ import annotations

import math

import pytest
import torch

from esen_train.model.radial import EdgeScalars, GaussianBasis, PolynomialEnvelope, RadialMLP
from tests.model_helpers import DTYPE

CUTOFF = 5.0


def test_gaussian_basis_centres_and_width():
    basis = GaussianBasis(CUTOFF, num_basis=6, width=2.0).to(DTYPE)
    centres = torch.linspace(0.0, CUTOFF, 6, dtype=DTYPE)
    values = basis(centres)
    assert values.shape == (6, 6)
    assert torch.allclose(torch.diagonal(values), torch.ones(6, dtype=DTYPE), rtol=0, atol=1e-15)
    # Neighbouring centres are one spacing apart: exp(-1 / (2 width^2)).
    assert torch.allclose(torch.diagonal(values, 1), torch.full((5,), math.exp(-1 / 8), dtype=DTYPE), rtol=1e-14)
    distance = torch.tensor([0.3, 2.71, 4.9], dtype=DTYPE)
    expected = torch.exp(-(distance.view(-1, 1) - centres) ** 2 / (2 * (2.0 * CUTOFF / 5) ** 2))
    assert torch.allclose(basis(distance), expected, rtol=1e-14, atol=0)


def expanded_envelope(x: torch.Tensor, p: int) -> torch.Tensor:
    """The envelope as written in its docstring (and in DimeNet), not in the factored form."""
    return 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)


@pytest.mark.parametrize("exponent", [2, 3, 5, 8])
def test_envelope_is_the_polynomial_it_names(exponent):
    envelope = PolynomialEnvelope(CUTOFF, exponent)
    distance = torch.linspace(0.0, CUTOFF * 0.999, 50, dtype=DTYPE)
    assert (envelope(distance) - expanded_envelope(distance / CUTOFF, exponent)).abs().max() < 1e-13
    assert torch.all(torch.diff(envelope(distance)) < 0)  # falls monotonically from 1 towards 0
    beyond = torch.tensor([CUTOFF, CUTOFF * 1.01, 2 * CUTOFF], dtype=DTYPE)
    assert torch.equal(envelope(beyond), torch.zeros(3, dtype=DTYPE))


@pytest.mark.parametrize("exponent", [3, 5])
def test_envelope_value_and_two_derivatives_vanish_at_the_cutoff(exponent):
    envelope = PolynomialEnvelope(CUTOFF, exponent)
    distance = torch.tensor([0.0, CUTOFF * (1 - 1e-7), CUTOFF, CUTOFF * 1.2], dtype=DTYPE, requires_grad=True)
    value = envelope(distance)
    (first,) = torch.autograd.grad(value.sum(), distance, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), distance)
    assert value[0] == 1.0 and first[0] == 0.0
    assert abs(value[1]) < 1e-18 and abs(first[1]) < 1e-12 and abs(second[1]) < 1e-5
    assert value[2] == 0.0 and first[2] == 0.0 and second[2] == 0.0
    assert value[3] == 0.0 and first[3] == 0.0


@pytest.mark.parametrize("exponent", [3, 5])
def test_envelope_near_the_cutoff_is_its_leading_term_without_round_off(exponent):
    """u(1 - d) = C(p+2, 3) d^3 (1 + O(d)): the factored form keeps full relative precision
    where the expanded polynomial would be all cancellation (its terms are of order 10)."""
    envelope = PolynomialEnvelope(CUTOFF, exponent)
    gap = torch.tensor([1e-6, 1e-8], dtype=DTYPE)
    value = envelope(CUTOFF * (1 - gap))
    leading = math.comb(exponent + 2, 3) * gap**3
    assert ((value / leading) - 1).abs().max() < 1e-4


def test_radial_mlp_equals_its_layers_on_the_concatenated_edge_scalars():
    """The first layer applied term by term (element terms from per-element tables) is exactly
    the plain stack applied to [basis, source embedding, target embedding]."""
    torch.manual_seed(0)
    num_basis, channels, elements, edges = 6, 4, 3, 9
    mlp = RadialMLP(num_basis, channels, out_sizes=[5, 2, 7]).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    scalars = EdgeScalars(
        basis=torch.rand(edges, num_basis, generator=generator, dtype=DTYPE),
        source_element=torch.randint(elements, (edges,), generator=generator),
        target_element=torch.randint(elements, (edges,), generator=generator),
        source_table=torch.randn(elements, channels, generator=generator, dtype=DTYPE),
        target_table=torch.randn(elements, channels, generator=generator, dtype=DTYPE),
    )
    outputs = mlp(scalars)
    assert [tuple(out.shape) for out in outputs] == [(edges, 5), (edges, 2), (edges, 7)]
    concatenated = torch.cat([scalars.basis, scalars.source_table[scalars.source_element],
                              scalars.target_table[scalars.target_element]], dim=1)
    expected = mlp.layers(concatenated)
    assert (torch.cat(outputs, dim=1) - expected).abs().max() < 1e-14
