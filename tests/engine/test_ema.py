"""ExponentialMovingAverage on a plain module (float64). How it behaves under FSDP2 shards and
ZeRO is covered by tests/engine/test_strategies.py, which compares the EMA of every strategy on two
ranks with one process's."""
import pytest
import torch
from torch import nn

from esen_train.engine.ema import ExponentialMovingAverage


def small_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)).double()
    module[1].bias.requires_grad_(False)  # a frozen parameter is not averaged
    return module


def perturb(module: nn.Module, step: int) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(step), dtype=param.dtype))


def test_update_follows_the_warmed_up_decay():
    module = small_module()
    ema = ExponentialMovingAverage(module, decay=0.99)
    expected = {name: param.detach().clone() for name, param in module.named_parameters() if param.requires_grad}
    for step in range(30):
        perturb(module, step)
        decay = min(0.99, (1 + step) / (10 + step))
        for name, param in module.named_parameters():
            if param.requires_grad:
                expected[name] = decay * expected[name] + (1 - decay) * param.detach()
        ema.update()
    assert ema.num_updates == 30
    assert set(ema.shadow) == set(expected) and "1.bias" not in ema.shadow
    for name in expected:
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=1e-14, atol=1e-14)


def test_swapped_in_runs_with_the_average_and_restores_the_weights():
    module = small_module()
    ema = ExponentialMovingAverage(module, decay=0.5)
    perturb(module, 0)
    ema.update()
    perturb(module, 1)
    trained = {name: param.detach().clone() for name, param in module.named_parameters()}
    with ema.swapped_in():
        for name, param in module.named_parameters():
            assert torch.equal(param, ema.shadow.get(name, trained[name]))
    for name, param in module.named_parameters():
        assert torch.equal(param, trained[name])


def test_swapped_in_restores_the_weights_after_an_exception():
    module = small_module()
    ema = ExponentialMovingAverage(module, decay=0.5)
    perturb(module, 0)
    trained = {name: param.detach().clone() for name, param in module.named_parameters()}
    with pytest.raises(RuntimeError, match="validation failed"), ema.swapped_in():
        raise RuntimeError("validation failed")
    for name, param in module.named_parameters():
        assert torch.equal(param, trained[name])


def test_state_dict_round_trip():
    module = small_module()
    ema = ExponentialMovingAverage(module, decay=0.9)
    for step in range(3):
        perturb(module, step)
        ema.update()
    restored = ExponentialMovingAverage(small_module(seed=1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.num_updates) == (0.9, 3)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value)


def test_load_state_dict_names_what_does_not_match():
    ema = ExponentialMovingAverage(small_module(), decay=0.9)
    state = ema.state_dict()
    state["shadow"] = dict(state["shadow"], extra=torch.zeros(1))
    del state["shadow"]["0.weight"]
    with pytest.raises(KeyError, match=r"missing \['0.weight'\], unexpected \['extra'\]"):
        ema.load_state_dict(state)
    state = ema.state_dict()
    state["shadow"] = dict(state["shadow"], **{"0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(2, 2\), the model has \(4, 3\)"):
        ema.load_state_dict(state)


def test_decay_must_be_below_one():
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialMovingAverage(small_module(), decay=1.0)
