"""One training stage (direct or conservative) from first step to last checkpoint.

The loop is: set the learning rate, run `grad_accum_steps` micro-batches forward and
backward, clip and step (a non-finite gradient skips the step on every rank), update the
EMA, then log, validate and checkpoint on their schedules. Everything a resumed run needs
(optimizer, EMA, sampler position, RNG, step, best metric) goes into each checkpoint.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from esen_train.engine import distributed, preemption
from esen_train.engine.checkpoint import CheckpointManager
from esen_train.engine.config import StageConfig, TrainConfig
from esen_train.engine.ema import ExponentialMovingAverage
from esen_train.engine.losses import ErrorAccumulator, LossWeights, batch_counts, training_loss
from esen_train.engine.optim import OptimSettings, lr_at
from esen_train.engine.strategy import build_strategy
from esen_train.evaluation.checkpoint import MODEL_FILE, read_model_file, resolve_checkpoint
from esen_train.model import ESEN, compile_model


FRESH_WEIGHTS = "none"  # init_from value: start from freshly initialised weights


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


class StageMismatch(RuntimeError):
    """The weights loaded into a stage do not reproduce the checkpoint they came from."""


@dataclass
class StageData:
    train_loader: object  # esen_train.data.loader.ResumableLoader
    val_loader: object
    element_references: torch.Tensor
    energy_scale: float
    has_stress: bool


@dataclass
class Progress:
    step: int = 0
    best_value: float = math.inf
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0  # the stage's clock so far (wall or CPU), as all ranks agree on it


class StageTrainer:
    def __init__(self, stage: str, config: TrainConfig, data: StageData, run_dir: Path, logger, dist) -> None:
        self.stage = stage
        self.settings: StageConfig = getattr(config, stage)
        self.conservative = stage == "conservative"
        self.config, self.data, self.run_dir, self.logger, self.dist = config, data, run_dir, logger, dist
        self.model_config = replace(config.model, direct_forces=not self.conservative)
        self.forces_mode = "conservative" if self.conservative else "direct"
        self.weights = LossWeights(self.settings.energy_weight, self.settings.force_weight, self.settings.stress_weight)
        self.checkpoints = CheckpointManager(run_dir / "checkpoints" / stage, self.settings.keep_last)
        self.progress = Progress()
        self._in_step = False

    # ----- set-up -----------------------------------------------------------------
    def build(self) -> None:
        torch.manual_seed(self.config.seed)
        model = ESEN(self.model_config)
        model.set_reference_energies(self.data.element_references)
        model.set_energy_scale(self.data.energy_scale)
        self.init_checkpoint = self._initial_checkpoint()
        if self.init_checkpoint is not None:
            load_backbone(model, read_model_file(self.init_checkpoint / MODEL_FILE))
        if model.direct_heads is not None and not self.data.has_stress:
            # No stress labels: freeze the stress head, or ZeRO's flat zero gradients would
            # still let AdamW's weight decay shrink it.
            model.direct_heads.stress.requires_grad_(False)
        model.to(self.dist.device)
        if self.settings.compile:
            compile_model(model)
        self.strategy = build_strategy(self.config.strategy, self.settings, self.dist)
        optim = OptimSettings(lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.strategy.setup(model, optim, conservative=self.conservative)
        self.ema = ExponentialMovingAverage(self.strategy.module, self.settings.ema_decay)
        self.strategy.attach_ema(self.ema)

    def _initial_checkpoint(self) -> Path | None:
        if self.settings.init_from == FRESH_WEIGHTS:
            return None
        if self.settings.init_from:
            return resolve_checkpoint(self.settings.init_from)
        if self.conservative:
            direct_best = self.run_dir / "checkpoints" / "direct" / "best"
            if not direct_best.exists():
                raise FileNotFoundError(
                    f"the conservative stage starts from a direct checkpoint, but {direct_best} does not exist: "
                    "run the direct stage first, set conservative.init_from=CHECKPOINT, or "
                    f"conservative.init_from={FRESH_WEIGHTS} to train from fresh weights"
                )
            return direct_best
        return None

    def _checkpoint_validated_on_our_data(self) -> bool:
        """Whether the run that wrote init_from (RUN/checkpoints/<stage>/<step>) names the same
        validation data as this run: the same dataset directories, or the same built-in EMT set."""
        run_config = self.init_checkpoint.resolve().parents[2] / "config.yaml"
        if not run_config.is_file():
            return False
        theirs, ours = OmegaConf.load(run_config).get("data", {}), self.config.data
        if ours.val:
            return list(theirs.get("val", [])) == list(ours.val)
        return (not theirs.get("val") and not theirs.get("train") and not ours.train
                and (theirs.get("emt_structures"), theirs.get("emt_seed")) == (ours.emt_structures, ours.emt_seed))

    # ----- the loop ---------------------------------------------------------------
    def run(self) -> Path:
        started = self._clock()
        self.build()
        if self.checkpoints.has_last():
            self._resume()
        elif self.init_checkpoint is not None:
            self._check_loaded_weights()
        self._clock_origin = started - self.progress.train_seconds
        preemption.register_checkpoint_callback(self._save_on_preemption)
        try:
            out_of_time = self.progress.step > 0 and self._out_of_time()  # a fresh stage takes one step at least
            while self.progress.step < self.settings.max_steps and not out_of_time:
                self._train_step()
                out_of_time = self._out_of_time()
                step = self.progress.step
                if step % self.settings.val_every == 0 or step == self.settings.max_steps or out_of_time:
                    metrics = self.validate()
                    self._log("val", metrics)
                    self._checkpoint(metrics)
                elif step % self.settings.checkpoint_every == 0:
                    self._checkpoint({})
        finally:
            preemption.clear()
        return self.checkpoints.best

    def _clock(self) -> float:
        return time.process_time() if self.settings.clock == "cpu" else time.perf_counter()

    def _out_of_time(self) -> bool:
        """Update the stage's clock and say whether `max_minutes` is used up. The slowest
        rank's clock counts, so every rank stops after the same step."""
        if self.settings.max_minutes <= 0:
            return False
        elapsed = torch.tensor([self._clock() - self._clock_origin], dtype=torch.float64)
        self.progress.train_seconds = float(distributed.all_reduce_max(elapsed))
        return self.progress.train_seconds >= 60 * self.settings.max_minutes

    def _train_step(self) -> None:
        settings, strategy = self.settings, self.strategy
        time_fraction = self.progress.train_seconds / (60 * settings.max_minutes) if settings.max_minutes > 0 else 0.0
        strategy.set_lr(lr_at(self.progress.step, settings.lr, settings.warmup_steps, settings.max_steps,
                              settings.min_lr_ratio, time_fraction))
        started, atoms, shares = time.perf_counter(), 0, {}
        self._in_step = True
        for micro in range(settings.grad_accum_steps):
            batch = self.data.train_loader.next_batch().to(self.dist.device)
            counts = distributed.all_reduce_sum(batch_counts(batch))
            atoms += int(counts[1])
            sync = strategy.no_sync() if micro < settings.grad_accum_steps - 1 else nullcontext()
            with sync, strategy.autocast():
                out = strategy.model(batch, forces=self.forces_mode, stress=self.data.has_stress, create_graph=self.conservative)
                loss, micro_shares = training_loss(out, batch, self.weights, counts, self.dist.world_size)
                strategy.backward(loss / settings.grad_accum_steps)
            for name, value in micro_shares.items():
                shares[name] = shares.get(name, 0.0) + value.double() / settings.grad_accum_steps
        result = strategy.step(settings.clip_grad_norm)
        self._in_step = False
        self._count_nonfinite(result.skipped)
        if not result.skipped:
            self.ema.update()
        self.progress.step += 1
        if self.progress.step % settings.log_every == 0:
            names = sorted(shares)
            totals = distributed.all_reduce_sum(torch.stack([shares[name] for name in names]))
            self._log("train", {
                **dict(zip(names, totals.tolist())),
                "grad_norm": result.grad_norm,
                "lr": strategy.lr,
                "atoms_per_s": atoms / (time.perf_counter() - started),
                "nonfinite_steps": self.progress.nonfinite_total,
                **_memory_stats(self.dist.device),
            })

    def _count_nonfinite(self, skipped: bool) -> None:
        progress = self.progress
        progress.nonfinite_in_row = progress.nonfinite_in_row + 1 if skipped else 0
        progress.nonfinite_total += int(skipped)
        if progress.nonfinite_in_row >= self.settings.max_nonfinite_in_row:
            raise TrainingDiverged(
                f"{self.stage} stage: {progress.nonfinite_in_row} steps in a row had a non-finite loss or gradient "
                f"(step {progress.step}); stopping. The last good checkpoint is {self.checkpoints.last}"
            )

    # ----- validation -------------------------------------------------------------
    def validate(self, forces: str | None = None) -> dict[str, float]:
        """Errors of the EMA weights on the whole validation set, gathered over ranks."""
        errors = ErrorAccumulator()
        forces = forces or self.forces_mode
        grad = torch.enable_grad() if forces == "conservative" else torch.no_grad()
        with self.ema.swapped_in(), grad:
            for batch in self.data.val_loader.epoch():
                batch = batch.to(self.dist.device)
                out = self.strategy.model(batch, forces=forces, stress=self.data.has_stress and forces != "none")
                errors.add({k: v.detach() for k, v in out.items()}, batch)
        return errors.result()

    def _check_loaded_weights(self) -> None:
        """Step 0 of a stage that starts from a checkpoint: same weights, same energy error.

        The check needs the validation set the checkpoint's error was recorded on: always so
        for the hand-over inside one run; for a checkpoint named by `init_from`, only if its
        run validated on the same data (fine-tuning usually brings other data). Otherwise the
        error is logged and not compared."""
        expected = read_model_file(self.init_checkpoint / MODEL_FILE)["metrics"].get("energy_mae_mev_per_atom")
        # The stage's own forces too: where this stage's learning curve starts (for the
        # conservative stage, the gradient of the energy the direct stage left behind).
        loaded = self.validate()
        measured = loaded["energy_mae_mev_per_atom"]
        self._log("val", {**loaded, "loaded_from": str(self.init_checkpoint)})
        if self.settings.init_from and not self._checkpoint_validated_on_our_data():
            return
        if expected is not None and not math.isclose(measured, expected, rel_tol=1e-4, abs_tol=1e-6):
            raise StageMismatch(
                f"{self.stage} stage: the weights loaded from {self.init_checkpoint} give a validation energy MAE of "
                f"{measured:.6f} meV/atom, but that checkpoint recorded {expected:.6f}: weights were lost in the hand-over"
            )

    # ----- checkpoints ------------------------------------------------------------
    def _checkpoint(self, metrics: dict) -> None:
        value = metrics.get(self.settings.best_metric, metrics.get("energy_mae_mev_per_atom"))
        is_best = value is not None and value < self.progress.best_value
        if is_best:
            self.progress.best_value = value
        self.checkpoints.save(
            self.strategy, self.ema, self.model_config, self.stage, self.progress.step, metrics,
            extra=self._extra_state(), is_best=is_best,
        )

    def _extra_state(self) -> dict:
        return {
            "progress": vars(self.progress).copy(),
            "loader": self.data.train_loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _resume(self) -> None:
        extra = self.checkpoints.load_state(self.strategy)
        self.progress = Progress(**extra["progress"])
        self.data.train_loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["torch_rng"])
        if distributed.is_main():
            self.logger.forget_after(self.stage, self.progress.step)
            print(f"[{self.stage}] resumed from {self.checkpoints.last.resolve()} at step {self.progress.step}", flush=True)

    def _save_on_preemption(self) -> None:
        """Called from submitit's signal handler on rank 0: save only when that is safe
        without collectives (one process) and not half-way through an optimizer step."""
        if self.dist.world_size == 1 and not self._in_step and self.progress.step > 0:
            self._checkpoint({})

    def _log(self, split: str, metrics: dict) -> None:
        if distributed.is_main():
            self.logger.log({"stage": self.stage, "split": split, "step": self.progress.step,
                             "global_step": self._global_step(), **metrics})

    def _global_step(self) -> int:
        offset = self.config.direct.max_steps if self.conservative and "direct" in self.config.stages else 0
        return offset + self.progress.step


def load_backbone(model: ESEN, checkpoint: dict) -> None:
    """Load a checkpoint's EMA (else raw) weights; direct heads are dropped when the
    model has none. Every other key must match, so a silent loss of weights fails here."""
    weights = checkpoint["ema"] or checkpoint["model"]
    own = model.state_dict()
    kept = {k: v for k, v in weights.items() if k in own or not k.startswith("direct_heads.")}
    model.load_state_dict(kept, strict=True)


def _memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
