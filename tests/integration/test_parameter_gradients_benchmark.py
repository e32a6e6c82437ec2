"""benchmarks/parameter_gradients.py: both forms of the backward run on the same batch and are reported."""
from __future__ import annotations

from tests.benchmark_helpers import load_benchmark
from tests.model_helpers import rattled_alloy, tiny_model

BENCHMARK = load_benchmark("parameter_gradients")


def test_both_forms_are_timed_on_the_batch_and_leave_no_gradient_behind():
    model = tiny_model().float()  # the benchmark's batches are float32, as training's are
    batch = BENCHMARK.batch_of([rattled_alloy()], model.config.cutoff)
    report = BENCHMARK.measure(model, batch, steps=2)
    assert report["atoms"] == batch.pos.shape[0] and report["edges"] == batch.edge_index.shape[1]
    for form in BENCHMARK.FORMS:
        assert report[f"{form}_step_s"] > 0 and len(report["spread_s"][form]) == 2
    assert report["ratio_parameters_over_every_leaf"] > 0
    assert all(parameter.grad is None for parameter in model.parameters())
