"""`esen-train fit`: prepare the run directory and data, then run the stages in order."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch

from esen_train.data.dataset import LMDBDataset
from esen_train.data.emt import generate_emt_dataset
from esen_train.data.loader import build_dataloader
from esen_train.data.manifest import DatasetDirectory, DatasetStats, Manifest
from esen_train.data.stats import StatsAccumulator
from esen_train.engine import distributed
from esen_train.engine.config import TrainConfig, check_against_data, check_resume, save_config
from esen_train.engine.host_memory import keep_freed_host_memory
from esen_train.engine.run_lock import exclusive_run
from esen_train.engine.status import RunStatus
from esen_train.engine.tracking import RunLogger, read_metrics
from esen_train.engine.trainer import StageData, StageTrainer
from esen_train.plots import plot_learning_curves


def fit(config: TrainConfig) -> Path:
    """Train every stage in `config.stages`; returns the run directory.

    Raises ConfigError, before anything is created, for a value out of its range, one that
    does not fit the data, a run directory of a run on other data (`check_resume`), or one
    another fit is running in (`run_lock`)."""
    config.check()
    data_warnings = check_against_data(config)
    check_resume(config)
    if config.keep_freed_host_memory:
        keep_freed_host_memory()
    dist = distributed.init_distributed(timeout_s=config.strategy.process_group_timeout_s)
    run_dir = Path(config.run_dir).resolve()
    try:
        # one fit per run directory (rank 0 holds the lock; it creates the directory)
        with exclusive_run(run_dir) if distributed.is_main() else nullcontext():
            _train_stages(config, run_dir, dist, data_warnings)
    finally:
        distributed.cleanup()
    return run_dir


def _train_stages(config: TrainConfig, run_dir: Path, dist, data_warnings: list[str]) -> None:
    """The data, each stage in order, then the learning curves and summary (on every rank)."""
    # RUN/status.json: running, then finished, or failed with the error (esen-train status).
    with RunStatus(run_dir, config, enabled=distributed.is_main()) as status:
        if distributed.is_main():
            _ensure_emt_data(config, run_dir)
            for change in save_config(config, run_dir):
                print(f"[run] config changed since the last start: {change}", flush=True)
            for warning in data_warnings:
                print(f"[run] warning: {warning}", flush=True)
        distributed.barrier()
        train_dirs, val_dirs = _data_dirs(config, run_dir)
        logger = RunLogger(run_dir, config, dist.world_size, enabled=distributed.is_main())
        try:
            logger.log_datasets(train_dirs, val_dirs)
            for stage in config.stages:
                data = _stage_data(config, stage, train_dirs, val_dirs, dist)
                StageTrainer(stage, config, data, run_dir, logger, dist, status).run()
            if distributed.is_main():
                curves = plot_learning_curves(run_dir / "metrics.jsonl", run_dir / "learning_curves.png")
                _write_summary(run_dir, config)
                logger.log_final(curves)
        finally:
            logger.close()


def _ensure_emt_data(config: TrainConfig, run_dir: Path) -> None:
    """Generate the built-in EMT data into RUN/data once: data.emt_val_fraction of it (at
    least 2 structures) for validation, the rest for training."""
    if config.data.train or config.data.emt_structures <= 0:
        return
    num_val = max(math.floor(config.data.emt_structures * config.data.emt_val_fraction), 2)
    for split, num, seed in (("train", config.data.emt_structures - num_val, config.data.emt_seed),
                             ("val", num_val, config.data.emt_seed + 1)):
        if not (run_dir / "data" / split / "manifest.json").exists():
            generate_emt_dataset(run_dir / "data" / split, num=num, seed=seed)


def _data_dirs(config: TrainConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    if config.data.train:
        return list(config.data.train), list(config.data.val or config.data.train)
    return [str(run_dir / "data" / "train")], [str(run_dir / "data" / "val")]


def _stage_data(config: TrainConfig, stage: str, train_dirs: list[str], val_dirs: list[str], dist) -> StageData:
    settings = getattr(config, stage)
    cutoff = config.model.cutoff
    train_set = LMDBDataset(train_dirs, cutoff=cutoff)
    val_set = LMDBDataset(val_dirs, cutoff=cutoff)
    loader_args = dict(rank=dist.rank, world_size=dist.world_size, seed=config.seed, num_workers=config.data.num_workers)
    stats = _training_stats(train_dirs)
    references = torch.zeros(config.model.max_num_elements + 1, dtype=torch.float64)
    for element, energy in stats.element_references.items():
        references[element] = energy
    return StageData(
        train_loader=build_dataloader(train_set, settings.max_atoms, shuffle=True, **loader_args),
        val_loader=build_dataloader(val_set, settings.max_atoms, shuffle=False, **loader_args),
        element_references=references,
        # eV per network unit: the force RMS (eV/Å over 1 Å). Isolated atoms alone have no
        # force to set it by; 1 eV then.
        energy_scale=stats.force_rms if stats.force_rms > 0 else 1.0,
        has_stress=train_set.has_stress,
        elements=sorted({z for manifest in train_set.manifests for z in manifest.elements}),
        reference_loader=(build_dataloader(train_set, settings.max_atoms, shuffle=False, **loader_args)
                          if settings.references == "refit" else None),
    )


def _training_stats(train_dirs: list[str]) -> DatasetStats:
    """Reference energies and force RMS: from the manifest (`esen-data stats`), else one
    pass over the training data."""
    if len(train_dirs) == 1:
        stored = Manifest.load(train_dirs[0]).stats
        if stored is not None:
            return stored
    if distributed.is_main():
        print("computing reference energies over the training data (store them with `esen-data stats DIR`)", flush=True)
    accumulator = StatsAccumulator()
    for directory in train_dirs:
        dataset = DatasetDirectory(directory)
        for reader in dataset.readers:
            for record in reader:
                accumulator.add(record)
        dataset.close()
    return accumulator.result()


def _write_summary(run_dir: Path, config: TrainConfig) -> None:
    """RUN/summary.json: the last validation metrics of each stage."""
    rows = read_metrics(run_dir)
    summary = {}
    for stage in config.stages:
        val_rows = [row for row in rows if row["stage"] == stage and row["split"] == "val" and "loaded_from" not in row]
        if val_rows:
            summary[stage] = val_rows[-1]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
