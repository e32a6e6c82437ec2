"""benchmarks/profile_conservative.py: its step is the model's conservative loss, and it charges
saved tensors and the double backward's ops to the model's modules."""
from __future__ import annotations

import argparse

import torch

from tests.benchmark_helpers import load_benchmark
from tests.model_helpers import rattled_alloy, tiny_model, to_batch


PROFILE = load_benchmark("profile_conservative")
CASE_SERVER = PROFILE.case_server  # the module the profiler script uses
CONV1 = "backbone.blocks.*.edgewise.conv1"


def model_batch_targets():
    model = tiny_model()
    model.train()
    batch = to_batch([rattled_alloy()], model.config.cutoff)
    atoms = batch.pos.shape[0]
    targets = {"energy": torch.zeros(1), "forces": torch.ones(atoms, 3), "stress": torch.zeros(1, 3, 3),
               "natoms": torch.tensor([float(atoms)])}
    return model, batch, targets


def test_the_profiled_step_is_the_model_s_conservative_loss():
    PROFILE.check_same_loss(*model_batch_targets(), stress=True)  # raises SystemExit if not


def test_saved_tensors_and_every_phase_s_time_are_charged_to_modules():
    model, batch, targets = model_batch_targets()
    saved = PROFILE.saved_for_backward(model, batch, targets, stress=True, top=50)
    assert saved["for_first_backward"]["tensors"] > 0 and saved["for_second_backward"]["tensors"] > 0
    assert CONV1 in saved["for_first_backward"]["by_module_mb"]
    phases, profiled = PROFILE.profiled_step(model, batch, targets, stress=True, top=5)
    assert set(phases) == set(PROFILE.PHASES)
    assert 1 <= profiled["profiled_steps"] <= CASE_SERVER.MAX_PROFILED_STEPS
    for phase in PROFILE.PHASES:
        modules = {row["module"] for row in phases[phase]["by_module"]}
        # The backward phases reach conv1 only through the forward ops' sequence numbers.
        assert CONV1 in modules, (phase, modules)
        assert phases[phase]["self_s"] > 0 and len(phases[phase]["by_op_name"]) == 5
    assert all(parameter.grad is None for parameter in model.parameters())


def test_times_only_profiles_the_chosen_model_s_phases_and_nothing_else():
    tiny = {"num_layers": 1, "sphere_channels": 8, "hidden_channels": 8, "edge_channels": 8, "lmax": 1,
            "mmax": 1, "num_radial_basis": 4, "cutoff": 3.0, "max_num_elements": 100, "feed_forward": "spectral"}
    args = argparse.Namespace(hyperparameters=tiny, cu_cells=1, seed=0, repeats=1, top=5, times_only=True)
    report = PROFILE.profile_system("cu108", args)
    assert set(report["phase_s"]) == set(PROFILE.PHASES) and report["step_s"] > 0
    assert "saved_for_backward" not in report and "phases" not in report
    # The batch's edges follow the chosen model's cutoff (3 Å: the 12 nearest neighbours of fcc Cu).
    assert report["edges"] == 12 * report["atoms"]


def test_steps_are_profiled_until_one_faults_no_pages_in(monkeypatch):
    # Page faults a run adds, as the profiler's records push the heap's tensors into fresh pages.
    faults_per_run = iter([400_000, 40_000, 10, 10])
    counter = {"faults": 0, "runs": 0}

    def run():
        counter["runs"] += 1
        counter["faults"] += next(faults_per_run)

    monkeypatch.setattr(CASE_SERVER, "page_faults", lambda: counter["faults"])
    _, steps, faults = CASE_SERVER.profile_until_steady(run)
    assert (steps, faults, counter["runs"]) == (3, 10, 3)


def test_profiling_stops_at_its_limit_when_the_faults_never_settle(monkeypatch):
    counter = {"faults": 0}

    def run():
        counter["faults"] += 50_000

    monkeypatch.setattr(CASE_SERVER, "page_faults", lambda: counter["faults"])
    _, steps, faults = CASE_SERVER.profile_until_steady(run)
    assert (steps, faults) == (CASE_SERVER.MAX_PROFILED_STEPS, 50_000)
    _, steps, _ = CASE_SERVER.profile_until_steady(run, max_steps=1)  # a model near the host's memory
    assert steps == 1
