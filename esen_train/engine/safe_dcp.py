"""Reading torch.distributed.checkpoint (DCP) directories without unpickling arbitrary objects.

DCP stores tensors safely, but it reads its `.metadata` file with plain `pickle.load` and every
non-tensor value (learning rates, betas, counters) with torch's unrestricted (pickle) loader.
This project never unpickles what it reads from disk, so `load_dcp` swaps in a metadata reader
that accepts only DCP's own metadata classes and a planner that reads values weights-only.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata"

# Everything DCP's metadata pickles: its own dataclasses and enum, the file-slice record,
# torch.Size, dtypes and layouts.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{self.path}: DCP metadata refers to {module}.{name}, which is not a DCP metadata class")


class _SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} is not a DCP checkpoint: {METADATA_FILE} is missing")
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file, path).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, reading non-tensor values with weights_only=True. Keys starting with
    one of `optional_prefixes` may be absent from the checkpoint; any other absent key fails."""

    def __init__(self, path: Path, optional_prefixes: tuple[str, ...]) -> None:
        super().__init__(allow_partial_load=True)
        self.path = path
        self.optional_prefixes = optional_prefixes

    def create_local_plan(self):
        absent = [key for key in self.state_dict if key not in self.metadata.state_dict_metadata]
        required = [key for key in absent if not key.startswith(self.optional_prefixes)]
        if required:
            raise KeyError(f"{self.path}: the checkpoint lacks {len(required)} entries, e.g. {required[:5]}")
        return super().create_local_plan()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def save_dcp(state: dict, directory: Path) -> None:
    """Collective: every rank writes its shards into `directory`."""
    dcp.save(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())


def load_dcp(state: dict, directory: Path, optional_prefixes: tuple[str, ...] = ()) -> None:
    """Collective: fill `state` (its tensors in place, its other values by key) from `directory`,
    resharding when it was written by another number of ranks. Entries whose flattened key
    ("optimizer.state.<param>.exp_avg", ...) starts with one of `optional_prefixes` keep their
    current value when the checkpoint lacks them."""
    dcp.load(
        state,
        storage_reader=_SafeFileSystemReader(str(directory)),
        planner=_WeightsOnlyLoadPlanner(directory, optional_prefixes),
        no_dist=not dist.is_initialized(),
    )
