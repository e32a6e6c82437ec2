"""`compile_model`: compiled and eager eSEN agree, double backward included (float64).

Compiling is slow on this machine, so one small molecule batch and one model cover both
modes: conservative training outputs with their parameter gradients, and direct outputs.
"""
from __future__ import annotations

import pytest
import torch
from ase.build import molecule

from esen_train.model import compile_model
from tests.model_helpers import relative_error, tiny_model, to_batch


@pytest.mark.slow
def test_compiled_model_matches_eager_including_double_backward():
    eager = tiny_model(direct_forces=True, num_layers=1)
    compiled = compile_model(tiny_model(direct_forces=True, num_layers=1))
    batch = to_batch([molecule("H2O"), molecule("NH3")], eager.config.cutoff)

    def training_outputs(model):
        out = model(batch, create_graph=True)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
        return out, grads

    (out_eager, grads_eager), (out_compiled, grads_compiled) = training_outputs(eager), training_outputs(compiled)
    for key in ("energy", "forces"):
        assert relative_error(out_compiled[key].detach(), out_eager[key].detach()) < 1e-10
    for eager_grad, compiled_grad in zip(grads_eager, grads_compiled):
        assert torch.allclose(compiled_grad, eager_grad, rtol=1e-9, atol=1e-12)

    direct_eager, direct_compiled = eager(batch, forces="direct"), compiled(batch, forces="direct")
    for key in ("energy", "forces"):
        assert relative_error(direct_compiled[key].detach(), direct_eager[key].detach()) < 1e-10
