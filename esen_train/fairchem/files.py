"""fairchem's checkpoint files, read without unpickling anything but an allow-list, and written.

Two containers hold fairchem's released eSEN models:
- fairchem-core 1.x (eSEN v1: eSEN-30M-OAM, -MP, -OMAT24): a dict from `torch.save` with
  "state_dict", "config", "normalizers", "elementrefs" and, in training checkpoints, "ema"
  (torch_ema's state) and optimizer state; plain dicts, lists, numbers and tensors.
- fairchem-core 2.x (eSCNMD models: the OMol25 eSEN models, OC25, ODAC25): an
  `MLIPInferenceCheckpoint` dataclass (model_config, model_state_dict, ema_state_dict,
  tasks_config) whose configs are omegaconf containers.

`read_fairchem_file` loads either with `torch.load(weights_only=True)` and exactly the
classes such files hold allow-listed (`ALLOWED_GLOBALS`); fairchem's dataclass is read into
`InferenceCheckpoint`, a stand-in of our own with the same fields, so fairchem need not be
installed. A file that holds any other class is refused with that class's name: nothing
outside the list is ever imported or called.

`write_inference_checkpoint` writes the 2.x container (plain dict configs) that fairchem's
own `load_inference_model` and calculator read.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import AnyNode

INFERENCE_CHECKPOINT_MODULE = "fairchem.core.units.mlip_unit.api.inference"
INFERENCE_CHECKPOINT_CLASS = "MLIPInferenceCheckpoint"


class FairchemFormatError(ValueError):
    """A fairchem file that cannot be read or used; the message names the file and what."""


@dataclass
class InferenceCheckpoint:
    """fairchem-core 2.x's MLIPInferenceCheckpoint, field for field."""

    model_config: Any
    model_state_dict: dict
    ema_state_dict: dict | None
    tasks_config: Any


# What fairchem's files hold besides what torch.load(weights_only=True) always allows
# (dicts, lists, OrderedDict, numbers, strings, tensors): the 2.x dataclass, and the
# omegaconf containers, nodes and metadata of its configs.
ALLOWED_GLOBALS = [
    (InferenceCheckpoint, f"{INFERENCE_CHECKPOINT_MODULE}.{INFERENCE_CHECKPOINT_CLASS}"),
    DictConfig,
    ListConfig,
    AnyNode,
    ContainerMetadata,
    Metadata,
    Any,
    defaultdict,
    dict,
    list,
    int,
]


def read_fairchem_file(path: str | Path) -> InferenceCheckpoint | dict:
    """The object in a fairchem checkpoint file; classes outside ALLOWED_GLOBALS are refused."""
    path = Path(path)
    if not path.is_file():
        raise FairchemFormatError(f"fairchem checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"the class {refused.group(1)}" if refused else f"an object this reader does not allow ({error})"
        raise FairchemFormatError(
            f"{path}: holds {what}, which fairchem's eSEN checkpoints do not; refused (nothing outside "
            "esen_train.fairchem.files.ALLOWED_GLOBALS and tensors is unpickled)"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise FairchemFormatError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None


def plain(value: Any, where: str) -> Any:
    """omegaconf containers (interpolations resolved) as plain dicts and lists."""
    if OmegaConf.is_config(value):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as error:
            raise FairchemFormatError(f"{where}: cannot be resolved ({str(error).splitlines()[0]})") from None
    return value


# ----- writing -----------------------------------------------------------------------------
class _FairchemPickler(pickle._Pickler):
    """Pickles `InferenceCheckpoint` under fairchem's class name, so that fairchem reads it
    as its own MLIPInferenceCheckpoint (pickle would otherwise refuse a class whose name is
    not importable here)."""

    def save_global(self, obj, name=None):
        if obj is InferenceCheckpoint:
            self.write(pickle.GLOBAL + f"{INFERENCE_CHECKPOINT_MODULE}\n{INFERENCE_CHECKPOINT_CLASS}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _PickleModule:
    """What torch.save needs of a pickle module, with `_FairchemPickler`."""

    Pickler = _FairchemPickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL


def write_inference_checkpoint(checkpoint: InferenceCheckpoint, path: Path) -> None:
    """torch.save the 2.x container to `path` atomically (temporary file, then rename)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, pickle_module=_PickleModule)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)
