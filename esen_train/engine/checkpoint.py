"""Checkpoint directories of one stage: RUN/checkpoints/<stage>/{step_<n>, last, best}.

A checkpoint is built in a hidden temporary directory and renamed into place, so a crash
never leaves one that looks valid. `last` and `best` are relative symlinks to step
directories, swapped atomically with `os.replace`. Each checkpoint holds:
- `model.pt`: the full model and EMA weights with the model config and the elements of the
  training data (what inference reads, whatever the strategy), loadable with
  `torch.load(weights_only=True)`;
- `train_state/`: the strategy's own full training state (optimizer, sampler, RNG, step).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from esen_train.engine import distributed
from esen_train.evaluation.checkpoint import FORMAT_VERSION, MODEL_FILE
from esen_train.model import ModelConfig

STATE_DIR = "train_state"


class CheckpointManager:
    def __init__(self, stage_dir: Path, keep_last: int, elements: list[int]) -> None:
        self.stage_dir = stage_dir
        self.keep_last = keep_last
        self.elements = list(elements)  # atomic numbers of the training data

    @property
    def last(self) -> Path:
        return self.stage_dir / "last"

    @property
    def best(self) -> Path:
        return self.stage_dir / "best"

    def has_last(self) -> bool:
        return (self.last / MODEL_FILE).is_file()

    def save(self, strategy, ema, model_config: ModelConfig, stage: str, step: int, metrics: dict, extra: dict, is_best: bool) -> Path:
        """Collective: every rank calls it. Returns the new step directory."""
        final = self.stage_dir / f"step_{step:08d}"
        tmp = self.stage_dir / f".step_{step:08d}.tmp"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        weights = strategy.full_state_dict(use_ema=False)
        ema_weights = strategy.full_state_dict(use_ema=True) if ema is not None else None
        if distributed.is_main():
            payload = {
                "format_version": FORMAT_VERSION,
                "model_config": asdict(model_config),
                "model": weights,
                "ema": ema_weights,
                "stage": stage,
                "step": step,
                "metrics": dict(metrics),
                "elements": self.elements,
            }
            torch.save(payload, tmp / MODEL_FILE)
            (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
        strategy.save(tmp / STATE_DIR, extra)
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _point(self.last, final)
            if is_best:
                _point(self.best, final)
            self._prune()
        distributed.barrier()
        return final

    def load_state(self, strategy) -> dict:
        """Restore the training state of `last`; returns the trainer's extra dict."""
        return strategy.load(self.last.resolve() / STATE_DIR)

    def _prune(self) -> None:
        keep = {self.last.resolve(), self.best.resolve() if self.best.exists() else None}
        steps = sorted(self.stage_dir.glob("step_*"))
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            if old.resolve() not in keep:
                shutil.rmtree(old)


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)

