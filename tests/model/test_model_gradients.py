"""Gradients of the tiny model in float64: edges along the frame's pole, double backward for
training, batching, detaching, head hand-over. Forces and stress equal to finite differences
of the energy are checked for several configs in tests/model/test_conformance.py."""
from __future__ import annotations

import pytest
import torch
from ase import Atoms

from esen_train.data.emt import emt_structure
from esen_train.model import ESEN
from tests.model_helpers import (
    mixed_batch,
    random_rotation,
    rattled_alloy,
    rattled_molecule,
    rattled_slab,
    relative_error,
    tiny_config,
    tiny_model,
    to_batch,
    transformed,
)

STEP = 1e-5  # central differences: truncation ~ STEP^2, round-off ~ 1e-16 / STEP


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch(model):
    return mixed_batch(model.config.cutoff)


def energies(model: ESEN, batch) -> torch.Tensor:
    return model(batch, forces="none")["energy"].detach()


def test_edges_along_the_frame_pole_and_in_its_equator_are_regular(model):
    """Edges exactly parallel and antiparallel to y (where the frame's chart has its pole) and
    exactly in the y = 0 plane (where the two charts meet): forces are finite, equal the
    energy's gradient and rotate with the structure; the double backward is finite too."""
    atoms = Atoms("CNOC", positions=[[0, 0, 0], [0, 1.3, 0], [0, -1.2, 0], [1.1, 0, 0.4]])
    batch = to_batch([atoms], model.config.cutoff)
    out = model(batch, create_graph=True)
    assert torch.isfinite(out["forces"]).all()
    loss = out["forces"].square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)

    numerical = torch.zeros_like(batch.pos)
    for atom in range(len(atoms)):
        for axis in range(3):
            plus, minus = batch.clone(), batch.clone()
            plus.pos, minus.pos = batch.pos.clone(), batch.pos.clone()
            plus.pos[atom, axis] += STEP
            minus.pos[atom, axis] -= STEP
            numerical[atom, axis] = -(energies(model, plus) - energies(model, minus)).sum() / (2 * STEP)
    assert relative_error(out["forces"].detach(), numerical) < 1e-6

    rotation = random_rotation(5)
    rotated = model(transformed(batch, rotation))
    assert relative_error(rotated["forces"], out["forces"].detach() @ rotation.T) < 1e-10


def test_double_backward_matches_finite_differences_in_a_weight(model, batch):
    """The training loss on forces and stress (create_graph=True) differentiates correctly
    with respect to a weight, here one entry of the first block's radial MLP."""
    weight = model.backbone.blocks[0].edgewise.radial.layers[3].weight

    def loss() -> torch.Tensor:
        out = model(batch, create_graph=True)
        return out["forces"].square().sum() + out["stress"].square().sum() + out["energy"].square().sum()

    (gradient,) = torch.autograd.grad(loss(), [weight])
    with torch.no_grad():
        original = weight[2, 5].item()
        weight[2, 5] = original + STEP
        up = loss().item()
        weight[2, 5] = original - STEP
        down = loss().item()
        weight[2, 5] = original
    assert abs(gradient[2, 5].item() - (up - down) / (2 * STEP)) < 1e-6 * abs(gradient[2, 5].item())


def test_a_mixed_batch_equals_each_structure_alone(model, batch):
    together = model(batch)
    start = 0
    for index, atoms in enumerate([rattled_alloy(), rattled_molecule(), rattled_slab()]):
        alone = model(to_batch([atoms], model.config.cutoff))
        count = len(atoms)
        assert relative_error(together["energy"][index:index + 1], alone["energy"]) < 1e-12
        assert relative_error(together["forces"][start:start + count], alone["forces"]) < 1e-12
        assert torch.allclose(together["stress"][index:index + 1], alone["stress"], rtol=1e-12, atol=1e-15)
        start += count


def test_outputs_detached_for_inference_and_attached_for_training(model, batch):
    with torch.no_grad():
        out = model(batch)
    assert not any(value.requires_grad for value in out.values())
    out = model(batch, create_graph=True)
    assert all(value.requires_grad for value in out.values())
    direct = tiny_model(direct_forces=True)(batch, forces="direct")
    assert all(value.requires_grad for value in direct.values())


def test_direct_pretrained_weights_load_strictly_without_the_direct_heads(batch):
    direct = tiny_model(seed=3, direct_forces=True)
    conservative = ESEN(tiny_config(direct_forces=False)).to(torch.float64)
    state = direct.state_dict()
    assert any(key.startswith("direct_heads.") for key in state)
    conservative.load_state_dict(ESEN.backbone_state_dict(state), strict=True)
    assert torch.equal(conservative(batch, forces="none")["energy"], direct(batch, forces="none")["energy"])


def test_bad_requests_fail_clearly(model, batch):
    with pytest.raises(ValueError, match="direct_forces=False"):
        model(batch, forces="direct")
    with pytest.raises(ValueError, match="forces must be one of"):
        model(batch, forces="autograd")
    wrong = batch.clone()
    wrong.atomic_numbers = batch.atomic_numbers.clone()
    wrong.atomic_numbers[0] = 0
    with pytest.raises(ValueError, match="atomic_numbers must be in 1..100"):
        model(wrong)
    with pytest.raises(ValueError, match="shape"):
        model.set_reference_energies(torch.zeros(5))


def test_forces_and_gradients_repeat_bit_for_bit_on_two_threads():
    """Exact resume needs a training step to repeat itself: with several CPU threads, the
    backward of the model's gathers must not add up in a thread-dependent order (esen.py's
    module doc). In float32, as training runs: torch splits the backward of `x[index]` between
    threads for float32 only. Eight EMT structures, about 3,500 edges: enough to be split."""
    model = tiny_model().float()
    batch = to_batch([emt_structure(0, index) for index in range(8)], model.config.cutoff)
    for key in ("pos", "cell", "cell_offsets"):
        batch[key] = batch[key].float()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]

        def forces_stress_and_gradients() -> list[torch.Tensor]:
            out = model(batch, forces="conservative", stress=True, create_graph=True)
            loss = out["energy"].sum() + out["forces"].square().sum() + out["stress"].square().sum()
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True, materialize_grads=True)
            return [out["forces"].detach(), out["stress"].detach(), *gradients]

        first = forces_stress_and_gradients()
        for _ in range(3):
            for value, again in zip(first, forces_stress_and_gradients()):
                assert torch.equal(value, again)
    finally:
        torch.set_num_threads(threads)
