"""Checkpoint directories of one stage: RUN/checkpoints/<stage>/{step_<n>, last, best}.

`CheckpointManager` alone creates, publishes, checks and prunes them; the strategy only writes
its files into the `train_state/` folder it is given. A checkpoint is built in a hidden
temporary directory and renamed into place, so a crash never leaves one that looks valid.
`last` and `best` are relative symlinks to step directories, swapped atomically with
`os.replace`. Each checkpoint holds:
- `model.pt`: the full model and EMA weights with the model config and the elements of the
  training data (what inference reads, whatever the strategy), loadable with
  `torch.load(weights_only=True)`;
- `train_state/`: the strategy's own full training state (optimizer, sampler, RNG, step);
- `contents.json`: the size and SHA-256 of every other file, written last. A checkpoint is
  intact when every file it lists is there with that size and checksum.

A stage resumes from its newest intact step directory, found by content: the `last` link is
for people and tools, and a copy that drops symlinks loses it. A damaged newer checkpoint is
renamed to `step_<n>.damaged-<time>` (kept for inspection) with a warning naming the file,
and the stage resumes from the one before. A step directory that exists is never written
over: the run would be going back over steps it has saved.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from esen_train.data.manifest import file_checksum
from esen_train.engine import distributed
from esen_train.model import ModelConfig
from esen_train.model.model_file import MODEL_FILE, CheckpointError, model_file_payload, write_model_file

STATE_DIR = "train_state"
CONTENTS_FILE = "contents.json"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, stage_dir: Path, keep_last: int, elements: list[int]) -> None:
        self.stage_dir = stage_dir
        self.keep_last = keep_last
        self.elements = list(elements)  # atomic numbers of the training data
        self.saved_step: int | None = None  # the step of the newest checkpoint saved or resumed from

    @property
    def last(self) -> Path:
        return self.stage_dir / "last"

    @property
    def best(self) -> Path:
        return self.stage_dir / "best"

    def save(self, strategy, model_config: ModelConfig, stage: str, step: int, metrics: dict, extra: dict, is_best: bool) -> Path:
        """Write the checkpoint of `step`: `model.pt` and the strategy's training state with this
        rank's `extra`. Collective: every rank calls it. Returns the new step directory."""
        final = self.stage_dir / step_dir_name(step)
        if final.exists():  # every rank sees the same file system, so every rank raises
            raise CheckpointError(
                f"{final} already exists: a checkpoint is never written over (this run would repeat steps it has saved)"
            )
        tmp = self.stage_dir / f".{final.name}.tmp"
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        distributed.barrier()  # the directory exists for every rank
        weights = strategy.full_state_dict(use_ema=False)
        ema_weights = strategy.full_state_dict(use_ema=True)
        if distributed.is_main():
            payload = model_file_payload(model_config, weights, ema_weights, stage, step, metrics, self.elements)
            write_model_file(payload, tmp / MODEL_FILE)
            (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}))
        strategy.save_into(tmp / STATE_DIR, extra)
        distributed.barrier()  # every rank's files are written
        if distributed.is_main():
            write_contents(tmp, step)
            os.replace(tmp, final)
            _point(self.last, final)
            if is_best:
                _point(self.best, final)
            self._prune()
        distributed.barrier()
        self.saved_step = step
        return final

    def load(self, strategy, checkpoint: Path) -> dict:
        """Restore the strategy's training state from a step directory; returns this rank's
        `extra`. Collective."""
        return strategy.load_from(checkpoint / STATE_DIR)

    def find_resume_point(self, device: torch.device) -> Path | None:
        """The newest intact step directory, or None to start afresh. Collective: rank 0 looks
        (moving damaged checkpoints aside and pointing `last` at the one found) and every rank
        gets its answer."""
        step = torch.tensor([-1], dtype=torch.long, device=device)
        if distributed.is_main():
            found = self._newest_intact()
            if found is not None:
                step.fill_(_step_of(found))
                _point(self.last, found)
        step = int(distributed.broadcast_from_main(step).item())
        if step < 0:
            return None
        self.saved_step = step
        return self.stage_dir / step_dir_name(step)

    def _step_dirs(self) -> list[Path]:
        """Step directories, oldest first (damaged ones moved aside do not count)."""
        if not self.stage_dir.is_dir():
            return []
        return sorted((p for p in self.stage_dir.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()), key=_step_of)

    def _newest_intact(self) -> Path | None:
        for directory in reversed(self._step_dirs()):
            problem = damage_in(directory)
            if problem is None:
                return directory
            aside = directory.with_name(f"{directory.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(directory, aside)
            warnings.warn(
                f"checkpoint {directory} is damaged: {problem}. It is kept as {aside.name}; "
                "the stage resumes from the newest intact checkpoint before it",
                stacklevel=2,
            )
        return None

    def _prune(self) -> None:
        keep = {self.last.resolve(), self.best.resolve() if self.best.exists() else None}
        steps = self._step_dirs()
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            if old.resolve() not in keep:
                shutil.rmtree(old)


def write_contents(directory: Path, step: int) -> None:
    """List every file of a finished checkpoint directory with its size and SHA-256."""
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": file_checksum(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != CONTENTS_FILE
    }
    (directory / CONTENTS_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1))


def damage_in(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory, naming the file; None when it is intact."""
    contents_file = directory / CONTENTS_FILE
    if not contents_file.is_file():
        return f"{contents_file} is missing (the checkpoint was not completely written or copied)"
    try:
        contents = json.loads(contents_file.read_text())
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in contents["files"].items()}
        step = contents["step"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{contents_file} is not a valid list of the checkpoint's files ({type(error).__name__}: {error})"
    if step != _step_of(directory):
        return f"{contents_file} lists the files of step {step}, not of {directory.name}"
    for name, (size, checksum) in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, but {size} were written (truncated or overwritten)"
        if file_checksum(path) != checksum:
            return f"{path} does not have the SHA-256 it was written with (its content changed)"
    return None


def _step_of(directory: Path) -> int:
    return int(_STEP_DIR.fullmatch(directory.name).group(1))


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)
