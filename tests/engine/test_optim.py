"""The learning-rate schedule and AdamW's weight-decay groups."""
import math

import pytest
import torch
from torch import nn

from esen_train.engine.distributed import DistInfo
from esen_train.engine.optim import OptimSettings, build_adamw, lr_at, param_groups
from esen_train.engine.strategies.single import SingleStrategy
from esen_train.model import ESEN
from tests.model_helpers import tiny_config


def test_warmup_is_linear_and_never_zero():
    lrs = [lr_at(step, 1e-3, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for step in range(4)]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])


def test_cosine_from_peak_to_minimum_then_flat():
    def lr(step):
        return lr_at(step, 1e-3, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)

    assert lr(4) == pytest.approx(1e-3)
    assert lr(12) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert lr(20) == pytest.approx(1e-4)
    assert lr(25) == pytest.approx(1e-4)
    assert all(lr(step) >= lr(step + 1) for step in range(4, 25))
    assert lr(7) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 16)))


def test_time_fraction_moves_the_cosine_when_it_is_ahead_of_the_steps():
    def lr(step, time_fraction):
        return lr_at(step, 1e-3, warmup_steps=4, total_steps=1000, min_lr_ratio=0.1, time_fraction=time_fraction)

    assert lr(10, 0.5) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half the time: half-way down
    assert lr(10, 1.0) == pytest.approx(1e-4)
    assert lr(10, 0.0) == lr_at(10, 1e-3, warmup_steps=4, total_steps=1000, min_lr_ratio=0.1)  # steps alone
    assert lr(900, 0.01) < lr(10, 0.5)  # whichever is further along
    assert lr(1, 0.9) == pytest.approx(0.5e-3)  # the warm-up is in steps


def test_no_warmup():
    assert lr_at(0, 2e-3, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(2e-3)
    assert lr_at(10, 2e-3, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("args", [dict(total_steps=0), dict(warmup_steps=-1), dict(min_lr_ratio=1.5)])
def test_bad_schedule_arguments_are_named(args):
    settings = dict(step=0, base_lr=1e-3, warmup_steps=1, total_steps=10, min_lr_ratio=0.1) | args
    with pytest.raises(ValueError, match="lr_at needs"):
        lr_at(**settings)


def test_norms_biases_and_embeddings_are_not_decayed():
    model = nn.ModuleDict({
        "embedding": nn.Embedding(5, 4),
        "linear": nn.Linear(4, 4),
        "norm": nn.LayerNorm(4),
    })
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model["linear"].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model["embedding"].weight), id(model["linear"].bias), id(model["norm"].weight), id(model["norm"].bias)
    }


def test_esen_groups_cover_every_parameter_once():
    model = ESEN(tiny_config(direct_forces=True))
    groups = param_groups(model, weight_decay=1e-3)
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(names.values())
    exempt = {names[id(p)] for p in groups[1]["params"]}
    norm_scales = {name for name in names.values() if ".norm" in name and name.endswith("weight")}
    embeddings = {name for name in names.values() if "embedding.weight" in name}
    assert norm_scales and norm_scales <= exempt
    assert embeddings and embeddings <= exempt
    assert not any(name.endswith("bias") for name in names.values() if name not in exempt)


def test_adamw_uses_the_settings():
    model = nn.Linear(3, 2)
    optimizer = build_adamw(model, OptimSettings(lr=2e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 2e-3 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 for g in optimizer.param_groups)


def test_the_backbone_can_learn_slower_than_the_heads():
    """backbone_lr_scale: the backbone's groups carry the scale, set_lr applies it, and the
    strategy reports the schedule's learning rate. Frozen parameters are in no group."""
    model = ESEN(tiny_config())
    model.backbone.blocks[0].requires_grad_(False)
    strategy = SingleStrategy(DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    strategy.setup(model, OptimSettings(lr=1e-3, weight_decay=0.01, backbone_lr_scale=0.1), conservative=False, ema_decay=0.99)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = strategy.optimizer.param_groups
    assert [(g["lr_scale"], g["weight_decay"], g["lr"]) for g in groups] == [
        (1.0, 0.01, 1e-3), (1.0, 0.0, 1e-3), (0.1, 0.01, pytest.approx(1e-4)), (0.1, 0.0, pytest.approx(1e-4))]
    for group in groups:
        in_backbone = {names[id(p)].startswith("backbone.") for p in group["params"]}
        assert in_backbone == {group["lr_scale"] == 0.1}
    grouped = {names[id(p)] for group in groups for p in group["params"]}
    assert not any(name.startswith("backbone.blocks.0.") for name in grouped)
    assert grouped == {name for name, p in model.named_parameters() if p.requires_grad}
    strategy.set_lr(2e-3)
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 2e-3, 2e-4, 2e-4])
    assert strategy.lr == pytest.approx(2e-3)
