"""The model trains under bf16 autocast, the trainer's GPU precision (`<stage>.precision=bf16`).

Checked with the CPU's autocast, which casts the same matmul-like ops (linear, mm, bmm) to
bfloat16: a dtype mismatch inside the model (a float32 buffer meeting a bfloat16 activation
in an index_add, a cat or the double backward) fails here as it would on a GPU. bfloat16
keeps 8 bits of mantissa (relative rounding 0.4 %), so the outputs and gradients are
compared with float32's to a few percent, and must differ from them at all (autocast took effect).
"""
import pytest
import torch

from tests.model_helpers import mixed_batch, tiny_model

RELATIVE_TOLERANCE = 0.05


def train_step(forces: str, bf16: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Outputs of one float32 training step of the tiny model on the mixed batch (a molecule,
    a crystal, a slab) and the parameters' gradients, flattened."""
    model = tiny_model(direct_forces=forces == "direct").float()
    batch = mixed_batch(model.config.cutoff)
    batch.pos, batch.cell, batch.cell_offsets = batch.pos.float(), batch.cell.float(), batch.cell_offsets.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch, forces=forces, stress=True, create_graph=True)
        loss = sum(value.float().square().mean() for value in out.values())
        loss.backward(inputs=list(model.parameters()))
    gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {key: value.detach() for key, value in out.items()}, gradients


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("forces", ["conservative", "direct"])
def test_training_step_under_bf16_autocast_stays_close_to_float32(forces):
    reference, reference_gradients = train_step(forces, bf16=False)
    out, gradients = train_step(forces, bf16=True)
    assert gradients.dtype == torch.float32 and torch.isfinite(gradients).all()
    assert 0 < relative_difference(gradients, reference_gradients) < RELATIVE_TOLERANCE
    assert out["energy"].dtype == torch.float64  # references stay exact (test_model_energy_precision.py)
    for key in ("energy", "forces", "stress"):
        assert torch.isfinite(out[key]).all(), key
        assert 0 < relative_difference(out[key], reference[key]) < RELATIVE_TOLERANCE, key
