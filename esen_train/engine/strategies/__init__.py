"""Training strategies: how each process wraps the model, steps the optimizer and writes its
training state (the interface: base.py; one module per strategy).

`STRATEGIES` is the one table of strategy names; config validation reads its names and
`build_strategy` makes the strategy a config names.
"""
from __future__ import annotations

from esen_train.engine.config import StageConfig, StrategyConfig
from esen_train.engine.distributed import DistInfo
from esen_train.engine.strategies.base import Strategy
from esen_train.engine.strategies.ddp import DDPStrategy
from esen_train.engine.strategies.fsdp import FSDPStrategy
from esen_train.engine.strategies.single import SingleStrategy


def _zero_strategy(**settings) -> Strategy:
    # Imported on use: DeepSpeed takes about a second to import, so only a deepspeed run pays for it.
    from esen_train.engine.strategies.zero import ZeroStrategy

    return ZeroStrategy(**settings)


STRATEGIES = {
    "single": SingleStrategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": _zero_strategy,
}


def build_strategy(config: StrategyConfig, stage: StageConfig, dist: DistInfo) -> Strategy:
    """The strategy named by `config.name` for one stage (its precision and accumulation)."""
    if config.name not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.name!r}: use one of {', '.join(STRATEGIES)}")
    settings = dict(dist=dist, precision=stage.precision, grad_accum_steps=stage.grad_accum_steps)
    if config.name == "deepspeed":
        settings.update(zero_stage=config.zero_stage, process_group_timeout_s=config.process_group_timeout_s)
    return STRATEGIES[config.name](**settings)


__all__ = ["STRATEGIES", "Strategy", "build_strategy"]
