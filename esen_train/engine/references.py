"""Reference energies of a model loaded from a checkpoint, for fine-tuning on new data.

A pretrained network has learnt energies relative to its checkpoint's per-element reference
energies. New data (another DFT code, functional or pseudopotentials) usually differs from
the old by an offset per element; `refit_references` finds it: the per-element least-squares
fit of E_data - E_model over the training set, added to the checkpoint's references, so the
loaded model starts as close to the new data as a per-element shift can bring it.
`given_references` replaces the references of the elements the user names.
"""
from __future__ import annotations

import numpy as np
import torch
from ase.data import atomic_numbers

from esen_train.data.stats import least_squares_references
from esen_train.engine import distributed
from esen_train.model import ESEN


@torch.no_grad()
def refit_references(model: ESEN, loader, device: torch.device) -> torch.Tensor:
    """The checkpoint's references plus the least-squares correction (see module doc), from
    one pass over `loader` (this rank's part of the training set; the sums are all-reduced)."""
    size = model.reference_energies.numel()
    gram = torch.zeros(size, size, dtype=torch.float64, device=device)
    moment = torch.zeros(size, dtype=torch.float64, device=device)
    for batch in loader.epoch():
        batch = batch.to(device)
        residual = batch.energy.double() - model(batch, forces="none")["energy"]
        counts = torch.zeros(batch.natoms.shape[0], size, dtype=torch.float64, device=device)
        counts.index_put_((batch.batch, batch.atomic_numbers.long()), torch.ones_like(batch.batch, dtype=torch.float64),
                          accumulate=True)
        gram += counts.T @ counts
        moment += counts.T @ residual
    distributed.all_reduce_sum(gram)
    distributed.all_reduce_sum(moment)
    shift = least_squares_references(gram.cpu().numpy(), moment.cpu().numpy())
    return model.reference_energies.cpu() + torch.from_numpy(shift)


def given_references(current: torch.Tensor, given: dict[str, float]) -> torch.Tensor:
    """`current` (indexed by Z) with the given elements' values (keys: element symbols)."""
    references = current.detach().cpu().clone()
    for symbol, energy in given.items():
        references[atomic_numbers[symbol]] = float(energy)
    return references


def describe_changes(before: torch.Tensor, after: torch.Tensor) -> str:
    changed = np.flatnonzero((before.cpu() != after.cpu()).numpy())
    return ", ".join(f"Z={z}: {before[z]:.4f} -> {after[z]:.4f} eV" for z in changed) or "unchanged"
