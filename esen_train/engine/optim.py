"""AdamW with the usual weight-decay exemptions, and the warm-up + cosine learning rate.

The learning rate is a pure function of the step: the trainer calls `lr_at` and sets it on
every step, so a resumed run needs no scheduler state, only the step number. Each parameter
group carries an `lr_scale` (the backbone's `backbone_lr_scale` when fine-tuning, else 1):
a group's learning rate is the step's times its scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_scale: float = 1.0  # learning rate of the module named "backbone", relative to lr


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
          time_fraction: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warm-up from base_lr / warmup_steps to base_lr over the first `warmup_steps`
    steps (never zero, so step 0 already learns), then a cosine from base_lr down to
    base_lr * min_lr_ratio at step `total_steps`; constant after that. A stage with a
    wall-clock limit passes the fraction of that time used: the cosine then stands at the
    further along of the two, steps or time.
    """
    if total_steps < 1 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"lr_at needs total_steps >= 1, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; "
            f"got total_steps={total_steps}, warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}"
        )
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, max((step - warmup_steps) / max(1, total_steps - warmup_steps), time_fraction))
    min_lr = base_lr * min_lr_ratio
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_norm_module(module: nn.Module) -> bool:
    """torch's norms and the model's own (whose class names end in "Norm", e.g. EquivariantRMSNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) or (
        type(module).__name__.endswith("Norm")
    )


def param_groups(module: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decayed weights and the exempt ones, each split into the backbone's
    (the submodule named "backbone", learning rate scaled by `backbone_lr_scale`) and the
    rest's when the scale is not 1. Empty groups and frozen parameters are left out.

    Exempt from weight decay: biases and every other 0-d/1-d parameter, all parameters of
    norm layers (their scales may be 2-d, e.g. per degree and channel), and embedding tables
    (an element that is rare in the data would otherwise have its embedding shrunk to zero).
    """
    groups: dict[tuple[bool, bool], list] = {}
    seen = set()
    for name, owner in module.named_modules():
        exempt_owner = is_norm_module(owner) or isinstance(owner, nn.Embedding)
        in_backbone = backbone_lr_scale != 1.0 and (name == "backbone" or name.startswith("backbone."))
        for param in owner.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            decayed = not (exempt_owner or param.ndim <= 1)
            groups.setdefault((in_backbone, decayed), []).append(param)
    return [  # ZeRO cannot flatten an empty group
        {"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0,
         "lr_scale": backbone_lr_scale if key[0] else 1.0}
        for key in ((False, True), (False, False), (True, True), (True, False)) if key in groups
    ]


def build_adamw(module: nn.Module, settings: OptimSettings) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters (call after any wrapping that replaces them)."""
    groups = param_groups(module, settings.weight_decay, settings.backbone_lr_scale)
    for group in groups:
        group["lr"] = settings.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)
