"""One training stage (direct or conservative) from first step to last checkpoint.

The loop is: set the learning rate, one `Strategy.optimizer_step` (`grad_accum_steps`
micro-batches forward and backward, clip and step, where a non-finite gradient skips the
step on every rank, and update the EMA), then log, validate and checkpoint on their
schedules, until `max_steps`, `max_minutes` or early stopping (`early_stopping.end_reason`).
Everything a resumed run needs (optimizer, EMA, sampler position, RNG, step, best metric,
time used) goes into each checkpoint. Each logged row also
goes to the console (esen_train.progress) and RUN/status.json (engine/status.py). At each
step boundary the ranks agree on whether the job was told to stop (engine/preemption.py):
then they save that step and raise `Preempted`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from esen_train.config_loading import omegaconf_errors
from esen_train.engine import distributed, early_stopping, preemption
from esen_train.engine.checkpoint import CheckpointManager
from esen_train.engine.config import FRESH_WEIGHTS, DataConfig, StageConfig, TrainConfig
from esen_train.engine.losses import ErrorAccumulator, LossWeights, ParitySample, batch_counts, training_loss
from esen_train.engine.optim import OptimSettings, lr_at
from esen_train.engine.references import describe_changes, given_references, refit_references
from esen_train.engine.strategies import build_strategy
from esen_train.engine.tracking import global_step
from esen_train.model import ESEN, compile_model
from esen_train.model.model_file import MODEL_FILE, read_model_file, resolve_checkpoint
from esen_train.progress import StageConsole


def use_compile_cache(run_dir: Path) -> str:
    """Point torch.compile's cache at RUN/compile_cache, unless the user chose one with
    TORCHINDUCTOR_CACHE_DIR: a resumed or requeued job, maybe on another node whose /tmp
    (torch's default) is empty, then loads the compiled code instead of compiling again."""
    # Imported here: importing torch's compiler stack costs a second at start-up.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # torch writes its default here on first use
    directory = chosen if chosen not in (None, default_cache_dir()) else str(run_dir / "compile_cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    return directory


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
    elements: list[int]  # atomic numbers of the training data, recorded in every checkpoint
    # This rank's part of the training set in order, for references=refit (None otherwise).
    reference_loader: object = None


@dataclass
class Progress:
    step: int = 0
    best_value: float = math.inf
    best_step: int = 0
    validations_since_best: int = 0  # early stopping (esen_train.engine.early_stopping)
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    train_seconds: float = 0.0  # the stage's clock so far (wall or CPU), as all ranks agree on it


class StageTrainer:
    def __init__(self, stage: str, config: TrainConfig, data: StageData, run_dir: Path, logger, dist, status) -> None:
        self.stage = stage
        self.settings: StageConfig = getattr(config, stage)
        self.conservative = stage == "conservative"
        self.config, self.data, self.run_dir, self.logger, self.dist = config, data, run_dir, logger, dist
        self.model_config = replace(config.model, direct_forces=not self.conservative)
        self.forces_mode = "conservative" if self.conservative else "direct"
        self.weights = LossWeights(self.settings.energy_weight, self.settings.force_weight, self.settings.stress_weight)
        self.checkpoints = CheckpointManager(run_dir / "checkpoints" / stage, self.settings.keep_last, data.elements)
        self.progress = Progress()
        self.status = status  # esen_train.engine.status.RunStatus
        self.console = StageConsole(stage, self.settings.max_steps, self.settings.log_every, self.settings.best_metric,
                                    self.settings.patience, enabled=config.logging.progress and distributed.is_main())

    # ----- set-up -----------------------------------------------------------------
    def build(self) -> None:
        torch.manual_seed(self.config.seed)
        model = ESEN(self.model_config)
        model.set_reference_energies(self.data.element_references)
        model.set_energy_scale(self.data.energy_scale)
        self.logger.log_model(model)
        self.init_checkpoint = self._initial_checkpoint()
        if self.init_checkpoint is not None:
            new_heads = load_backbone(model, read_model_file(self.init_checkpoint / MODEL_FILE))
            if new_heads:
                self._say(f"{self.init_checkpoint} has no {', '.join(new_heads)}: they start from fresh weights")
        if model.direct_heads is not None and not self.data.has_stress:
            # No stress labels: freeze the stress head, so that every trainable parameter gets a
            # gradient (DDP does not look for unused ones) and ZeRO's flat zero gradients do not
            # let AdamW's weight decay shrink it.
            model.direct_heads.stress.requires_grad_(False)
        freeze(model, self.settings.freeze_embeddings, self.settings.freeze_blocks)
        model.to(self.dist.device)
        if self.init_checkpoint is not None and self.settings.references != "keep":
            self._set_references(model)
        elif self.settings.init_from:
            self._say("reference energies (keep): the checkpoint's")
        if self.settings.compile:
            self._say(f"torch.compile cache: {use_compile_cache(self.run_dir)}")
            compile_model(model)
        self.strategy = build_strategy(self.config.strategy, self.settings, self.dist)
        optim = OptimSettings(lr=self.settings.lr, weight_decay=self.settings.weight_decay,
                              betas=tuple(self.settings.adam_betas), eps=self.settings.adam_eps,
                              backbone_lr_scale=self.settings.backbone_lr_scale)
        self.strategy.setup(model, optim, conservative=self.conservative, ema_decay=self.settings.ema_decay)

    def _set_references(self, model: ESEN) -> None:
        """references=refit or given: replace the checkpoint's reference energies."""
        before = model.reference_energies.detach().cpu().clone()
        if self.settings.references == "refit":
            model.set_reference_energies(refit_references(model, self.data.reference_loader, self.dist.device))
        else:
            model.set_reference_energies(given_references(before, self.settings.given_references))
        self._say(f"reference energies ({self.settings.references}): {describe_changes(before, model.reference_energies)}")

    def _say(self, message: str) -> None:
        if distributed.is_main():
            print(f"[{self.stage}] {message}", flush=True)

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
        with omegaconf_errors(str(run_config)):
            theirs = OmegaConf.load(run_config).get("data", {})
        return same_validation_data(theirs, self.config.data)

    # ----- the loop ---------------------------------------------------------------
    def run(self) -> Path:
        started = self._clock()
        self.build()
        self._resume_or_start()
        self._clock_origin = started - self.progress.train_seconds
        self.console.start(self.progress.step)
        self.status.start_stage(self.stage, self.progress.step)
        try:
            out_of_time = self.progress.step > 0 and self._out_of_time()  # a fresh stage takes one step at least
            while not (end := early_stopping.end_reason(self.progress, self.settings.max_steps, self.settings.patience,
                                                        out_of_time)):
                self._stop_if_asked()
                self._train_step()
                out_of_time = self._out_of_time()
                step = self.progress.step
                if step % self.settings.val_every == 0 or step == self.settings.max_steps or out_of_time:
                    metrics = self.validate()
                    is_best = early_stopping.record_validation(self.progress, metrics, self.settings.best_metric)
                    self._log("val", metrics)
                    self._publish(metrics, self._checkpoint(metrics, is_best), is_best)
                elif step % self.settings.checkpoint_every == 0:
                    self._publish({}, self._checkpoint({}), is_best=False)
        finally:
            self.console.close()
        self._log("end", {"reason": end, "best_metric": self.settings.best_metric,
                          "best_value": self.progress.best_value, "best_step": self.progress.best_step})
        return self.checkpoints.best

    def _resume_or_start(self) -> None:
        """Continue from this stage's newest intact checkpoint, or start the stage (checking
        weights loaded from another checkpoint). Rows logged after the step training
        continues from are dropped: those steps run again."""
        resume_from = self.checkpoints.find_resume_point(self.dist.device)
        if resume_from is not None:
            self._resume(resume_from)
        if distributed.is_main():
            self.logger.forget_after(self.stage, self.progress.step if resume_from is not None else -1)
        if resume_from is None and self.init_checkpoint is not None:
            self._check_loaded_weights()

    def _stop_if_asked(self) -> None:
        """At a step boundary: if any rank was told to stop, all save this step (unless it is
        saved already) and stop."""
        if not preemption.stop_agreed(self.dist.device):
            return
        if self.progress.step > 0 and self.checkpoints.saved_step != self.progress.step:
            self._checkpoint({})
        reason = preemption.stop_requested() or "another rank's signal"
        message = (f"{self.stage} preempted after step {self.progress.step} ({reason}); a requeued job, or the same "
                   f"command again, resumes at step {self.progress.step + 1} from {self.checkpoints.stage_dir}")
        self.status.preempted(self.progress.step)
        self.console.write(message)
        raise preemption.Preempted(message)

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

        def loss_of(model, batch) -> torch.Tensor:
            """This rank's share of the micro-batch's loss; tallies atoms and loss terms for the log."""
            nonlocal atoms
            counts = distributed.all_reduce_sum(batch_counts(batch))
            atoms += int(counts[1])
            out = model(batch, forces=self.forces_mode, stress=self.data.has_stress, create_graph=self.conservative)
            loss, micro_shares = training_loss(out, batch, self.weights, counts, self.dist.world_size)
            for name, value in micro_shares.items():
                shares[name] = shares.get(name, 0.0) + value.double() / settings.grad_accum_steps
            return loss

        micro_batches = (self.data.train_loader.next_batch().to(self.dist.device) for _ in range(settings.grad_accum_steps))
        result = strategy.optimizer_step(micro_batches, loss_of, settings.clip_grad_norm)
        self._count_nonfinite(result.skipped)
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
        """Errors of the EMA weights on the whole validation set, gathered over ranks; the
        first structures of this rank are kept in `self.parity` for a parity plot."""
        errors, self.parity = ErrorAccumulator(), ParitySample()
        forces = forces or self.forces_mode
        grad = torch.enable_grad() if forces == "conservative" else torch.no_grad()
        with self.strategy.ema.swapped_in(), grad:
            for batch in self.data.val_loader.epoch():
                batch = batch.to(self.dist.device)
                out = self.strategy.model(batch, forces=forces, stress=self.data.has_stress and forces != "none")
                errors.add({k: v.detach() for k, v in out.items()}, batch)
                self.parity.add(out, batch)
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
        if self.settings.references != "keep":  # the energies changed on purpose
            return
        if self.settings.init_from and not self._checkpoint_validated_on_our_data():
            return
        if expected is not None and not math.isclose(measured, expected, rel_tol=self.settings.handover_rel_tol,
                                                       abs_tol=self.settings.handover_abs_tol):
            raise StageMismatch(
                f"{self.stage} stage: the weights loaded from {self.init_checkpoint} give a validation energy MAE of "
                f"{measured:.6f} meV/atom, but that checkpoint recorded {expected:.6f}: weights were lost in the hand-over"
            )

    # ----- checkpoints ------------------------------------------------------------
    def _checkpoint(self, metrics: dict, is_best: bool = False) -> Path:
        """Save a checkpoint (collective); returns its directory."""
        directory = self.checkpoints.save(
            self.strategy, self.model_config, self.stage, self.progress.step, metrics,
            extra=self._extra_state(), is_best=is_best,
        )
        self.status.checkpoint(self.stage, directory, self.progress.step, metrics if is_best else None)
        return directory

    def _publish(self, metrics: dict, directory: Path, is_best: bool) -> None:
        """Rank 0: the validation's parity plot, and the checkpoint's best values and artifact."""
        if distributed.is_main():
            if metrics:
                self.logger.log_parity(self.stage, self.progress.step, self.parity.panels())
            self.logger.log_checkpoint(self.stage, self.progress.step, directory, metrics, is_best)

    def _extra_state(self) -> dict:
        return {
            "progress": vars(self.progress).copy(),
            "loader": self.data.train_loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _resume(self, checkpoint: Path) -> None:
        extra = self.checkpoints.load(self.strategy, checkpoint)
        self.progress = Progress(**extra["progress"])
        self.data.train_loader.load_state_dict(extra["loader"])
        torch.set_rng_state(extra["torch_rng"])
        if distributed.is_main():
            print(f"[{self.stage}] resumed from {checkpoint} at step {self.progress.step}", flush=True)

    def _log(self, split: str, metrics: dict) -> None:
        """A metrics row (split train, val or end) to metrics.jsonl and wandb, the console and status.json."""
        if distributed.is_main():
            record = {"stage": self.stage, "split": split, "step": self.progress.step,
                      "global_step": self._global_step(), **metrics}
            self.logger.log(record)
            self.console.show(record, self.progress)
            self.status.record(record, self.console.timing())

    def _global_step(self) -> int:
        return global_step(self.config, self.stage, self.progress.step)


def same_validation_data(theirs, ours: DataConfig) -> bool:
    """Whether a run whose config.yaml has the data settings `theirs` validated on what `ours`
    names: the same dataset directories, or the same built-in EMT set (a config.yaml without
    emt_val_fraction predates it: that run set aside the default share)."""
    if ours.val:
        return list(theirs.get("val", [])) == list(ours.val)
    their_emt = (theirs.get("emt_structures"), theirs.get("emt_seed"),
                 theirs.get("emt_val_fraction", DataConfig.emt_val_fraction))
    return (not theirs.get("val") and not theirs.get("train") and not ours.train
            and their_emt == (ours.emt_structures, ours.emt_seed, ours.emt_val_fraction))


def load_backbone(model: ESEN, checkpoint: dict) -> list[str]:
    """Load a checkpoint's EMA (else raw) weights. Direct heads are dropped when the model has
    none, and keep their fresh weights where the checkpoint has none (a conservative or
    imported model starting a direct stage); returns the names of those heads. Every other key
    must match, so a silent loss of weights fails here."""
    weights = checkpoint["ema"] or checkpoint["model"]
    stored_heads = ESEN.direct_heads_state_dict(weights)
    own_heads = ESEN.direct_heads_state_dict(model.state_dict())
    fresh = {key: value for key, value in own_heads.items() if key not in stored_heads}
    heads = {key: stored_heads.get(key, value) for key, value in own_heads.items()}
    model.load_state_dict({**ESEN.backbone_state_dict(weights), **heads}, strict=True)
    new_heads = sorted({key.split(".")[1] for key in fresh})  # direct_heads.<head>.<parameter>
    return [f"direct {head} head" for head in new_heads]


def freeze(model: ESEN, embeddings: bool, blocks: int) -> None:
    """Stop training the embeddings (element, edge-element, edge-degree, charge/spin) and the
    first `blocks` message-passing blocks (before the optimizer and EMA are built)."""
    backbone = model.backbone
    frozen = [backbone.blocks[:blocks]]
    if embeddings:
        frozen += [backbone.element_embedding, backbone.source_embedding, backbone.target_embedding,
                   backbone.edge_degree]
        if backbone.charge_spin is not None:
            frozen.append(backbone.charge_spin)
    for module in frozen:
        module.requires_grad_(False)


def _memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
