"""`esen-data` subcommands, run in-process through `main(argv)`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import ase.io
import numpy as np
import pytest

from esen_train.cli.data import main
from esen_train.data.manifest import DatasetDirectory, Manifest


@pytest.fixture(scope="module")
def emt_xyz(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "emt.xyz"
    assert main(["emt", "--out", str(path), "--num", "24", "--seed", "2", "--extxyz"]) == 0
    return path


def test_convert_inspect_verify(tmp_path, emt_xyz, capsys):
    out = tmp_path / "data"
    assert main(["convert", str(emt_xyz), "--out", str(out), "--shards", "2", "--quiet"]) == 0
    assert "wrote 24 structures" in capsys.readouterr().out

    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("num_structures", "num_atoms", "elements", "properties", "shards"):
        assert key in summary
    assert summary["num_structures"] == 24
    assert summary["properties"] == ["energy", "forces", "stress", "config_type"]
    assert [s["name"] for s in summary["shards"]] == ["shard_00000.lmdb", "shard_00001.lmdb"]
    histogram = summary["atoms_per_structure"]["histogram"]
    assert sum(histogram["counts"]) == 24
    assert summary["stats"]["force_rms"] > 0

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "structures          24" in text and "reference energies" in text

    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_failure_names_shard_and_record(tmp_path, emt_xyz, capsys):
    out = tmp_path / "data"
    assert main(["convert", str(emt_xyz), "--out", str(out), "--quiet"]) == 0
    dataset = DatasetDirectory(out)
    forces = dataset.read(5).forces
    dataset.close()
    shard = out / "shard_00000.lmdb"
    data = bytearray(shard.read_bytes())
    data[data.find(forces.tobytes()) + 8] ^= 0x10
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    errors = capsys.readouterr().err
    assert "shard_00000.lmdb record 5: checksum mismatch" in errors


def test_bad_input_exits_2_with_a_message(tmp_path, emt_xyz, capsys):
    assert main(["verify", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.xyz"
    frames = ase.io.read(emt_xyz, ":3")
    frames[2].calc.results["energy"] = float("nan")
    ase.io.write(bad, frames, format="extxyz")
    assert main(["convert", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{bad} structure 2: field 'energy'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(bad), "--out", str(tmp_path / "out"), "--quiet", "--skip-invalid"]) == 0
    assert Manifest.load(tmp_path / "out").skipped == 1
    assert main(["convert", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_convert_with_label_keys_then_export(tmp_path, emt_xyz, capsys):
    """A file labelled REF_energy / REF_forces / REF_stress converts with the key options; the
    dataset exported back to extxyz converts again with the default keys."""
    frames = ase.io.read(emt_xyz, ":5")
    for atoms in frames:
        results = atoms.calc.results
        atoms.info.update(REF_energy=results["energy"], REF_stress=results["stress"], weight_of_it=2.0)
        atoms.arrays["REF_forces"] = results["forces"]
        atoms.calc = None
    relabelled = tmp_path / "ref.xyz"
    ase.io.write(relabelled, frames, format="extxyz")
    out = tmp_path / "data"
    assert main(["convert", str(relabelled), "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{relabelled} structure 0: field 'energy': missing from the input: no 'energy'" in error
    assert "REF_energy" in error and "--energy-key" in error
    assert main(["convert", str(relabelled), "--out", str(out), "--quiet", "--energy-key", "REF_energy",
                 "--forces-key", "REF_forces", "--stress-key", "REF_stress", "--weight-key", "weight_of_it"]) == 0
    assert Manifest.load(out).properties == ["energy", "forces", "stress", "config_type", "weight"]
    record = DatasetDirectory(out).read(3)
    assert record.energy == frames[3].info["REF_energy"] and record.weight == 2.0
    assert record.config_type == frames[3].info["config_type"]

    exported = tmp_path / "exported.extxyz"
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(exported), "--format", "extxyz"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 5 structures to {exported}"
    again = ase.io.read(exported, ":")
    assert [a.get_potential_energy() for a in again] == [a.info["REF_energy"] for a in frames]
    assert [a.info["config_type"] for a in again] == [a.info["config_type"] for a in frames]
    assert main(["export", str(out), "--out", str(exported)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_split_and_stats(tmp_path, emt_xyz, capsys):
    data = tmp_path / "data"
    assert main(["convert", str(emt_xyz), "--out", str(data), "--quiet"]) == 0
    prefix = tmp_path / "emt"
    assert main(["split", str(data), "--out", str(prefix), "--fractions", "0.5,0.25,0.25", "--seed", "1"]) == 0
    counts = {name: Manifest.load(f"{prefix}_{name}").num_structures for name in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 6, "test": 6}

    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["stats"] = None
    manifest_path.write_text(json.dumps(manifest))
    assert Manifest.load(data).stats is None
    capsys.readouterr()
    assert main(["stats", str(data)]) == 0
    assert "force RMS" in capsys.readouterr().out
    stats = Manifest.load(data).stats
    assert set(stats.element_references) == set(Manifest.load(data).elements)
    all_forces = np.concatenate([a.get_forces() for a in ase.io.read(emt_xyz, ":")])
    assert stats.force_rms == pytest.approx(np.sqrt(np.mean(all_forces**2)), rel=1e-12)


def test_emt_command_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "emt"
    assert main(["emt", "--out", str(out), "--num", "12", "--seed", "0", "--shards", "2"]) == 0
    assert Manifest.load(out).num_structures == 12
    assert main(["emt", "--out", str(out), "--num", "12", "--seed", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["emt", "--out", str(out), "--num", "8", "--seed", "0", "--overwrite"]) == 0
    assert Manifest.load(out).num_structures == 8


def test_a_reader_that_stops_reading_ends_the_output_without_a_traceback(tmp_path, emt_xyz):
    """`esen-data inspect DIR | head -1`: head exits, and the next line written finds no reader."""
    out = tmp_path / "data"
    assert main(["convert", str(emt_xyz), "--out", str(out), "--quiet"]) == 0
    read_end, write_end = os.pipe()
    os.close(read_end)
    esen_data = "import sys; from esen_train.cli.data import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", esen_data, "inspect", str(out)], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")
