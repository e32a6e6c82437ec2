"""benchmarks/rotation_forms.py: the per-degree form it times is the model's rotation, value and gradients."""
from __future__ import annotations

import pytest
import torch

from esen_train.model.coefficients import edge_order
from esen_train.model.rotation import WignerD, edge_frames
from tests.benchmark_helpers import load_benchmark

FORMS = load_benchmark("rotation_forms")


@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_per_degree_rotation_equals_the_model_s_in_float64(lmax):
    torch.manual_seed(lmax)
    size = (lmax + 1) ** 2
    rows, order_sizes = edge_order(lmax, lmax)
    vectors = torch.nn.functional.normalize(torch.randn(40, 3, dtype=torch.float64), dim=1).requires_grad_()
    x = torch.randn(40, size, 6, dtype=torch.float64, requires_grad=True)
    wigner = WignerD(lmax)(edge_frames(vectors))
    outputs = [form(wigner, x, rows, order_sizes) for form in (FORMS.one_bmm, FORMS.per_degree)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)
    gradients = [torch.autograd.grad((out ** 2).sum(), (vectors, x), retain_graph=True) for out in outputs]
    for per_degree, one_bmm in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(per_degree, one_bmm, rtol=0, atol=1e-10)
