"""`esen-train export-fairchem`: a checkpoint of this project as a fairchem-core 2.x checkpoint.

    exported = export_fairchem("runs/my-run", dataset="omat")   # -> InferenceCheckpoint
    write_inference_checkpoint(exported, Path("my-model.pt"))

The file is what fairchem's own training writes for an eSCNMD model: an MLIPInferenceCheckpoint
with a HydraModel config (eSCNMDBackbone; MLP_EFS_Head for a conservative model, MLP_Energy_Head
+ Linear_Force_Head + MLP_Stress_Head for a direct one), model and EMA weights, and tasks
(energy, forces, stress of one dataset) holding this model's normalisation and reference
energies. fairchem's `load_predict_unit` / FAIRChemCalculator load it and predict what this
model predicts (tests/fairchem/test_fairchem_export.py checks it where fairchem's environment exists).

Exact or refused: eSCNMD always applies the envelope, with fixed exponent 5, Gaussian width 2
and edge-degree rescale 5, and always has a charge/spin embedding (of even width), and its
direct stress head does not weight atoms by their neighbours, so a model with other values, an
odd sphere_channels or a neighbour-weighted direct stress head is refused by name. A model
without charge/spin inputs gets that embedding with a zero mixing layer, which adds exactly
zero. fairchem keeps at most `max_neighbors` neighbours per atom (fairchem's default 300, or
the imported model's own); this model uses all of them, so predictions agree unless an atom has
more.
"""
from __future__ import annotations

from pathlib import Path

import torch

from esen_train.fairchem.files import FairchemFormatError, InferenceCheckpoint
from esen_train.model.model_file import MODEL_FILE, checkpoint_model_config, read_model_file, resolve_checkpoint
from esen_train.fairchem.weights import (
    Layout,
    backbone_weights,
    energy_head_weights,
    force_head_weights,
    stress_head_weights,
    to_theirs,
    wigner_constant,
)
from esen_train.model import ESEN
from esen_train.model.config import ModelConfig

ESCNMD = "fairchem.core.models.uma.escn_md"
NORMALIZER = "fairchem.core.modules.normalization.normalizer.Normalizer"
ELEMENT_REFERENCES = "fairchem.core.modules.normalization.element_references.ElementReferences"
DEFAULT_DATASET = "esen_train"
DEFAULT_MAX_NEIGHBORS = 300  # fairchem's own default
# What eSCNMD fixes and this model makes a setting.
FIXED_IN_FAIRCHEM = {"envelope": True, "envelope_exponent": 5, "gaussian_width": 2.0, "edge_degree_rescale": 5.0}


def export_fairchem(checkpoint: str | Path, dataset: str | None = None, max_neighbors: int | None = None) -> InferenceCheckpoint:
    model_file = resolve_checkpoint(checkpoint) / MODEL_FILE
    payload = read_model_file(model_file)
    config = checkpoint_model_config(model_file)
    for name, value in FIXED_IN_FAIRCHEM.items():
        if getattr(config, name) != value:
            raise FairchemFormatError(
                f"{model_file}: {name} = {getattr(config, name)!r}; fairchem's eSCNMD fixes it at {value!r}, so this model "
                "cannot be exported exactly; refused"
            )
    if config.direct_forces and config.direct_stress_neighbour_weight:
        raise FairchemFormatError(
            f"{model_file}: direct_stress_neighbour_weight = True: fairchem's MLP_Stress_Head does not weight atoms "
            "by their neighbours, so this direct model cannot be exported exactly; refused (export a conservative "
            "checkpoint)"
        )
    if config.sphere_channels % 2:
        raise FairchemFormatError(
            f"{model_file}: sphere_channels = {config.sphere_channels}; eSCNMD's charge/spin embedding needs an even "
            "width (it always has one); refused"
        )
    provenance = payload.get("imported_from") or {}
    dataset = dataset or next(iter(provenance.get("datasets") or []), DEFAULT_DATASET)
    max_neighbors = max_neighbors or (provenance.get("fairchem_backbone") or {}).get("max_neighbors", DEFAULT_MAX_NEIGHBORS)
    model = _model(config, payload["model"])
    ema = _model(config, payload["ema"]) if payload["ema"] is not None else model
    direct = config.direct_forces
    heads = _heads(direct)
    return InferenceCheckpoint(
        model_config={
            "_target_": "fairchem.core.models.base.HydraModel",
            "backbone": _backbone(config, max_neighbors),
            "heads": {name: {"module": module} for name, module in heads.items()},
            "pass_through_head_outputs": not direct,
            "otf_graph": True,
        },
        model_state_dict=_state(model, heads),
        ema_state_dict={**{f"module.{k}": v for k, v in _state(ema, heads).items()},
                        "n_averaged": torch.tensor(1, dtype=torch.long)},
        tasks_config=_tasks(model, dataset),
    )


def _model(config: ModelConfig, weights: dict) -> ESEN:
    model = ESEN(config)
    model.load_state_dict(weights, strict=True)
    return model


def _heads(direct: bool) -> dict[str, str]:
    if direct:  # one head per task, named as the task (pass_through_head_outputs off)
        return {"energy": f"{ESCNMD}.MLP_Energy_Head", "forces": f"{ESCNMD}.Linear_Force_Head",
                "stress": f"{ESCNMD}.MLP_Stress_Head"}
    return {"efs": f"{ESCNMD}.MLP_EFS_Head"}


def _charge_spin_kind(config: ModelConfig) -> str:
    return "rand_emb" if config.charge_spin == "table" else "pos_emb"


def _backbone(config: ModelConfig, max_neighbors: int) -> dict:
    return {
        "model": f"{ESCNMD}.eSCNMDBackbone",
        "max_num_elements": config.max_num_elements + 1,  # fairchem's rows start at Z = 0
        "sphere_channels": config.sphere_channels,
        "hidden_channels": config.hidden_channels,
        "edge_channels": config.edge_channels,
        "lmax": config.lmax,
        "mmax": config.mmax,
        "num_layers": config.num_layers,
        "num_distance_basis": config.num_radial_basis,
        "cutoff": config.cutoff,
        "grid_resolution": config.grid_resolution or None,
        "distance_function": "gaussian",
        "norm_type": "rms_norm_sh",
        "act_type": "gate",
        "ff_type": config.feed_forward,
        "chg_spin_emb_type": _charge_spin_kind(config),
        "use_dataset_embedding": False,
        "direct_forces": config.direct_forces,
        "direct_stress": config.direct_forces,
        "regress_forces": True,
        "regress_stress": not config.direct_forces,
        "otf_graph": True,
        "max_neighbors": int(max_neighbors),
    }


def _state(model: ESEN, heads: dict[str, str]) -> dict[str, torch.Tensor]:
    """fairchem's state dict of this model (HydraModel names)."""
    config = model.config
    ours = model.state_dict()
    head_of = {module.rsplit(".", 1)[-1]: name for name, module in heads.items()}
    energy_head = head_of.get("MLP_EFS_Head") or head_of["MLP_Energy_Head"]
    weights = backbone_weights(config) + energy_head_weights(energy_head)
    if config.direct_forces:
        weights += force_head_weights(head_of["Linear_Force_Head"]) + stress_head_weights(head_of["MLP_Stress_Head"])
    state = {}
    for weight in weights:
        if weight.layout is Layout.UNUSED:
            state[weight.theirs] = torch.zeros(1)  # the l = 0 bias of a one-channel SO3 linear map
        else:
            state[weight.theirs] = to_theirs(ours[weight.ours].detach().clone(), weight.layout)
    if config.charge_spin == "none":
        state.update(_silent_charge_spin(config))
    state.update({f"backbone.Jd_{degree}": wigner_constant(degree) for degree in range(config.lmax + 1)})
    return state


def _silent_charge_spin(config: ModelConfig) -> dict[str, torch.Tensor]:
    """eSCNMD's charge/spin embedding adding exactly zero: SiLU(0 * e + 0) = 0."""
    channels = config.sphere_channels
    tables = {f"backbone.{what}_embedding.W": torch.zeros(channels // 2) for what in ("charge", "spin")}
    return {**tables, "backbone.mix_csd.weight": torch.zeros(channels, 2 * channels),
            "backbone.mix_csd.bias": torch.zeros(channels)}


def _tasks(model: ESEN, dataset: str) -> list[dict]:
    def task(prop: str, level: str, dim: list[int], mean: float, rmsd: float) -> dict:
        return {
            "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
            "name": prop,
            "level": level,
            "property": prop,
            "out_spec": {"_target_": "fairchem.core.units.mlip_unit.mlip_unit.OutputSpec", "dim": dim, "dtype": "float32"},
            "normalizer": {"_target_": NORMALIZER, "mean": float(mean), "rmsd": float(rmsd)},
            "datasets": [dataset],
        }

    energy = task("energy", "system", [1], model.energy_mean, model.energy_scale)
    if bool(model.reference_energies.any()):
        # fairchem sums them in float64, as this model does.
        energy["element_references"] = {
            "_target_": ELEMENT_REFERENCES,
            "element_references": {"_target_": "torch.DoubleTensor", "_args_": [model.reference_energies.tolist()]},
        }
    return [energy, task("forces", "atom", [3], 0.0, model.force_scale),
            task("stress", "system", [1, 9], 0.0, model.stress_scale)]
