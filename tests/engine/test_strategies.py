"""Every strategy, on two real processes joined by gloo, trains exactly as one process does.

For ddp, fsdp (per-block sharding in the direct stage, root-only in the conservative stage) and
DeepSpeed ZeRO-1 and ZeRO-2, with and without the double backward of conservative forces, with
and without gradient accumulation, on a toy potential and on the real tiny eSEN:
- the loss trajectory, final weights, EMA and validation loss equal one process's with the same
  global batch (each rank gets half): float64 to 1e-9 relative; DeepSpeed keeps fp32 master
  weights, so its scenarios run in float32, to 2e-5 relative;
- a NaN loss on one rank is skipped, and reported skipped, on every rank;
- a rank whose batches have no edge at all (atoms without neighbours only) takes part in every
  step, with zero gradients for the edge parameters, and the result still equals one process's;
- a checkpoint saved on 2 ranks and loaded by a fresh model on 2 ranks continues bit for bit;
  loaded on 1 rank it gives the same weights and EMA (and, except for ZeRO whose optimizer
  partitions cannot be re-split, the same continuation);
- FSDP and ZeRO hold about half the optimizer state per rank.
(A checkpoint save killed or failing half-way: tests/engine/test_resume.py.)

Processes: all torch-strategy scenarios run in one pair of processes, the DeepSpeed ones in
another pair, and the one-rank DeepSpeed loads in one more process. DeepSpeed's first start on
a machine compiles a C++ extension (about 80 s, cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from esen_train.engine.config import ConfigError, StageConfig, StrategyConfig, load_train_config
from esen_train.engine.strategies import STRATEGIES, build_strategy
from tests.strategy_harness import (
    Scenario,
    build,
    load_on_this_world,
    loss_share,
    rank_batch,
    run_in_processes,
    run_scenario,
    single_process_dist,
    train_scenarios,
    write_training_state,
)

ROOT = Path(__file__).resolve().parents[2]
F32 = torch.float32
ESEN_LR = 5e-3  # the toy's 3e-2 is too much for eSEN
TORCH_SCENARIOS = [
    Scenario("ddp", conservative=True),
    Scenario("ddp", conservative=False, grad_accum_steps=2),
    Scenario("fsdp", conservative=False),
    Scenario("fsdp", conservative=True, grad_accum_steps=2),
    Scenario("ddp", conservative=True, model="esen", lr=ESEN_LR),
    Scenario("fsdp", conservative=False, model="esen", lr=ESEN_LR),
    Scenario("fsdp", conservative=True, model="esen", lr=ESEN_LR),
    # Rank 1 gets only atoms without neighbours: no edge, every edge parameter's gradient zero.
    Scenario("ddp", conservative=True, model="esen", isolated=True, lr=ESEN_LR),
    Scenario("ddp", conservative=False, model="esen", isolated=True, lr=ESEN_LR),
    Scenario("fsdp", conservative=False, model="esen", isolated=True, lr=ESEN_LR),
    Scenario("fsdp", conservative=True, model="esen", isolated=True, lr=ESEN_LR),
]
DEEPSPEED_SCENARIOS = [
    Scenario("deepspeed", conservative=True, zero_stage=1, dtype=F32),
    Scenario("deepspeed", conservative=False, zero_stage=1, grad_accum_steps=2, dtype=F32),
    Scenario("deepspeed", conservative=True, zero_stage=2, grad_accum_steps=2, dtype=F32),
    Scenario("deepspeed", conservative=False, zero_stage=2, dtype=F32),
    Scenario("deepspeed", conservative=True, zero_stage=2, model="esen", lr=ESEN_LR, dtype=F32),
    Scenario("deepspeed", conservative=True, zero_stage=2, model="esen", isolated=True, lr=ESEN_LR, dtype=F32),
    Scenario("deepspeed", conservative=True, zero_stage=1, model="esen", isolated=True, lr=ESEN_LR, dtype=F32),
]
ALL_SCENARIOS = TORCH_SCENARIOS + DEEPSPEED_SCENARIOS
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def by_key(scenarios):
    return pytest.mark.parametrize("scenario", scenarios, ids=[s.key for s in scenarios])


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("strategy_checkpoints")


@pytest.fixture(scope="module")
def torch_two_ranks(checkpoint_root) -> dict[str, list[dict]]:
    """key -> [rank 0's results, rank 1's results] for the torch strategies."""
    ranks = run_in_processes(2, train_scenarios, (TORCH_SCENARIOS, checkpoint_root), checkpoint_root / "results-torch")
    return {s.key: [ranks[0][s.key], ranks[1][s.key]] for s in TORCH_SCENARIOS}


@pytest.fixture(scope="module")
def deepspeed_two_ranks(checkpoint_root) -> dict[str, list[dict]]:
    """The same for DeepSpeed, in processes of their own."""
    ranks = run_in_processes(2, train_scenarios, (DEEPSPEED_SCENARIOS, checkpoint_root), checkpoint_root / "results-ds")
    return {s.key: [ranks[0][s.key], ranks[1][s.key]] for s in DEEPSPEED_SCENARIOS}


@pytest.fixture
def two_ranks(request, scenario) -> list[dict]:
    """[rank 0's results, rank 1's results] of this test's scenario."""
    group = "deepspeed_two_ranks" if scenario.strategy == "deepspeed" else "torch_two_ranks"
    return request.getfixturevalue(group)[scenario.key]


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """Scenario key -> one process's results, filled on demand by `one_process`."""
    return {}


@pytest.fixture
def one_process(references, scenario, tmp_path_factory) -> dict:
    """The reference: strategy `single`, whole batch, same steps (computed once per scenario)."""
    if scenario.key not in references:
        single = replace(scenario, strategy="single")
        references[scenario.key] = run_scenario(single, single_process_dist(), tmp_path_factory.mktemp("single"))
    return references[scenario.key]


def assert_close_weights(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")


def assert_equal_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ----- trajectories -------------------------------------------------------------------
@by_key(ALL_SCENARIOS)
def test_two_ranks_follow_one_process(scenario, two_ranks, one_process):
    rank0, reference, rtol = two_ranks[0], one_process, RTOL[scenario.dtype]
    finite = [i for i in range(scenario.steps) if i != scenario.nonfinite_step]
    assert [rank0["losses"][i] for i in finite] == pytest.approx([reference["losses"][i] for i in finite], rel=rtol)
    assert rank0["val_loss"] == pytest.approx(reference["val_loss"], rel=rtol)
    assert_close_weights(rank0["final_weights"], reference["final_weights"], rtol)
    assert_close_weights(rank0["final_ema"], reference["final_ema"], rtol)
    # The last steps moved the weights: the comparison is not between two untouched models.
    assert any(not torch.equal(value, reference["saved_weights"][name]) for name, value in rank0["final_weights"].items())


@by_key([s for s in ALL_SCENARIOS if s.isolated])
def test_one_rank_trains_on_batches_without_edges(scenario, two_ranks, one_process):
    """Rank 1 never sees an edge, rank 0 always does; the step neither hangs nor errs (the
    scenarios above also follow one process with the whole batch)."""
    assert all(count > 0 for count in two_ranks[0]["edges"])
    assert all(count == 0 for count in two_ranks[1]["edges"])
    assert all(count > 0 for count in one_process["edges"])


@by_key(ALL_SCENARIOS)
def test_nonfinite_step_is_skipped_on_every_rank(scenario, two_ranks, one_process):
    expected = [step == scenario.nonfinite_step for step in range(scenario.steps)]
    for result in [*two_ranks, one_process]:
        assert result["skipped"] == expected
        norms = result["grad_norms"]
        assert not math.isfinite(norms[scenario.nonfinite_step])
        assert all(math.isfinite(norm) for i, norm in enumerate(norms) if i != scenario.nonfinite_step)


@by_key([s for s in TORCH_SCENARIOS if s.strategy == "fsdp"])
def test_fsdp_shards_blocks_only_in_the_direct_stage(scenario, two_ranks):
    assert two_ranks[0]["sharded_blocks"] == (not scenario.conservative)


@by_key(ALL_SCENARIOS)
def test_optimizer_state_per_rank(scenario, two_ranks, one_process):
    """ddp keeps all of AdamW's state on each rank; fsdp and ZeRO about half of it."""
    full = one_process["optimizer_state_bytes"]
    for rank in two_ranks:
        fraction = rank["optimizer_state_bytes"] / full
        assert fraction == (1.0 if scenario.strategy == "ddp" else pytest.approx(0.5, abs=0.1))


# ----- checkpoints ----------------------------------------------------------------------
@by_key(ALL_SCENARIOS)
def test_resume_on_two_ranks_continues_bit_for_bit(scenario, two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["resumed_losses"] == result["losses"][scenario.save_after:]
        assert result["loaded_extra"] == {"step": scenario.save_after, "rank": rank}
    rank0 = two_ranks[0]
    assert_equal_weights(rank0["resumed_final_weights"], rank0["final_weights"])
    assert_equal_weights(rank0["resumed_final_ema"], rank0["final_ema"])


@by_key(TORCH_SCENARIOS)
def test_two_rank_checkpoint_loads_on_one_rank(scenario, two_ranks, checkpoint_root):
    """In this process, without a process group: the same weights and EMA, and the same
    continuation as on two ranks (the optimizer state is complete)."""
    rank0 = two_ranks[0]
    loaded = load_on_this_world([scenario], checkpoint_root, dist=single_process_dist())[scenario.key]
    assert_equal_weights(loaded["weights"], rank0["saved_weights"])
    assert_equal_weights(loaded["ema"], rank0["saved_ema"])
    assert loaded["extra_rank"] == 0
    assert loaded["losses"] == pytest.approx(rank0["resumed_losses"], rel=RTOL[scenario.dtype])


def test_two_rank_zero_checkpoint_loads_on_one_rank(deepspeed_two_ranks, checkpoint_root):
    """ZeRO on one process: the weights and EMA come back; the optimizer state, partitioned for
    two ranks, does not, and a warning says so."""
    [loaded] = run_in_processes(1, load_on_this_world, (DEEPSPEED_SCENARIOS, checkpoint_root), checkpoint_root / "one-rank")
    for scenario in DEEPSPEED_SCENARIOS:
        rank0, result = deepspeed_two_ranks[scenario.key][0], loaded[scenario.key]
        assert_equal_weights(result["weights"], rank0["saved_weights"])
        assert_equal_weights(result["ema"], rank0["saved_ema"])
        assert any("AdamW moments start afresh" in message for message in result["warnings"])


@pytest.mark.parametrize("writer, reader", [("ddp", "single"), ("single", "ddp")])
def test_single_and_ddp_read_each_others_state(tmp_path, writer, reader):
    written = build(Scenario(writer, conservative=False), single_process_dist(), seed=0)
    write_training_state(written, tmp_path / "state", extra={"step": 3})
    loaded = build(Scenario(reader, conservative=False), single_process_dist(), seed=1)
    assert loaded.load_from(tmp_path / "state") == {"step": 3}
    assert_equal_weights(loaded.full_state_dict(use_ema=False), written.full_state_dict(use_ema=False))


def test_loading_another_strategys_state_fails_clearly(torch_two_ranks, checkpoint_root):
    fsdp = build(Scenario("fsdp", conservative=True), single_process_dist(), seed=0)
    with pytest.raises(ValueError, match="written by strategy 'ddp'"):
        fsdp.load_from(checkpoint_root / TORCH_SCENARIOS[0].key)


def test_bf16_on_cpu_warns_and_stays_float32():
    with pytest.warns(UserWarning, match="stays in float32"):
        strategy = build_strategy(StrategyConfig(name="single"), StageConfig(precision="bf16"), single_process_dist())
    with strategy.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_single_strategy_refuses_several_processes():
    two = replace(single_process_dist(), world_size=2)
    with pytest.raises(ValueError, match="use ddp, fsdp or deepspeed"):
        build_strategy(StrategyConfig(name="single"), StageConfig(), two)


# ----- the table of strategies ----------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_config_accepts_each_strategy_in_the_table(name):
    assert load_train_config(ROOT / "configs" / "tiny.yaml", [f"strategy.name={name}"]).strategy.name == name


def test_config_rejects_a_strategy_outside_the_table_naming_the_table():
    with pytest.raises(ConfigError, match=r"strategy.name must be one of \('single', 'ddp', 'fsdp', 'deepspeed'\)"):
        load_train_config(ROOT / "configs" / "tiny.yaml", ["strategy.name=horovod"])


@pytest.mark.parametrize("name", [name for name in STRATEGIES if name != "deepspeed"])  # DeepSpeed: in its processes
def test_build_strategy_makes_the_strategy_of_each_name(name):
    assert build_strategy(StrategyConfig(name=name), StageConfig(), single_process_dist()).name == name


def test_the_base_imports_no_strategy():
    """No import cycle: base.py imports none of the modules that subclass it."""
    tree = ast.parse((ROOT / "esen_train" / "engine" / "strategies" / "base.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {module for module in imported if module and module.startswith("esen_train.engine.strategies")}


def test_checking_a_deepspeed_config_does_not_import_deepspeed():
    """The table names deepspeed without importing it: only building the strategy does."""
    code = ("import sys; from esen_train.engine.config import load_train_config; "
            "load_train_config('tiny', ['strategy.name=deepspeed']); print('deepspeed' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


# ----- the step protocol ----------------------------------------------------------------
def test_optimizer_step_needs_grad_accum_steps_micro_batches():
    scenario = Scenario("single", conservative=False, grad_accum_steps=2)
    strategy, dist = build(scenario, single_process_dist(), seed=0), single_process_dist()

    def loss_of(model, batch):
        return loss_share(model(batch, forces="direct"), batch, dist)

    with pytest.raises(ValueError, match="needs grad_accum_steps=2 micro-batches, got 1"):
        strategy.optimizer_step([rank_batch(0, 0, dist, scenario)], loss_of, max_grad_norm=1.0)


@pytest.mark.parametrize("name", ["single", "fsdp"])
def test_conservative_backward_gives_the_parameters_gradients_of_plain_autograd(name):
    """The strategy's backward of a conservative loss (forces and stress through the model's
    own graph: a double backward) fills every trainable parameter's gradient exactly as
    torch.autograd.grad of the same loss does. single and ddp (the base class) leave the
    positions' gradient out: it is never used, and skipping it makes the step cheaper."""
    scenario = Scenario(name, conservative=True, model="esen")
    strategy, dist = build(scenario, single_process_dist(), seed=0), single_process_dist()
    batch = rank_batch(0, 0, dist, scenario)
    batch.pos.requires_grad_()  # so the model differentiates by this very tensor

    def loss_of(model):
        out = model(batch, forces="conservative", stress=True, create_graph=True)
        return loss_share(out, batch, dist) + out["stress"].square().sum()

    parameters = [parameter for parameter in strategy.module.parameters() if parameter.requires_grad]
    expected = torch.autograd.grad(loss_of(strategy.model), parameters, allow_unused=True, materialize_grads=True)
    strategy.backward(loss_of(strategy.model))
    for parameter, gradient in zip(parameters, expected):
        assert parameter.grad is not None
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-12, atol=1e-15)
    assert any(gradient.abs().sum() > 0 for gradient in expected)
    if name == "single":
        assert batch.pos.grad is None
