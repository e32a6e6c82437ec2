"""Large total energies keep meV precision in a float32 model: the per-element references
stay float64 through `model.to(dtype)` and the total energy is returned in float64."""
import torch

from tests.model_helpers import rattled_molecule, tiny_model, to_batch


def test_float32_model_returns_float64_energy_with_exact_references():
    model = tiny_model()
    references = torch.zeros(model.config.max_num_elements + 1, dtype=torch.float64)
    references[1], references[6], references[8] = -13.6123456789, -1029.4567891234, -2041.9876543219
    model.set_reference_energies(references)
    model.float()
    assert model.reference_energies.dtype == torch.float64 and model.energy_scale.dtype == torch.float64
    atoms = rattled_molecule()
    batch = to_batch([atoms], model.config.cutoff)
    batch.pos, batch.cell, batch.cell_offsets = batch.pos.float(), batch.cell.float(), batch.cell_offsets.float()
    energy = model(batch, forces="none")["energy"]
    assert energy.dtype == torch.float64
    model.set_reference_energies(torch.zeros_like(references))
    residual = model(batch, forces="none")["energy"]
    expected_references = references[torch.as_tensor(atoms.numbers)].sum()
    # float32 would round a total of ~-10^4 eV to ~1 meV; float64 keeps it to round-off.
    assert abs(float(energy - residual) - float(expected_references)) < 1e-9
