"""A step-based, exactly resumable loader of atom-balanced graph batches.

The trainer counts optimizer steps, not epochs: `next_batch()` returns the next
batch and rolls into the next epoch (a new permutation) when one ends.
`state_dict()` counts the batches the trainer has *received*, not the ones the
workers have prefetched, so a run resumed from it continues with exactly the
batch that would have come next. `epoch()` yields the rest of the current epoch
(a whole pass for a fresh loader), which is what validation wants.

Each DataLoader worker builds whole batches (the sampler is the DataLoader's
`batch_sampler`); workers stay alive across epochs.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader
from torch_geometric.data import Batch, Data

from esen_train.data.dataset import LMDBDataset
from esen_train.data.sampler import AtomBalancedBatchSampler


def collate_graphs(graphs: list[Data]) -> Batch:
    return Batch.from_data_list(graphs)


class ResumableLoader:
    """Endless stream of this rank's batches, epoch after epoch."""

    def __init__(self, dataset: LMDBDataset, sampler: AtomBalancedBatchSampler, num_workers: int) -> None:
        self.sampler = sampler
        self._loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_graphs,
            persistent_workers=num_workers > 0,
        )
        self._iterator: Iterator[Batch] | None = None
        self._epoch = sampler.epoch
        self._batches_done = sampler.batches_done

    def __len__(self) -> int:
        """Batches in the current epoch (the same on every rank)."""
        return len(self.sampler)

    @property
    def current_epoch(self) -> int:
        return self._epoch

    def next_batch(self) -> Batch:
        """The next batch of this rank; after the last batch of an epoch, the first of the next."""
        while True:
            if self._iterator is None:
                # The sampler starts where the consumed count says (a resume offset, or 0).
                self._iterator = iter(self._loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._start_epoch(self._epoch + 1)
                continue
            self._batches_done += 1
            return batch

    def epoch(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; afterwards the loader is at the next epoch."""
        for _ in range(len(self) - self._batches_done):
            yield self.next_batch()
        self._start_epoch(self._epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after `state["batches_done"]` batches of epoch `state["epoch"]`.

        Batches that workers had already prefetched are dropped.
        """
        self.sampler.load_state_dict(state)
        self._epoch = int(state["epoch"])
        self._batches_done = int(state["batches_done"])
        self._iterator = None

    def _start_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._epoch = epoch
        self._batches_done = 0
        self._iterator = None


def build_dataloader(
    dataset: LMDBDataset,
    max_atoms: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    shuffle: bool = True,
) -> ResumableLoader:
    """This rank's loader; `max_atoms` caps the atoms of a global batch (all ranks together)."""
    sampler = AtomBalancedBatchSampler(dataset.natoms, max_atoms, rank, world_size, seed, shuffle)
    return ResumableLoader(dataset, sampler, num_workers)
