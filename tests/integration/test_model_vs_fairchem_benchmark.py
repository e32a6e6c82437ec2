"""benchmarks/model_vs_fairchem.py end to end with our side alone (fairchem-core has its own
environment; tests/fairchem/ covers the two models' agreement): every case is timed in its own
case process, on the device and at the precision asked for, and the report says which."""
from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_helpers import load_benchmark

BENCHMARK = load_benchmark("model_vs_fairchem")
CASE_SERVER = load_benchmark("case_server")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_our_side_alone_runs_every_case_and_reports_no_ratios(tmp_path, capsys, precision):
    output = tmp_path / "report.json"
    assert BENCHMARK.main(["--sides", "ours", "--model", "tiny", "--systems", "cu108", "--cu-cells", "1",
                           "--repeats", "1", "--warmup", "0", "--threads", "1", "--precision", precision,
                           "--matmuls-alone", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["precision"] == BENCHMARK.PRECISIONS[precision]
    assert report["steps"] == "one side only: ours"
    cases = {(case["task"], case["mode"]): case for case in report["cases"]}
    assert set(cases) == {(task, mode) for task in BENCHMARK.TASKS for mode in BENCHMARK.MODES}
    for case in cases.values():
        assert "error" not in case and "fairchem" not in case and "ours_over_fairchem" not in case
        ours = case["ours"]
        assert ours["median_s"] > 0 and ours["peak_rss_mb"] > 0 and ours["gflop_per_step"] > 0
        assert "peak_device_mb" not in ours  # a GPU's figure
        assert ours["matmuls_alone_s"] > 0 and ours["atoms_per_s_matmuls_alone"] > 0
        assert ours["matmul_shapes"][0]["calls"] >= 1
    assert set(report["conservative_to_direct"]) == {"cu108_forward", "cu108_train"}
    assert set(report["conservative_to_direct"]["cu108_train"]) == {"ours"}
    assert set(report["parameters"]["conservative"]) == {"ours"}


def test_matmuls_alone_counts_each_call_and_replays_its_operands_layout():
    weight = torch.randn(32, 16)
    features = torch.randn(64, 16)
    batched = torch.randn(8, 5, 3)

    def step():
        for _ in range(3):
            features @ weight.T  # mm with a transposed operand
        torch.bmm(batched, batched.transpose(1, 2))
        torch.relu(features)  # not a matmul

    report = CASE_SERVER.matmuls_alone(step, on_gpu=False, repeats=2)
    assert report["calls"] == 4 and report["matmul_s"] > 0
    by_shapes = {(entry["op"], str(entry["shapes"])): entry["calls"] for entry in report["shapes"]}
    assert by_shapes == {("aten.mm.default", "[[64, 16], [16, 32]]"): 3, ("aten.bmm.default", "[[8, 5, 3], [8, 3, 5]]"): 1}
    # The replayed operand keeps the recorded layout: a transposed view stays transposed.
    transposed = CASE_SERVER.rebuild(CASE_SERVER.describe(weight.T))
    assert transposed.shape == (16, 32) and transposed.stride() == (1, 16)
    broadcast = CASE_SERVER.rebuild(CASE_SERVER.describe(torch.randn(4).expand(3, 4)))
    assert broadcast.stride() == (0, 1)


@pytest.mark.parametrize("arguments, message", [
    (["--sides", "ours,mace"], "--sides takes ours, fairchem or both"),
    (["--device", "cuda", "--profile", "10"], "--profile reports CPU self times"),
])
def test_arguments_it_cannot_honour_are_refused(capsys, arguments, message):
    with pytest.raises(SystemExit):
        BENCHMARK.parse_args(arguments)
    assert message in capsys.readouterr().err
