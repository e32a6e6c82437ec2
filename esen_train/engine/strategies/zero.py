"""DeepSpeed ZeRO stage 1 (sharded optimizer state) and stage 2 (and sharded gradients).

Parameters stay replicated on every rank; each rank keeps the fp32 master copy and the AdamW
moments of its 1/N slice only, steps that slice and all-gathers the updated parameters.
ZeRO-1 and ZeRO-2 are correct with the double backward of conservative training; ZeRO-3
(sharded parameters) is not (`mat2 must be a matrix` in the backward), so it is refused.

How the engine is driven:
- The optimizer is torch's AdamW with our parameter groups, passed in
  (`zero_allow_untested_optimizer`); DeepSpeed owns the learning-rate-free parts of the step.
- Gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): `backward` only
  accumulates and `_step` is the boundary, matching `Strategy.optimizer_step` (`backward` once
  per micro-step, with the loss already divided by the number of micro-steps, then `_step`).
  `no_sync` is therefore a no-op: ZeRO-1 reduces once in `_step`, ZeRO-2 reduce-scatters every
  micro-step into the gradient partitions (that is how it shards gradients).
- Clipping and the non-finite check happen inside DeepSpeed's step, on the global norm, so
  every rank makes the same decision; `was_step_applied()` reports a skipped step.
- Mixed precision is our own autocast (bf16 on GPU); DeepSpeed runs in fp32.

The training state is DeepSpeed's own checkpoint (`save_checkpoint`/`load_checkpoint`, a
module file from rank 0 and one optimizer partition per rank) with the EMA as client state.
DeepSpeed's loader unpickles; ours loads weights-only, allowing DeepSpeed's few plain record
classes. A checkpoint loads onto another number of ranks with the weights only: ZeRO cannot
re-partition the optimizer state, so the AdamW moments start afresh (with a warning).

DeepSpeed's first start on a machine compiles a small C++ communication extension into
~/.cache/torch_extensions (about 80 s on 2 CPU cores); later starts reuse it.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# Set before DeepSpeed is imported, else it warns that it fell back to its CPU accelerator.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from esen_train.engine.distributed import DistInfo  # noqa: E402
from esen_train.engine.optim import OptimSettings, build_adamw  # noqa: E402
from esen_train.engine.strategies.base import StepResult, Strategy  # noqa: E402

DEEPSPEED_DIR = "deepspeed"
TAG = "state"
# Plain record classes DeepSpeed pickles into its optimizer files; nothing else is accepted.
_DEEPSPEED_RECORD_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save checkpoint engine, loading with weights_only=True."""

    def __init__(self) -> None:
        super().__init__(config_params=None)
        self.zipfile_serialization = True

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_DEEPSPEED_RECORD_CLASSES):
            return torch.load(path, map_location=map_location, weights_only=True)


class ZeroStrategy(Strategy):
    name = "deepspeed"
    reads_states_of = ("deepspeed",)

    def __init__(self, dist: DistInfo, zero_stage: int = 2, precision: str = "fp32", grad_accum_steps: int = 1,
                 process_group_timeout_s: float = 1800.0) -> None:
        if zero_stage not in (1, 2):
            raise ValueError(f"DeepSpeed ZeRO stage must be 1 or 2, got {zero_stage} (stage 3 breaks double backward)")
        super().__init__(dist, precision, grad_accum_steps)
        self.zero_stage = zero_stage
        self.process_group_timeout_s = process_group_timeout_s  # of the one-process group made in setup
        self.engine = None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    def _wrap(self, model: nn.Module, optim: OptimSettings, conservative: bool) -> None:
        if not dist.is_initialized():
            # DeepSpeed always needs a process group; a world of one gets an in-process one.
            backend = "nccl" if self.dist.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=self.process_group_timeout_s))
        # DeepSpeed insists on LOCAL_RANK, which only torchrun sets: a single process or a
        # SLURM step does not.
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_adamw(model, optim), config=self._deepspeed_config(), dist_init_required=False
        )
        self.engine.checkpoint_engine = _WeightsOnlyCheckpointEngine()
        self.model = self.engine
        self.module = self.engine.module
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer; its param_groups are AdamW's

    def _deepspeed_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": 1,  # nominal: batches are sized in atoms by our loader
            "gradient_accumulation_steps": self.grad_accum_steps,
            "managed_gradient_accumulation": False,
            "gradient_clipping": 0.0,  # set per step in `_step`
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {
                "stage": self.zero_stage,
                "overlap_comm": self.zero_stage == 2 and self.dist.device.type == "cuda",
                "contiguous_gradients": True,
            },
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _step(self, max_grad_norm: float) -> StepResult:
        self.engine.optimizer.clip_grad = max_grad_norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        return StepResult(grad_norm=norm, skipped=not self.engine.was_step_applied())

    def _save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=TAG, client_state={"ema": self.ema.state_dict()},
                                    save_latest=False)

    def _load_state(self, directory: Path, saved_world_size: int) -> None:
        same_world = saved_world_size == self.dist.world_size
        if not same_world:
            warnings.warn(
                f"{directory}: written by {saved_world_size} ranks, loaded on {self.dist.world_size}: ZeRO cannot "
                "re-partition the optimizer state, so the weights and EMA are restored and the AdamW moments start afresh",
                stacklevel=2,
            )
        path, client_state = self.engine.load_checkpoint(
            str(directory / DEEPSPEED_DIR), tag=TAG, load_optimizer_states=same_world,
            load_lr_scheduler_states=False, load_module_only=not same_world,
        )
        if path is None:
            raise FileNotFoundError(f"{directory / DEEPSPEED_DIR}: no DeepSpeed checkpoint with tag {TAG!r}")
        if "ema" not in client_state:
            raise KeyError(f"{directory / DEEPSPEED_DIR}: no EMA state")
        self.ema.load_state_dict(client_state["ema"])
