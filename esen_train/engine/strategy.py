"""The Strategy interface: how one process wraps the model, steps the optimizer and saves
the training state. One Strategy object per process and stage; the trainer only talks to it.

    strategy = build_strategy(config.strategy, config.direct, dist)
    strategy.setup(model, OptimSettings(lr=4e-4, weight_decay=1e-3), conservative=False)
    strategy.attach_ema(ExponentialMovingAverage(strategy.module, 0.999))
    for micro in range(grad_accum_steps):
        with (strategy.no_sync() if micro < grad_accum_steps - 1 else nullcontext()), strategy.autocast():
            strategy.backward(loss_of(strategy.model(batch)) / grad_accum_steps)
    result = strategy.step(max_grad_norm)        # StepResult(grad_norm, skipped)

Gradients are averaged over ranks by every strategy, so each rank's loss must be its share
of the global mean: local_sum / global_count * world_size.

Implementations: `DataParallelStrategy` (single, ddp; ddp.py), `FSDPStrategy` (fsdp.py),
`ZeroStrategy` (deepspeed ZeRO-1/2; zero.py). Each saves its training state in its own format
into a directory written atomically (a hidden temporary sibling, renamed once complete):

    <directory>/strategy.json        strategy name and world size that wrote it
    <directory>/extra_rank<r>.pt     the trainer's extra dict of rank r (torch.save, weights_only)
    <directory>/state.pt | dcp/ | deepspeed/   model, optimizer and EMA in the strategy's format

Multi-node saves need a file system every rank sees (as DCP and DeepSpeed do).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esen_train.engine import distributed
from esen_train.engine.config import StageConfig, StrategyConfig
from esen_train.engine.distributed import DistInfo
from esen_train.engine.ema import ExponentialMovingAverage
from esen_train.engine.optim import OptimSettings
from esen_train.evaluation.checkpoint import CheckpointError

STRATEGY_FILE = "strategy.json"


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping; inf or nan when the step was skipped
    skipped: bool  # the gradient was not finite: no parameter or optimizer state changed


class Strategy(ABC):
    """What every strategy shares. Subclasses implement `setup`, `_save_state`, `_load_state`
    and, where the parameters are not replicated or the optimizer is not torch's, the rest."""

    name: str

    def __init__(self, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        if precision == "bf16" and dist.device.type != "cuda":
            warnings.warn("bf16 autocast is applied on GPUs only; this run on the CPU stays in float32", stacklevel=2)
        self.dist = dist
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.model: nn.Module | None = None  # call this for the forward pass
        self.module: nn.Module | None = None  # the plain model inside any wrapper
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: ExponentialMovingAverage | None = None

    # ----- set-up ------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        """Wrap `model` (already on `dist.device`) and build the optimizer. `conservative`
        says the forward pass differentiates through itself (double backward)."""

    def attach_ema(self, ema: ExponentialMovingAverage) -> None:
        """The EMA saved, loaded and exported with the model (created on `self.module` after setup)."""
        self.ema = ema

    # ----- one optimizer step ------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.precision == "bf16" and self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def no_sync(self) -> AbstractContextManager:
        """Wrap the forward and backward of every micro-step but the last of an accumulation."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> StepResult:
        """Clip to `max_grad_norm`, step unless the global gradient norm is non-finite (the
        same decision on every rank, since the norm is global), and zero the gradients."""
        norm = self._clip_grad_norm(max_grad_norm)
        skipped = not math.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm, skipped=skipped)

    def _clip_grad_norm(self, max_grad_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_grad_norm))

    @property
    def lr(self) -> float:
        """The step's learning rate (groups with an lr_scale run at this times their scale)."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # ----- weights for inference ---------------------------------------------------
    def full_state_dict(self, use_ema: bool) -> dict | None:
        """Full, unsharded weights (buffers included; the EMA's parameters if `use_ema`) on the
        CPU of rank 0, None on the other ranks. Collective: call it on every rank."""
        if use_ema and self.ema is None:
            raise RuntimeError("full_state_dict(use_ema=True) needs an EMA: call attach_ema first")
        if not distributed.is_main():
            return None
        state = dict(self.module.state_dict())
        if use_ema:
            state.update(self.ema.shadow)
        return {name: value.detach().cpu().clone() for name, value in state.items()}

    # ----- full training state -----------------------------------------------------
    def save(self, directory: str | Path, extra: dict) -> None:
        """Write model, optimizer, EMA and `extra` (this rank's trainer state: tensors and
        primitives only) into `directory`, replacing it atomically. Collective."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        torch.save(extra, tmp / f"extra_rank{self.dist.rank}.pt")
        self._save_state(tmp)
        if distributed.is_main():
            (tmp / STRATEGY_FILE).write_text(json.dumps({"strategy": self.name, "world_size": self.dist.world_size}))
        distributed.barrier()
        if distributed.is_main():
            _publish(tmp, directory)
        distributed.barrier()

    def load(self, directory: str | Path) -> dict:
        """Restore model, optimizer and EMA from `directory`; returns this rank's extra dict
        (rank 0's when the checkpoint was written by fewer ranks). Collective. A file that
        cannot be read raises CheckpointError naming it."""
        directory = Path(directory)
        written = self._read_strategy_file(directory)
        extra_file = directory / f"extra_rank{self.dist.rank}.pt"
        if not extra_file.is_file():
            extra_file = directory / "extra_rank0.pt"
        extra = read_torch_file(extra_file, map_location="cpu")
        if not isinstance(extra, dict):
            raise CheckpointError(f"{extra_file}: expected the trainer's dict, found {type(extra).__name__}")
        try:
            self._load_state(directory, saved_world_size=written["world_size"])
        except CheckpointError:
            raise
        except Exception as error:  # a state that does not fit this model or optimizer
            raise CheckpointError(f"{directory}: the training state cannot be loaded ({type(error).__name__}: {error})") from error
        return extra

    def _read_strategy_file(self, directory: Path) -> dict:
        path = directory / STRATEGY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a training-state directory: {STRATEGY_FILE} is missing")
        try:
            record = json.loads(path.read_text())
            written = {"strategy": str(record["strategy"]), "world_size": int(record["world_size"])}
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: not a valid strategy record ({type(error).__name__}: {error})") from None
        if _format_of(written["strategy"]) != _format_of(self.name):
            raise CheckpointError(
                f"{path}: this training state was written by strategy {written['strategy']!r}, whose format "
                f"strategy {self.name!r} cannot read; resume with strategy.name={written['strategy']}, or start "
                f"from the checkpoint's model.pt instead"
            )
        return written

    @abstractmethod
    def _save_state(self, directory: Path) -> None:
        """Write model, optimizer and EMA into `directory` (a temporary one). Collective."""

    @abstractmethod
    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        """Read what `_save_state` wrote, possibly by another number of ranks. Collective."""


def read_torch_file(path: Path, map_location) -> object:
    """torch.load with weights_only=True; a missing or unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path}: not a readable torch file ({type(error).__name__}: {reason})") from None


def _format_of(strategy_name: str) -> str:
    """single and ddp share one format (a plain torch.save dict)."""
    return "torch" if strategy_name in ("single", "ddp") else strategy_name


def _publish(tmp: Path, directory: Path) -> None:
    """Move a completed temporary directory into place. An existing directory is moved aside
    first (os.replace cannot replace a non-empty directory) and deleted afterwards."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def build_strategy(config: StrategyConfig, stage: StageConfig, dist: DistInfo) -> Strategy:
    """The strategy named by `config.name` for one stage (its precision and accumulation)."""
    # Imported here: the implementations import this module, and DeepSpeed is slow to
    # import, so only a deepspeed run pays for it.
    from esen_train.engine.ddp import DataParallelStrategy
    from esen_train.engine.fsdp import FSDPStrategy

    common = dict(dist=dist, precision=stage.precision, grad_accum_steps=stage.grad_accum_steps)
    if config.name in ("single", "ddp"):
        if config.name == "single" and dist.world_size > 1:
            raise ValueError(f"strategy 'single' runs one process, but the world has {dist.world_size}: use ddp, fsdp or deepspeed")
        return DataParallelStrategy(name=config.name, **common)
    if config.name == "fsdp":
        return FSDPStrategy(**common)
    if config.name == "deepspeed":
        from esen_train.engine.zero import ZeroStrategy

        return ZeroStrategy(zero_stage=config.zero_stage, **common)
    raise ValueError(f"unknown strategy {config.name!r}: use single, ddp, fsdp or deepspeed")
