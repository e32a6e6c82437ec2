"""fairchem's own eSEN models as test fixtures, and fairchem's calculator as a judge.

Runs in fairchem-core's own virtualenv (esen_train is not importable there), the one
benchmarks/model_vs_fairchem.py creates:

    python -m venv .venvs/fairchem
    .venvs/fairchem/bin/pip install torch==2.13.0      # the CPU wheel; an unpinned torch is CUDA
    .venvs/fairchem/bin/pip install fairchem-core==2.24.0

    .venvs/fairchem/bin/python tools/fairchem_fixtures.py make --out tests/fixtures/fairchem
    .venvs/fairchem/bin/python tools/fairchem_fixtures.py evaluate CHECKPOINT... --structures S.json --out R.json

`make` builds fairchem's eSEN models with random weights for several settings, saves each
in the checkpoint format fairchem itself writes, and records the energies, forces and
stresses fairchem computes with them, in float64 and float32, for a set of structures
(molecules, an OMol-style molecule at several charge/spin values, periodic cells). No edge of
any structure is within 1e-4 of the y axis: fairchem clamps its rotation gradients there.
- eSCNMD models (fairchem-core 2.x, the OMol25 eSEN models' backbone): built from a model
  config by hydra as fairchem's loader builds them, saved as its MLIPInferenceCheckpoint
  with omegaconf configs (as released files are), and evaluated by fairchem's own
  MLIPPredictUnit and FAIRChemCalculator, normalisers and element references included.
- eSEN v1 (fairchem-core 1.10 / 2.0, eSEN-30M-OAM's code): fairchem-core 2.0.0's
  `fairchem/core/models/esen/` (the same files as 1.10) is fetched with `pip download` into a
  temporary directory (or read from --v1-wheel) and run in this environment; the checkpoint is
  the dict fairchem 1.x's trainer saves (state_dict under DDP's "module." prefix, normalizers,
  elementrefs, torch_ema's state). Predictions are the model's outputs denormalised as 1.x's
  trainer does: value * rmsd + mean, plus the element references of the atoms.

`evaluate` loads 2.x checkpoints (e.g. ones `esen-train export-fairchem` wrote) with
fairchem's calculator and writes their predictions for the structures of a JSON file,
{checkpoint file name: [prediction per structure]} (tests/fairchem/test_fairchem_export.py compares
them with ours).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import ase.build
import numpy as np
import torch
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list
from omegaconf import OmegaConf

MAX_NUM_ELEMENTS = 80  # element rows 0..79: the structures below and the built-in EMT data (Pt: 78)
Y_AXIS_MARGIN = 1e-4  # no edge direction closer than this to +-y (|cos| < 1 - margin)
V1_SOURCE = "fairchem-core==2.0.0"


# ----- structures ----------------------------------------------------------------------------
def structures() -> list[dict]:
    """The structures every model is evaluated on: [{"name", "atoms", "charge", "spin"}]."""
    def rattled(atoms: Atoms, seed: int, amount: float = 0.08) -> Atoms:
        # Turned about a generic axis first: no lattice vector of a cubic cell stays along y.
        atoms.rotate(23.0 + 11 * seed, (0.3, 0.5, 0.8), rotate_cell=True)
        atoms.rattle(amount, seed=seed)
        return atoms

    alloy = ase.build.bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    alloy.numbers[1] = 28
    alloy.set_cell(alloy.cell.array + np.array([[0.0, 0.1, 0.2], [0.3, 0.0, -0.1], [0.1, -0.2, 0.0]]), scale_atoms=True)
    salt = ase.build.bulk("NaCl", "rocksalt", a=5.4)
    slab = ase.build.bulk("Al", "fcc", a=4.0, cubic=True)
    slab.numbers[1] = 14
    slab.pbc = (True, True, False)
    ethanol = ase.build.molecule("CH3CH2OH")
    water = ase.build.molecule("H2O")
    formaldehyde = rattled(ase.build.molecule("H2CO"), 11)
    return [
        {"name": "ethanol", "atoms": rattled(ethanol, 1), "charge": 0, "spin": 1},
        {"name": "water", "atoms": rattled(water, 2), "charge": 0, "spin": 1},
        # OMol-style: one geometry at three total charges and spin multiplicities.
        {"name": "formaldehyde", "atoms": formaldehyde, "charge": 0, "spin": 1},
        {"name": "formaldehyde_cation", "atoms": formaldehyde.copy(), "charge": 1, "spin": 2},
        {"name": "formaldehyde_anion", "atoms": formaldehyde.copy(), "charge": -1, "spin": 2},
        {"name": "cuni_triclinic", "atoms": rattled(alloy, 3), "charge": 0, "spin": 0},
        {"name": "nacl", "atoms": rattled(salt, 4), "charge": 0, "spin": 0},
        {"name": "alsi_slab", "atoms": rattled(slab, 5), "charge": 0, "spin": 0},
    ]


def edges(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within the cutoff: edge_index [2, E] (row 0 the neighbour j, row 1 the centre
    i) and integer image shifts S [E, 3], r_ij = pos[j] - pos[i] + S @ cell."""
    i, j, shifts = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.array, atoms.positions, cutoff)
    return np.stack([j, i]), shifts.astype(np.float64)


def check_no_edge_along_y(atoms: Atoms, cutoff: float, name: str) -> None:
    index, shifts = edges(atoms, cutoff)
    vectors = atoms.positions[index[0]] - atoms.positions[index[1]] + shifts @ atoms.cell.array
    cosines = np.abs(vectors[:, 1]) / np.linalg.norm(vectors, axis=1)
    if len(cosines) and cosines.max() > 1 - Y_AXIS_MARGIN:
        raise SystemExit(f"{name}: an edge is within {Y_AXIS_MARGIN} of the y axis; move it")


def structure_record(entry: dict) -> dict:
    atoms = entry["atoms"]
    return {
        "name": entry["name"],
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
        "charge": entry["charge"],
        "spin": entry["spin"],
    }


def atoms_of(record: dict) -> Atoms:
    atoms = Atoms(record["numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"])
    atoms.info.update(charge=int(record["charge"]), spin=int(record["spin"]))
    return atoms


# ----- random weights ------------------------------------------------------------------------
def randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every floating parameter gets noise, so no weight keeps a trivial value (norm scales 1,
    biases 0) that would hide a wrong mapping; fixed buffers stay as they are."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.is_floating_point():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


# ----- eSCNMD (fairchem-core 2.x) ------------------------------------------------------------
ESCNMD_CASES = {
    # The OMol25 eSEN models' layout: conservative energy/forces head, charge and spin inputs,
    # OMol's task names and element references (float64, of the size of isolated-atom energies).
    "escnmd_omol_conserving": dict(
        backbone=dict(lmax=2, mmax=2, ff_type="spectral", chg_spin_emb_type="pos_emb", cutoff=4.5),
        heads={"energyandforcehead": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head", "prefix": "omol"}},
        pass_through=True, dataset="omol", task_prefix="omol_",
        energy=dict(mean=0.0, rmsd=1.7), forces=dict(mean=0.0, rmsd=1.7), stress=None,
        references=True, omegaconf=True, ema=True, structures=["ethanol", "water", "formaldehyde", "formaldehyde_cation", "formaldehyde_anion"],
    ),
    # Periodic cells, grid feed-forward, table charge/spin embedding, an energy mean and
    # separate force and stress normalisers.
    "escnmd_periodic_grid": dict(
        backbone=dict(lmax=2, mmax=1, ff_type="grid", chg_spin_emb_type="rand_emb", cutoff=4.0),
        heads={"efs": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head"}},
        pass_through=True, dataset="omat", task_prefix="",
        energy=dict(mean=-0.75, rmsd=2.3), forces=dict(mean=0.0, rmsd=0.9), stress=dict(mean=0.0, rmsd=3.1),
        references=True, omegaconf=False, ema=False, structures=["cuni_triclinic", "nacl", "alsi_slab", "water"],
    ),
    # Direct forces and direct stress heads.
    "escnmd_direct": dict(
        backbone=dict(lmax=2, mmax=2, ff_type="grid", chg_spin_emb_type="pos_emb", cutoff=4.0,
                      direct_forces=True, direct_stress=True, num_layers=1),
        heads={"energy": {"module": "fairchem.core.models.uma.escn_md.MLP_Energy_Head"},
               "forces": {"module": "fairchem.core.models.uma.escn_md.Linear_Force_Head"},
               "stress": {"module": "fairchem.core.models.uma.escn_md.MLP_Stress_Head"}},
        pass_through=False, dataset="omat", task_prefix="",
        energy=dict(mean=0.0, rmsd=1.3), forces=dict(mean=0.0, rmsd=0.7), stress=dict(mean=0.0, rmsd=2.2),
        references=False, omegaconf=False, ema=False, structures=["cuni_triclinic", "nacl", "ethanol"],
    ),
}
# Tiny, and every width different, so that a weight mapped along the wrong axis cannot fit.
TINY = dict(max_num_elements=MAX_NUM_ELEMENTS, sphere_channels=6, hidden_channels=4, edge_channels=5,
            num_layers=2, num_distance_basis=7)


def escnmd_model_config(case: dict) -> dict:
    backbone = dict(model="fairchem.core.models.uma.escn_md.eSCNMDBackbone", **TINY,
                    otf_graph=True, regress_forces=True, regress_stress=not case["backbone"].get("direct_forces"),
                    use_dataset_embedding=False, norm_type="rms_norm_sh", act_type="gate", direct_forces=False)
    backbone.update(case["backbone"])
    return {"_target_": "fairchem.core.models.base.HydraModel", "backbone": backbone, "heads": case["heads"],
            "pass_through_head_outputs": case["pass_through"], "otf_graph": True}


def task(case: dict, prop: str, level: str, dim: list[int], normaliser: dict, references: list | None) -> dict:
    name = f"{case['task_prefix']}{prop}"
    config = {
        "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
        "name": name, "level": level, "property": prop,
        "out_spec": {"_target_": "fairchem.core.units.mlip_unit.mlip_unit.OutputSpec", "dim": dim, "dtype": "float32"},
        "normalizer": {"_target_": "fairchem.core.modules.normalization.normalizer.Normalizer", **normaliser},
        "datasets": [case["dataset"]],
        "loss_fn": {"_target_": "fairchem.core.modules.loss.DDPMTLoss",
                    "loss_fn": {"_target_": "fairchem.core.modules.loss.MAELoss"}, "coefficient": 1},
        "metrics": ["mae"],
    }
    if references is not None:
        config["element_references"] = {
            "_target_": "fairchem.core.modules.normalization.element_references.ElementReferences",
            "element_references": {"_target_": "torch.DoubleTensor", "_args_": [references]},
        }
    return config


def escnmd_tasks(case: dict, seed: int) -> list[dict]:
    references = None
    if case["references"]:
        rng = np.random.default_rng(seed)
        references = [0.0] + (-rng.uniform(10.0, 1500.0, MAX_NUM_ELEMENTS - 1)).tolist()
    tasks = [task(case, "energy", "system", [1], case["energy"], references),
             task(case, "forces", "atom", [3], case["forces"], None)]
    if case["stress"] is not None:
        tasks.append(task(case, "stress", "system", [1, 9], case["stress"], None))
    return tasks


def make_escnmd(name: str, case: dict, seed: int, out: Path) -> Path:
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    model_config = escnmd_model_config(case)
    torch.manual_seed(seed)
    model = hydra.utils.instantiate(copy.deepcopy(model_config))
    randomise(model, seed)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    if case["ema"]:
        randomise(averaged.module, seed + 1, scale=0.02)  # the EMA differs from the raw weights
        ema_state = averaged.state_dict()
    else:  # the same tensors: stored once in the file
        ema_state = {f"module.{key}": value for key, value in model.state_dict().items()}
        ema_state["n_averaged"] = averaged.state_dict()["n_averaged"]
    tasks = escnmd_tasks(case, seed)
    # Released files hold omegaconf containers; fairchem reads plain dicts alike (and the
    # smaller files keep the fixtures small).
    checkpoint = MLIPInferenceCheckpoint(
        model_config=OmegaConf.create(model_config) if case["omegaconf"] else model_config,
        model_state_dict=model.state_dict(),
        ema_state_dict=ema_state,
        tasks_config=OmegaConf.create(tasks) if case["omegaconf"] else tasks,
    )
    path = out / f"{name}.pt"
    torch.save(checkpoint, path)
    return path


def fairchem_calculator(path: Path, dtype: torch.dtype, dataset: str | None = None):
    from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
    from fairchem.core.units.mlip_unit import load_predict_unit
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    settings = InferenceSettings(base_precision_dtype=dtype, activation_checkpointing=False, tf32=False)
    unit = load_predict_unit(path, inference_settings=settings, device="cpu")
    return FAIRChemCalculator(unit, task_name=dataset)


def predict_with_calculator(calculator, record: dict) -> dict:
    atoms = atoms_of(record)
    atoms.calc = calculator
    result = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces().tolist()}
    if all(record["pbc"]):
        result["stress"] = atoms.get_stress(voigt=False).tolist()
    return result


# ----- eSEN v1 (fairchem-core 1.10 / 2.0) ----------------------------------------------------
V1_CASES = {
    # eSEN-30M-OAM's layout: conservative energy/forces/stress head, envelope on, grid feed-forward.
    "esen_v1_conserving": dict(
        backbone=dict(lmax=2, mmax=2, mlp_type="grid", use_envelope=True, cutoff=4.0, act_type="gate",
                      direct_forces=False, regress_stress=True),
        heads={"omat": {"module": "esen_mlp_efs_head"}},
        normalizers={"energy": (0.4, 1.9), "forces": (0.0, 1.9), "stress": (0.0, 2.7)},
        references=True, ema=True,
        structures=["cuni_triclinic", "nacl", "alsi_slab", "ethanol"],
    ),
    # Direct heads, no envelope (v1 makes it optional), spectral feed-forward, mmax < lmax.
    "esen_v1_direct_no_envelope": dict(
        backbone=dict(lmax=2, mmax=1, mlp_type="spectral", use_envelope=False, cutoff=4.0, act_type="gate",
                      direct_forces=True, regress_stress=False, num_layers=1),
        heads={"energy": {"module": "esen_mlp_energy_head"}, "forces": {"module": "esen_linear_force_head"}},
        normalizers={"energy": (0.0, 1.4), "forces": (0.0, 0.8)},
        references=False, ema=False,
        structures=["water", "ethanol", "cuni_triclinic"],
    ),
}


def import_v1_esen(wheel: Path | None, workdir: Path):
    """fairchem 2.0.0's models/esen package, imported here as `esen_v1`."""
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", V1_SOURCE, "-d", workdir], check=True)
        wheel = next(workdir.glob("fairchem_core-2.0.0-*.whl"))
    package = workdir / "esen_v1"
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith("fairchem/core/models/esen/") and not member.endswith("/"):
                target = package / member.removeprefix("fairchem/core/models/esen/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    # v1 imports a mixin that fairchem 2.24 no longer has; it is only used for on-the-fly
    # graphs, which these fixtures do not use (otf_graph=False, edges given).
    import fairchem.core.models.base as base

    base.GraphModelMixin = getattr(base, "GraphModelMixin", type("GraphModelMixin", (), {}))
    sys.path.insert(0, str(workdir))
    return importlib.import_module("esen_v1.esen")


class V1Hydra(torch.nn.Module):
    """fairchem 1.x's HydraModel layout: `backbone` and `output_heads.<name>`."""

    def __init__(self, esen, backbone_config: dict, heads: dict) -> None:
        super().__init__()
        self.backbone = esen.eSEN_Backbone(**backbone_config)
        modules = {"esen_mlp_efs_head": esen.MLP_EFS_Head, "esen_mlp_energy_head": esen.MLP_Energy_Head,
                   "esen_linear_force_head": esen.Linear_Force_Head}
        self.output_heads = torch.nn.ModuleDict({name: modules[spec["module"]](self.backbone)
                                                 for name, spec in sorted(heads.items())})

    def forward(self, data: dict) -> dict:
        embedding = self.backbone(data)
        out = {}
        for head in self.output_heads.values():
            out.update(head(data, embedding))
        return out


def v1_data(record: dict, cutoff: float, dtype: torch.dtype) -> dict:
    atoms = atoms_of(record)
    edge_index, shifts = edges(atoms, cutoff)
    numbers = torch.tensor(atoms.numbers, dtype=torch.long)
    batch = torch.zeros(len(atoms), dtype=torch.long)
    return {
        "pos": torch.tensor(atoms.positions, dtype=dtype),
        "cell": torch.tensor(atoms.cell.array, dtype=dtype).unsqueeze(0),
        "atomic_numbers": numbers, "atomic_numbers_full": numbers,
        "batch": batch, "batch_full": batch,
        "natoms": torch.tensor([len(atoms)]),
        "edge_index": torch.tensor(edge_index, dtype=torch.long),
        "cell_offsets": torch.tensor(shifts, dtype=dtype),
        "nedges": torch.tensor([edge_index.shape[1]]),
    }


def make_v1(esen, name: str, case: dict, seed: int, out: Path) -> tuple[Path, V1Hydra, dict, dict]:
    backbone_config = {**TINY, "otf_graph": False, "regress_forces": True, "norm_type": "rms_norm_sh", **case["backbone"]}
    torch.manual_seed(seed)
    # Built in float64, as fairchem 2.x's predictor builds a float64 model: its constants
    # (Gaussian centres, grid matrices) are then exact, not float32 values widened. The
    # weights are float32 values, saved as float32 like a trained checkpoint's.
    torch.set_default_dtype(torch.float64)
    try:
        model = V1Hydra(esen, backbone_config, case["heads"])
    finally:
        torch.set_default_dtype(torch.float32)
    randomise(model, seed)
    _round_parameters_to_float32(model)
    normalizers = {key: {"mean": torch.tensor(mean), "rmsd": torch.tensor(rmsd)}
                   for key, (mean, rmsd) in case["normalizers"].items()}
    elementrefs = {}
    if case["references"]:
        rng = np.random.default_rng(seed)
        refs = torch.zeros(119)  # LinearReferences' default size: Z up to 118
        refs[1:MAX_NUM_ELEMENTS] = torch.tensor(-rng.uniform(1.0, 12.0, MAX_NUM_ELEMENTS - 1), dtype=torch.float32)
        elementrefs = {"energy": {"element_references": refs}}
    parameters = {name for name, _ in model.named_parameters()}
    checkpoint = {
        "state_dict": {f"module.{key}": value.float() if key in parameters else value
                       for key, value in model.state_dict().items()},
        "normalizers": normalizers,
        "elementrefs": elementrefs,
        "config": {"trainer": "mlip_trainer",
                   "model": {"name": "hydra", "backbone": {"model": "esen_backbone", **backbone_config},
                             "heads": case["heads"], "pass_through_head_outputs": True, "otf_graph": True},
                   "optim": {"ema_decay": 0.999}},
        "val_metrics": {"energy_mae": {"metric": 0.0123, "total": 1.23, "numel": 100}},
        "amp": None,
        "epoch": 1.0,
        "step": 1000,
    }
    ema_model = None
    if case["ema"]:
        ema_model = copy.deepcopy(model)
        randomise(ema_model, seed + 1, scale=0.02)
        _round_parameters_to_float32(ema_model)
        checkpoint["ema"] = {"decay": 0.999, "num_updates": 1000,
                             "shadow_params": [p.detach().float() for p in ema_model.parameters()],
                             "collected_params": None}
    path = out / f"{name}.pt"
    torch.save(checkpoint, path)
    return path, ema_model or model, normalizers, elementrefs


def _round_parameters_to_float32(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.float())


def predict_v1(model: V1Hydra, normalizers: dict, elementrefs: dict, record: dict, cutoff: float, dtype) -> dict:
    model = copy.deepcopy(model).to(dtype)
    data = v1_data(record, cutoff, dtype)
    out = model(data)

    def denorm(key: str, value: torch.Tensor) -> torch.Tensor:
        if key in normalizers:
            value = value * normalizers[key]["rmsd"] + normalizers[key]["mean"]
        return value

    energy = denorm("energy", out["energy"].detach())
    if "energy" in elementrefs:  # 1.x's LinearReferences: summed in the prediction's dtype
        refs = elementrefs["energy"]["element_references"][data["atomic_numbers"]].to(energy.dtype)
        energy = energy.index_add(0, data["batch"], refs)
    result = {"energy": float(energy[0]), "forces": denorm("forces", out["forces"].detach()).double().tolist()}
    if all(record["pbc"]) and "stress" in out:
        result["stress"] = denorm("stress", out["stress"].detach()).view(3, 3).double().tolist()
    return result


# ----- commands ------------------------------------------------------------------------------
def make(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    entries = structures()
    for entry in entries:
        check_no_edge_along_y(entry["atoms"], 5.0, entry["name"])
    records = {entry["name"]: structure_record(entry) for entry in entries}
    manifest = {"fairchem_core": importlib.metadata.version("fairchem-core"), "torch": torch.__version__,
                "structures": list(records.values()), "cases": {}}
    for seed, (name, case) in enumerate(ESCNMD_CASES.items()):
        path = make_escnmd(name, case, seed, out)
        references = {}
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            calculator = fairchem_calculator(path, dtype, case["dataset"])
            references[label] = [predict_with_calculator(calculator, records[s]) for s in case["structures"]]
        manifest["cases"][name] = {"file": path.name, "format": "fairchem-core 2.x MLIPInferenceCheckpoint",
                                   "structures": case["structures"], **references}
        print(f"{name}: {path.stat().st_size / 1024:.0f} KiB", file=sys.stderr)
    with tempfile.TemporaryDirectory() as workdir:
        esen = import_v1_esen(args.v1_wheel, Path(workdir))
        for seed, (name, case) in enumerate(V1_CASES.items(), start=len(ESCNMD_CASES)):
            path, model, normalizers, elementrefs = make_v1(esen, name, case, seed, out)
            cutoff = case["backbone"]["cutoff"]
            references = {label: [predict_v1(model, normalizers, elementrefs, records[s], cutoff, dtype)
                                  for s in case["structures"]]
                          for label, dtype in (("float64", torch.float64), ("float32", torch.float32))}
            manifest["cases"][name] = {"file": path.name, "format": f"fairchem-core 1.x trainer checkpoint ({V1_SOURCE} eSEN code)",
                                       "structures": case["structures"], **references}
            print(f"{name}: {path.stat().st_size / 1024:.0f} KiB", file=sys.stderr)
    (out / "references.json").write_text(json.dumps(manifest) + "\n")


def evaluate(args: argparse.Namespace) -> None:
    records = json.loads(args.structures.read_text())
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    predictions = {}
    for checkpoint in args.checkpoints:
        calculator = fairchem_calculator(checkpoint, dtype, args.task)
        predictions[checkpoint.name] = [predict_with_calculator(calculator, record) for record in records]
    args.out.write_text(json.dumps(predictions) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="fairchem checkpoints and their predictions")
    make_parser.add_argument("--out", type=Path, required=True)
    make_parser.add_argument("--v1-wheel", type=Path, help=f"a {V1_SOURCE} wheel already downloaded")
    make_parser.set_defaults(run=make)
    evaluate_parser = commands.add_parser("evaluate", help="fairchem's calculator on a 2.x checkpoint")
    evaluate_parser.add_argument("checkpoints", type=Path, nargs="+")
    evaluate_parser.add_argument("--structures", type=Path, required=True, help="JSON list of structure records")
    evaluate_parser.add_argument("--task", help="dataset name of the checkpoint's tasks (default: its only one)")
    evaluate_parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    evaluate_parser.add_argument("--out", type=Path, required=True)
    evaluate_parser.set_defaults(run=evaluate)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
