"""Error tables, parity and learning-curve plots, and the `esen-train eval` command."""
from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from PIL import Image

from esen_train.cli.train import main
from esen_train.data.emt import generate_emt_dataset
from esen_train.data.manifest import DatasetDirectory, DatasetError
from esen_train.evaluation.calculator import ESENCalculator
from esen_train.evaluation.errors import (
    ErrorTables,
    compute_errors,
    error_table_rows,
    format_error_table,
    full_stress,
    parity_panels,
    predict,
    read_labelled_structures,
)
from esen_train.plots import plot_learning_curves, plot_parity
from tests.conftest import shared_data
from tests.evaluation_helpers import labelled_copper_structures, write_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=300, min_height=200):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_width and image.size[1] >= min_height


@pytest.fixture
def extxyz(tmp_path):
    path = tmp_path / "labelled.xyz"
    ase.io.write(path, labelled_copper_structures(), format="extxyz")
    return path


def test_a_file_read_back_has_its_labels(extxyz):
    structures = read_labelled_structures(extxyz)
    originals = labelled_copper_structures()
    assert len(structures) == len(originals)
    for structure, original in zip(structures, originals):  # extxyz keeps about 8 significant digits
        assert structure.energy == pytest.approx(original.get_potential_energy(), rel=1e-7)
        np.testing.assert_allclose(structure.forces, original.get_forces(), rtol=1e-6, atol=1e-7)
        if original.pbc.all():
            np.testing.assert_allclose(structure.stress, original.get_stress(voigt=False), rtol=1e-6, atol=1e-8)
        else:
            assert structure.stress is None
        assert structure.atoms.calc is None  # labels are kept apart from the structure


def test_the_labelling_potential_scores_zero(extxyz):
    structures = read_labelled_structures(extxyz)
    metrics = compute_errors(structures, predict(EMT(), structures))
    # Zero up to the rounding of positions and labels in the extxyz text.
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "force_rmse_mev_per_A", "stress_mae_mev_per_A3"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-3)
    assert metrics["force_cosine"] == pytest.approx(1.0, abs=1e-8)
    assert metrics["num_structures"] == 5 and metrics["num_structures_with_stress"] == 4


def test_known_offsets_give_known_errors(extxyz):
    structures = read_labelled_structures(extxyz)
    predictions = []
    for index, structure in enumerate(structures):
        natoms = len(structure.atoms)
        forces = structure.forces.copy()
        forces[structure.atoms.numbers == 79] += 0.004  # gold atoms only: 4 meV/Å per component
        prediction = {"energy": structure.energy + 0.002 * natoms * (1 if index % 2 else -1), "forces": forces}
        if structure.stress is not None:
            prediction["stress"] = structure.stress + 0.0005
        predictions.append(prediction)
    metrics = compute_errors(structures, predictions)
    gold_atoms = sum(int((s.atoms.numbers == 79).sum()) for s in structures)
    total_atoms = sum(len(s.atoms) for s in structures)
    assert metrics["energy_mae_mev_per_atom"] == pytest.approx(2.0)
    assert metrics["energy_rmse_mev_per_atom"] == pytest.approx(2.0)
    assert metrics["force_mae_mev_per_A"] == pytest.approx(4.0 * gold_atoms / total_atoms)
    assert metrics["force_rmse_mev_per_A"] == pytest.approx(4.0 * np.sqrt(gold_atoms / total_atoms))
    assert metrics["stress_mae_mev_per_A3"] == pytest.approx(0.5)
    per_element = metrics["per_element"]
    assert set(per_element) == {"C", "O", "Cu", "Au"}
    assert per_element["Au"]["force_mae_mev_per_A"] == pytest.approx(4.0)
    assert per_element["Cu"]["force_mae_mev_per_A"] == pytest.approx(0.0)
    assert per_element["Au"]["num_atoms"] == gold_atoms
    assert per_element["Au"]["num_structures"] == 2  # energy and stress: structures holding gold
    assert "stress_mae_mev_per_A3" not in per_element["O"]  # the molecule has no stress label
    table = format_error_table(metrics)
    assert table.splitlines()[0].split()[0] == "element"
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["all", "C", "O", "Cu", "Au"]


def test_tables_per_config_type_and_per_dataset(extxyz):
    """Known offsets by config type and dataset give known errors in each group."""
    tables = ErrorTables()
    for dataset, offset in (("first", 0.001), ("second", 0.003)):
        for index, structure in enumerate(read_labelled_structures(extxyz)):
            structure.config_type = "even" if index % 2 == 0 else None
            structure.dataset = dataset
            shift = offset * (2 if structure.config_type else 1)  # eV/atom
            prediction = {"energy": structure.energy + shift * len(structure.atoms), "forces": structure.forces,
                          "stress": structure.stress}
            tables.add(structure, prediction)
    metrics = tables.result()
    assert set(metrics["per_dataset"]) == {"first", "second"}
    assert metrics["per_dataset"]["first"]["num_structures"] == 5
    assert metrics["per_dataset"]["first"]["energy_mae_mev_per_atom"] == pytest.approx((3 * 2 + 2 * 1) / 5)
    assert metrics["per_dataset"]["second"]["energy_mae_mev_per_atom"] == pytest.approx(3 * (3 * 2 + 2 * 1) / 5)
    assert set(metrics["per_config_type"]) == {"even", "(unset)"}
    assert metrics["per_config_type"]["even"]["num_structures"] == 6
    assert metrics["per_config_type"]["even"]["energy_mae_mev_per_atom"] == pytest.approx((2 + 6) / 2)
    assert metrics["per_config_type"]["(unset)"]["energy_mae_mev_per_atom"] == pytest.approx((1 + 3) / 2)
    assert metrics["per_config_type"]["even"]["force_mae_mev_per_A"] == 0.0
    text = format_error_table(metrics)
    assert [table.splitlines()[0].split()[0] for table in text.split("\n\n")] == ["element", "config_type", "dataset"]
    columns, rows = error_table_rows(metrics)
    assert columns[:3] == ["group", "name", "num_structures"]
    assert [row[:2] for row in rows][:1] == [["all", "all"]]
    assert ["dataset", "second"] in [row[:2] for row in rows] and ["config_type", "even"] in [row[:2] for row in rows]


def test_force_cosine_sees_direction_not_size(extxyz):
    structures = read_labelled_structures(extxyz)
    doubled = [{"energy": s.energy, "forces": 2 * s.forces, "stress": s.stress} for s in structures]
    flipped = [{"energy": s.energy, "forces": -s.forces, "stress": s.stress} for s in structures]
    assert compute_errors(structures, doubled)["force_cosine"] == pytest.approx(1.0)
    assert compute_errors(structures, flipped)["force_cosine"] == pytest.approx(-1.0)


def test_missing_labels_name_the_file_frame_and_field(tmp_path):
    atoms = labelled_copper_structures(count=2)
    atoms[1].calc = SinglePointCalculator(atoms[1], forces=atoms[1].get_forces())  # energy dropped
    path = tmp_path / "unlabelled.xyz"
    ase.io.write(path, atoms, format="extxyz")
    with pytest.raises(ValueError, match=r"unlabelled\.xyz structure 1: field 'energy': missing from the input"):
        read_labelled_structures(path)
    with pytest.raises(FileNotFoundError, match="absent.xyz"):
        read_labelled_structures(tmp_path / "absent.xyz")
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(ValueError, match="garbage.xyz"):
        read_labelled_structures(garbage)


def test_a_dataset_directory_is_read_with_its_labels(tmp_path):
    generate_emt_dataset(tmp_path / "emt", num=5, seed=3)
    structures = read_labelled_structures(tmp_path / "emt")
    dataset = DatasetDirectory(tmp_path / "emt")
    assert len(structures) == len(dataset) == 5
    for index, structure in enumerate(structures):
        record = dataset.read(index)
        np.testing.assert_array_equal(structure.atoms.positions, record.positions)
        np.testing.assert_array_equal(structure.atoms.numbers, record.atomic_numbers)
        np.testing.assert_array_equal(structure.forces, record.forces)
        np.testing.assert_array_equal(structure.stress, record.stress)
        assert structure.energy == record.energy and structure.source == f"{tmp_path / 'emt'}:{index}"
    metrics = compute_errors(structures, predict(EMT(), structures))  # the EMT labels, recomputed
    assert metrics["energy_mae_mev_per_atom"] < 1e-6 and metrics["stress_mae_mev_per_A3"] < 1e-6
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="manifest.json"):
        read_labelled_structures(tmp_path / "not-a-dataset")


def test_parity_plot_is_a_png(extxyz, tmp_path):
    structures = read_labelled_structures(extxyz)
    predictions = predict(EMT(), structures)
    panels = parity_panels(structures, predictions)
    assert [label.split()[0] for label, _, _ in panels] == ["energy", "force", "stress"]
    assert_png(plot_parity(panels, tmp_path / "parity.png", title="EMT"), min_width=600)


def test_learning_curves_from_a_trainer_metrics_file(tmp_path):
    rows = []
    for stage, offset in (("direct", 0), ("conservative", 40)):
        for step in range(5, 45 if stage == "direct" else 25, 5):
            rows.append({"stage": stage, "split": "train", "step": step, "global_step": offset + step,
                         "loss": 10.0 / step, "energy_mae_mev_per_atom": 50.0 / step, "force_mae_mev_per_A": 80.0 / step})
        rows.append({"stage": stage, "split": "val", "step": step, "global_step": offset + step,
                     "energy_mae_mev_per_atom": 60.0 / step, "force_mae_mev_per_A": 90.0 / step,
                     "force_cosine": 0.5, "stress_mae_mev_per_A3": None})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_png(plot_learning_curves(metrics, tmp_path / "learning_curves.png"), min_width=1000)

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl: line 2"):
        plot_learning_curves(broken, tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()


def test_eval_command_on_a_file(extxyz, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", stage="conservative")
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "run"), "--data", str(extxyz), "--json", "--out", str(out),
                 "--dtype", "float64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(checkpoint)
    assert report["forces"] == "conservative" and report["num_structures"] == 5
    structures = read_labelled_structures(extxyz)
    calculator = ESENCalculator.from_checkpoint(checkpoint, dtype=torch.float64)
    expected = compute_errors(structures, predict(calculator, structures))
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3", "force_cosine"):
        assert report[key] == pytest.approx(expected[key], rel=1e-9)
    assert_png(out / "parity.png", min_width=600)
    assert json.loads((out / "errors.json").read_text()) == report

    assert main(["eval", str(tmp_path / "run"), "--data", str(extxyz), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "F MAE meV/Å" in table
    assert [line.split()[0] for line in table.splitlines()[3:8]] == ["all", "C", "O", "Cu", "Au"]


def test_eval_command_on_a_dataset_directory(tmp_path, capsys):
    generate_emt_dataset(tmp_path / "emt", num=4, seed=0)
    write_checkpoint(tmp_path / "run", stage="direct")
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "emt"), "--json",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["forces"] == "direct"  # a direct-stage checkpoint is used the way it was trained
    assert report["num_structures"] == 4 and report["num_structures_with_stress"] == 4
    for key in ("energy_mae_mev_per_atom", "force_mae_mev_per_A", "stress_mae_mev_per_A3"):
        assert np.isfinite(report[key]) and report[key] > 0
    assert_png(tmp_path / "eval" / "parity.png", min_width=600)


def test_eval_writes_predictions_and_tables_per_dataset(extxyz, tmp_path, capsys):
    """Two inputs, a file and a dataset directory: one predictions file with every structure's
    reference and predicted labels, and error tables per dataset and per config type."""
    generate_emt_dataset(tmp_path / "emt", num=6, seed=1)
    checkpoint = write_checkpoint(tmp_path / "run", stage="conservative")
    predictions_file = tmp_path / "out" / "predictions.extxyz"
    assert main(["eval", str(tmp_path / "run"), "--data", str(extxyz), str(tmp_path / "emt"), "--json",
                 "--predictions", str(predictions_file), "--out", str(tmp_path / "eval"), "--dtype", "float64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_structures"] == 11 and report["predictions"] == str(predictions_file)
    assert {name: row["num_structures"] for name, row in report["per_dataset"].items()} == {"labelled.xyz": 5, "emt": 6}
    emt_kinds = {r.config_type for r in (DatasetDirectory(tmp_path / "emt").read(i) for i in range(6))}
    assert set(report["per_config_type"]) == emt_kinds | {"(unset)"}  # the extxyz names no config type

    structures = read_labelled_structures(extxyz) + read_labelled_structures(tmp_path / "emt")
    calculator = ESENCalculator.from_checkpoint(checkpoint, dtype=torch.float64)
    frames = ase.io.read(predictions_file, ":")
    assert len(frames) == len(structures)
    for frame, structure in zip(frames, structures):
        (expected,) = calculator.calculate_batch([structure.atoms])
        assert frame.calc is None  # labels are named, never a calculator's results
        assert frame.info["REF_energy"] == structure.energy
        assert frame.info["ESEN_energy"] == pytest.approx(expected["energy"], rel=1e-12)
        np.testing.assert_allclose(frame.arrays["REF_forces"], structure.forces, atol=1e-8)  # extxyz: 8 decimals
        np.testing.assert_allclose(frame.arrays["ESEN_forces"], expected["forces"], atol=1e-8)
        np.testing.assert_allclose(frame.positions, structure.atoms.positions, atol=1e-8)
        if structure.stress is None:
            assert "REF_stress" not in frame.info
        else:
            np.testing.assert_allclose(frame.info["REF_stress"], structure.stress, rtol=1e-12)
            np.testing.assert_allclose(frame.info["ESEN_stress"], full_stress(expected["stress"]), rtol=1e-9, atol=1e-15)
        assert frame.info["dataset"] == structure.source.rsplit(":", 1)[0].split("/")[-1]
        assert frame.info.get("config_type") == structure.config_type

    assert main(["eval", str(tmp_path / "run"), "--data", str(extxyz), str(tmp_path / "emt"), "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out
    assert "config_type" in table and "dataset" in table and "labelled.xyz" in table


def test_eval_streams_a_dataset_a_batch_at_a_time(tmp_path, monkeypatch):
    """Structures are read as the batches are predicted, not all first: at any moment at most
    one batch (plus the structure that did not fit) has been read and not yet predicted."""
    import esen_train.evaluation.errors as errors

    generate_emt_dataset(tmp_path / "emt", num=30, seed=2)
    write_checkpoint(tmp_path / "run", stage="conservative")
    events = []
    read_record, calculate_batch = errors._from_record, ESENCalculator.calculate_batch
    monkeypatch.setattr(errors, "_from_record", lambda *a: events.append("read") or read_record(*a))
    monkeypatch.setattr(ESENCalculator, "calculate_batch",
                        lambda self, atoms, **kw: events.extend(["predict"] * len(atoms)) or calculate_batch(self, atoms, **kw))
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "emt"), "--max-atoms", "64",
                 "--json", "--out", str(tmp_path / "eval")]) == 0
    assert events.count("read") == events.count("predict") == 30
    waiting, most_waiting = 0, 0
    for event in events:
        waiting += 1 if event == "read" else -1
        most_waiting = max(most_waiting, waiting)
    atoms = [len(s.atoms) for s in read_labelled_structures(tmp_path / "emt")]
    assert most_waiting <= 64 // min(atoms) + 1 < 30


def test_eval_command_errors_are_one_line(extxyz, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "no-run"), "--data", str(extxyz)]) == 2
    assert "no-run" in capsys.readouterr().err
    write_checkpoint(tmp_path / "run")
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "no-data.xyz")]) == 2
    assert "no-data.xyz" in capsys.readouterr().err


@pytest.mark.shared_data
def test_real_dft_file_with_stress():
    structures = read_labelled_structures(shared_data("mlearn/Cu_test.xyz"))
    assert len(structures) == 31 and all(s.stress is not None for s in structures)
    smallest = sorted(structures, key=lambda s: len(s.atoms))[:5]
    metrics = compute_errors(smallest, predict(EMT(), smallest))
    # EMT is not DFT: energies are on another reference, forces are close but not equal.
    assert 1.0 < metrics["force_mae_mev_per_A"] < 500.0
    assert metrics["per_element"]["Cu"]["num_atoms"] == sum(len(s.atoms) for s in smallest)
