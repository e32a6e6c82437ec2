"""What a fairchem eSEN checkpoint holds, in this model's terms: `read_fairchem_model(path)`.

Settings the weights cannot reveal (envelope, activation, feed-forward, cutoff, normalisers,
references, ...) come from the checkpoint's own config; where the config leaves a setting
out, fairchem's default of that version applies (`V1_DEFAULTS`, `ESCNMD_DEFAULTS`: the
defaults of eSEN_Backbone in fairchem-core 1.10/2.0 and of eSCNMDBackbone in 2.x). Anything
this model cannot represent is refused with its name, never approximated: the S2 activation,
other norms or distance bases, a mixture of experts, the dataset embedding, charge/spin
balancing, linear charge/spin embeddings, v1's rank-2 stress head, any head or setting this
reader does not know, normalisers with a force or stress offset, several energy tasks.

Normalisation, as fairchem applies it at inference:
- 1.x trainer: each output denormalised by its own normaliser when the checkpoint has one
  (value * rmsd + mean), element references added to the energy;
- 2.x tasks: the same per task; forces and stress that have no task of their own use the
  energy task's normaliser (fairchem's untrained derivative tasks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from esen_train.fairchem.files import FairchemFormatError, InferenceCheckpoint, plain, read_fairchem_file
from esen_train.fairchem.weights import (
    Weight,
    backbone_weights,
    energy_head_weights,
    force_head_weights,
    is_constant_buffer,
    stress_head_weights,
)
from esen_train.model.config import ModelConfig

# eSEN_Backbone's defaults (fairchem-core 1.10 and 2.0 ship the same models/esen/).
V1_DEFAULTS = dict(max_num_elements=100, sphere_channels=128, lmax=2, mmax=2, grid_resolution=None, cutoff=5.0,
                   edge_channels=128, distance_function="gaussian", num_distance_basis=512, direct_forces=True,
                   num_layers=2, hidden_channels=128, norm_type="rms_norm_sh", act_type="s2", mlp_type="grid",
                   use_envelope=False, max_neighbors=300)
# Graph building, gradients and memory: no effect on what the model computes.
V1_IGNORED = {"model", "otf_graph", "use_pbc", "use_pbc_single", "regress_forces",
              "regress_stress", "activation_checkpointing"}
# eSCNMDBackbone's defaults (fairchem-core 2.x).
ESCNMD_DEFAULTS = dict(max_num_elements=100, sphere_channels=128, lmax=2, mmax=2, grid_resolution=None, cutoff=5.0,
                       edge_channels=128, distance_function="gaussian", num_distance_basis=512, direct_forces=True,
                       direct_stress=False, num_layers=2, hidden_channels=128, norm_type="rms_norm_sh",
                       act_type="gate", ff_type="grid", chg_spin_emb_type="pos_emb", use_dataset_embedding=True,
                       charge_balanced_channels=None, spin_balanced_channels=None, num_experts=0, max_neighbors=300)
ESCNMD_IGNORED = {"model", "num_sphere_samples", "otf_graph", "use_pbc", "use_pbc_single",
                  "regress_forces", "regress_stress", "regress_hessian", "hessian_vmap", "activation_checkpointing",
                  "cs_emb_grad", "dataset_emb_grad", "dataset_list", "dataset_mapping", "use_cuda_graph_wigner",
                  "use_quaternion_wigner", "radius_pbc_version", "always_use_pbc", "edge_chunk_size",
                  "execution_mode",
                  # eSCNMDMoeBackbone's, which change nothing when num_experts is 0 (eSEN):
                  "moe_dropout", "use_global_embedding", "use_composition_embedding", "composition_dropout",
                  "moe_expert_coefficient_norm", "act", "layers_moe", "moe_layer_type", "moe_single", "moe_type",
                  "model_version"}
ESCNMD_BACKBONES = ("fairchem.core.models.uma.escn_md.eSCNMDBackbone", "escnmd_backbone",
                    "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone", "escnmd_moe_backbone")
HYDRA_MODELS = ("fairchem.core.models.base.HydraModel", "fairchem.core.models.base.HydraModelV2")
MODEL_KEYS = {"_target_", "name", "backbone", "heads", "pass_through_head_outputs", "otf_graph", "freeze_backbone",
              "supports_single_atoms", "model_id"}
# Heads by role. v1 registers them by name; 2.x names the class.
V1_HEADS = {"esen_mlp_efs_head": "energy+gradients", "esen_mlp_energy_head": "energy",
            "esen_linear_force_head": "forces"}
ESCNMD_HEADS = {"MLP_EFS_Head": "energy+gradients", "MLP_Energy_Head": "energy", "Linear_Force_Head": "forces",
                "MLP_Stress_Head": "stress"}
HEAD_SETTINGS = {"energy+gradients": {"reduce": "sum"}, "energy": {"reduce": "sum"}, "forces": {}, "stress": {"reduce": "mean"}}
HEAD_NAMING = {"module", "prefix", "wrap_property"}  # where a 2.x head puts its outputs, not what it computes


@dataclass
class Normalisation:
    energy_mean: float = 0.0
    energy_scale: float = 1.0
    force_scale: float = 1.0
    stress_scale: float = 1.0


@dataclass
class FairchemModel:
    """A fairchem checkpoint, read: this model's config and fairchem's weights by fairchem's names."""

    path: Path
    generation: str  # "eSEN v1 (fairchem-core 1.x)" or "eSCNMD (fairchem-core 2.x)"
    config: ModelConfig
    stage: str  # "conservative" (forces by autograd) or "direct" (force head)
    weights: list[Weight]  # every fairchem weight this model takes, with its layout
    state: dict[str, torch.Tensor]  # fairchem's names, no DDP/EMA prefix
    ema: dict[str, torch.Tensor] | None
    normalisation: Normalisation
    references: torch.Tensor | None  # float64, indexed by Z
    settings: dict  # the backbone settings as fairchem read them (defaults filled in)
    datasets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_fairchem_model(path: str | Path) -> FairchemModel:
    path = Path(path)
    raw = read_fairchem_file(path)
    if isinstance(raw, InferenceCheckpoint):
        return _from_escnmd(raw, path)
    if isinstance(raw, dict) and "state_dict" in raw and "config" in raw:
        return _from_v1(raw, path)
    found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise FairchemFormatError(
        f"{path}: neither a fairchem-core 2.x MLIPInferenceCheckpoint nor a 1.x trainer checkpoint "
        f"(a dict with 'state_dict' and 'config'); found {found}"
    )


# ----- fairchem-core 1.x: eSEN v1 --------------------------------------------------------------
def _from_v1(raw: dict, path: Path) -> FairchemModel:
    model = _model_section(raw["config"].get("model") if isinstance(raw["config"], dict) else None, path, "config.model")
    if model.get("name") != "hydra":
        raise FairchemFormatError(f"{path}: config.model.name is {model.get('name')!r}; eSEN checkpoints are 'hydra' models")
    backbone = dict(model["backbone"])
    if backbone.get("model") != "esen_backbone":
        raise FairchemFormatError(
            f"{path}: config.model.backbone.model is {backbone.get('model')!r}; only eSEN v1's 'esen_backbone' is read "
            "(DeNS or other backbones are refused)"
        )
    settings = _with_defaults(backbone, V1_DEFAULTS, V1_IGNORED, path, "config.model.backbone")
    _refuse_unsupported(settings, path, "config.model.backbone")
    roles = _heads(model["heads"], path, "config.model.heads", lambda module: V1_HEADS.get(str(module)))
    stage = _stage(roles, settings, path, check_backbone=False)
    config = _model_config(settings, ff_key="mlp_type", envelope=bool(settings["use_envelope"]), charge_spin="none",
                           direct=stage == "direct")
    state = _without_prefix(raw["state_dict"], "module.")
    weights = _all_weights(config, roles)
    ema = _v1_ema(raw.get("ema"), state, path)
    normalisation, references = _v1_normalisation(raw, path)
    notes = _neighbour_cap_note(settings)
    if "denoising_pos_target" in (raw.get("normalizers") or {}):
        notes.append("normaliser 'denoising_pos_target' is DeNS training's, not used for predictions: not imported")
    return FairchemModel(path, "eSEN v1 (fairchem-core 1.x)", config, stage, weights, state, ema, normalisation,
                         references, settings, notes=notes)


def _v1_ema(ema: dict | None, state: dict, path: Path) -> dict | None:
    """torch_ema's shadow parameters, in the model's parameter order, by name."""
    if ema is None:
        return None
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, list):
        raise FairchemFormatError(f"{path}: field 'ema' is not torch_ema's state (no list 'shadow_params')")
    # state_dict order is parameter order with the buffers in between.
    parameters = [name for name in state if not is_constant_buffer(name)]
    if len(shadow) != len(parameters):
        raise FairchemFormatError(f"{path}: 'ema' has {len(shadow)} shadow parameters for {len(parameters)} parameters")
    for name, value in zip(parameters, shadow):
        if value.shape != state[name].shape:
            raise FairchemFormatError(
                f"{path}: 'ema' shadow parameter for {name} has shape {tuple(value.shape)}, the weight {tuple(state[name].shape)}"
            )
    return {**state, **dict(zip(parameters, shadow))}


def _v1_normalisation(raw: dict, path: Path) -> tuple[Normalisation, torch.Tensor | None]:
    normalizers = raw.get("normalizers") or {}
    unknown = sorted(set(normalizers) - {"energy", "forces", "stress", "denoising_pos_target"})
    if unknown:
        raise FairchemFormatError(f"{path}: normalizers for {unknown}: this model predicts energy, forces and stress only")
    means, scales = {}, {}
    for target in ("energy", "forces", "stress"):
        state = normalizers.get(target)
        if state is None:  # 1.x leaves an output without a normaliser as it is
            means[target], scales[target] = 0.0, 1.0
            continue
        rmsd = state.get("rmsd", state.get("std"))  # "std": fairchem's legacy name
        if "mean" not in state or rmsd is None:
            raise FairchemFormatError(f"{path}: normalizers.{target} has no 'mean' and 'rmsd' (found {sorted(state)})")
        means[target], scales[target] = float(state["mean"]), float(rmsd)
    normalisation = _normalisation(means, scales, path, "normalizers")
    refs = raw.get("elementrefs") or {}
    unknown = sorted(set(refs) - {"energy"})
    if unknown:
        raise FairchemFormatError(f"{path}: elementrefs for {unknown}: only energy references are used")
    references = None
    if "energy" in refs:
        values = refs["energy"].get("element_references") if isinstance(refs["energy"], dict) else None
        if not isinstance(values, torch.Tensor):
            raise FairchemFormatError(f"{path}: elementrefs.energy has no tensor 'element_references'")
        references = values.double()
    return normalisation, references


# ----- fairchem-core 2.x: eSCNMD -----------------------------------------------------------------
def _from_escnmd(raw: InferenceCheckpoint, path: Path) -> FairchemModel:
    model = _model_section(plain(raw.model_config, f"{path}: model_config"), path, "model_config")
    if model.get("_target_") not in HYDRA_MODELS:
        raise FairchemFormatError(f"{path}: model_config._target_ is {model.get('_target_')!r}; expected one of {HYDRA_MODELS}")
    backbone = dict(model["backbone"])
    if backbone.get("model") not in ESCNMD_BACKBONES:
        raise FairchemFormatError(
            f"{path}: model_config.backbone.model is {backbone.get('model')!r}; only the eSCNMD backbone "
            f"({ESCNMD_BACKBONES[0]}) is read"
        )
    settings = _with_defaults(backbone, ESCNMD_DEFAULTS, ESCNMD_IGNORED, path, "model_config.backbone")
    _refuse_unsupported(settings, path, "model_config.backbone")
    roles = _heads(model["heads"], path, "model_config.heads", _escnmd_head_role)
    stage = _stage(roles, settings, path, check_backbone=True)
    charge_spin = {"pos_emb": "sinusoidal", "rand_emb": "table"}[settings["chg_spin_emb_type"]]
    config = _model_config(settings, ff_key="ff_type", envelope=True, charge_spin=charge_spin, direct=stage == "direct")
    state = _without_prefix(raw.model_state_dict, "module.")
    ema = None
    if raw.ema_state_dict is not None:
        ema = _without_prefix({k: v for k, v in raw.ema_state_dict.items() if k != "n_averaged"}, "module.")
    tasks = plain(raw.tasks_config, f"{path}: tasks_config")
    normalisation, references, datasets = _escnmd_tasks(tasks, roles, path)
    return FairchemModel(path, "eSCNMD (fairchem-core 2.x)", config, stage, _all_weights(config, roles), state, ema,
                         normalisation, references, settings, datasets=datasets, notes=_neighbour_cap_note(settings))


def _escnmd_head_role(module: object) -> str | None:
    """The role of a 2.x head class (a dotted path under fairchem's escn_md module)."""
    prefix = "fairchem.core.models.uma.escn_md."
    return ESCNMD_HEADS.get(str(module)[len(prefix):]) if str(module).startswith(prefix) else None


def _escnmd_tasks(tasks: object, roles: dict, path: Path) -> tuple[Normalisation, torch.Tensor | None, list[str]]:
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "property" in t for t in tasks):
        raise FairchemFormatError(f"{path}: tasks_config is not a list of tasks with a 'property'")
    by_property: dict[str, list[dict]] = {}
    for task in tasks:
        by_property.setdefault(task["property"], []).append(task)
    unknown = sorted(set(by_property) - {"energy", "forces", "stress"})
    if unknown:
        raise FairchemFormatError(f"{path}: tasks for {unknown}: this model predicts energy, forces and stress only")
    for prop, found in by_property.items():
        if len(found) > 1:
            names = [t.get("name") for t in found]
            raise FairchemFormatError(
                f"{path}: {len(found)} {prop} tasks ({names}): a model with several outputs per property (several "
                "datasets' heads) is not one eSEN model; refused"
            )
    if "energy" not in by_property:
        raise FairchemFormatError(f"{path}: tasks_config has no energy task")
    energy = by_property["energy"][0]
    means, scales = {}, {}
    for prop in ("energy", "forces", "stress"):
        task = by_property.get(prop, [energy])[0]  # no task of its own: the energy task's normaliser
        means[prop], scales[prop] = _task_normaliser(task, path)
        if prop != "energy" and task is not energy and task.get("element_references") is not None:
            raise FairchemFormatError(f"{path}: task {task.get('name')!r} has element references; only energy may")
    return (_normalisation(means, scales, path, "tasks_config"), _task_references(energy, path),
            list(energy.get("datasets") or []))


def _task_normaliser(task: dict, path: Path) -> tuple[float, float]:
    where = f"{path}: task {task.get('name')!r} normalizer"
    normaliser = task.get("normalizer")
    if normaliser is None:
        return 0.0, 1.0
    if not isinstance(normaliser, dict) or not str(normaliser.get("_target_", "")).endswith("Normalizer"):
        raise FairchemFormatError(f"{where}: expected fairchem's Normalizer config, found {normaliser!r}")
    unknown = sorted(set(normaliser) - {"_target_", "mean", "rmsd"})
    if unknown:
        raise FairchemFormatError(f"{where}: settings {unknown} are not read (only mean and rmsd)")
    return float(normaliser.get("mean", 0.0)), float(normaliser.get("rmsd", 1.0))


def _task_references(task: dict, path: Path) -> torch.Tensor | None:
    where = f"{path}: task {task.get('name')!r} element_references"
    references = task.get("element_references")
    if references is None:
        return None
    if not isinstance(references, dict) or not str(references.get("_target_", "")).endswith("ElementReferences"):
        raise FairchemFormatError(f"{where}: expected fairchem's ElementReferences config, found a {type(references).__name__}")
    values = references.get("element_references")
    if isinstance(values, dict) and values.get("_target_") in ("torch.DoubleTensor", "torch.tensor", "torch.Tensor"):
        args = values.get("_args_") or []
        values = args[0] if len(args) == 1 else None
    if isinstance(values, torch.Tensor):
        return values.double()
    if isinstance(values, list) and all(isinstance(v, (int, float)) for v in values):
        return torch.tensor(values, dtype=torch.float64)
    raise FairchemFormatError(f"{where}: expected a list of per-element energies (torch.DoubleTensor), found {values!r}")


# ----- shared --------------------------------------------------------------------------------------
def _model_section(model: object, path: Path, where: str) -> dict:
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict) or not isinstance(model.get("heads"), dict):
        raise FairchemFormatError(f"{path}: {where} must hold a 'backbone' and 'heads' (a Hydra model)")
    unknown = sorted(set(model) - MODEL_KEYS)
    if unknown:
        raise FairchemFormatError(f"{path}: {where} settings {unknown} are not known to this importer; refused")
    return model


def _with_defaults(backbone: dict, defaults: dict, ignored: set, path: Path, where: str) -> dict:
    unknown = sorted(set(backbone) - set(defaults) - ignored)
    if unknown:
        raise FairchemFormatError(
            f"{path}: {where} settings {unknown} are not known to this importer; refused rather than guessed"
        )
    return {**defaults, **{key: value for key, value in backbone.items() if key in defaults}}


def _refuse_unsupported(settings: dict, path: Path, where: str) -> None:
    """Settings this model cannot represent, by name."""
    problems = {
        "act_type": (settings.get("act_type") != "gate",
                     "the S2 grid activation on edges; this model has the gate activation only"),
        "norm_type": (settings.get("norm_type") != "rms_norm_sh", "this model has the RMS norm over degrees only"),
        "distance_function": (settings.get("distance_function") != "gaussian", "this model has the Gaussian basis only"),
        "num_experts": (bool(settings.get("num_experts")), "a mixture of experts (UMA), not eSEN"),
        "use_dataset_embedding": (bool(settings.get("use_dataset_embedding")), "a per-dataset embedding (UMA), not eSEN"),
        "charge_balanced_channels": (bool(settings.get("charge_balanced_channels")), "charge balancing of channels"),
        "spin_balanced_channels": (bool(settings.get("spin_balanced_channels")), "spin balancing of channels"),
        "chg_spin_emb_type": (settings.get("chg_spin_emb_type", "pos_emb") not in ("pos_emb", "rand_emb"),
                              "only the 'pos_emb' (sinusoidal) and 'rand_emb' (table) embeddings are supported"),
        "mlp_type": (settings.get("mlp_type", "grid") not in ("grid", "spectral"), "feed-forward 'grid' or 'spectral' only"),
        "ff_type": (settings.get("ff_type", "grid") not in ("grid", "spectral"), "feed-forward 'grid' or 'spectral' only"),
    }
    for key, (refused, why) in problems.items():
        if refused:
            raise FairchemFormatError(f"{path}: {where}.{key} = {settings[key]!r}: {why}; refused")


def _heads(heads: dict, path: Path, where: str, role_of) -> dict[str, str]:
    """role ("energy+gradients", "energy", "forces", "stress") -> head name."""
    roles: dict[str, str] = {}
    for name, spec in sorted(heads.items()):
        module = spec.get("module") if isinstance(spec, dict) else None
        role = role_of(module)
        if role is None:
            raise FairchemFormatError(
                f"{path}: {where}.{name}: head {module!r} cannot be represented by this model (it has an energy MLP, "
                "a direct force head and a direct stress head of l=0 and l=2 parts; v1's rank-2 stress head and "
                "dataset-specific heads are refused)"
            )
        expected = HEAD_SETTINGS[role]
        for key, value in spec.items():
            if key in HEAD_NAMING:
                continue
            if key not in expected or value != expected[key]:
                raise FairchemFormatError(f"{path}: {where}.{name}.{key} = {value!r}: not supported (expected {expected or 'none'})")
        if role in roles or (role.startswith("energy") and any(r.startswith("energy") for r in roles)):
            raise FairchemFormatError(f"{path}: {where}: more than one {role} head ({roles.get(role)}, {name})")
        roles[role] = name
    return roles


def _stage(roles: dict, settings: dict, path: Path, check_backbone: bool) -> str:
    if set(roles) == {"energy+gradients"}:
        if check_backbone and settings["direct_forces"]:
            raise FairchemFormatError(f"{path}: backbone direct_forces=True with MLP_EFS_Head: no forces are predicted")
        return "conservative"
    if set(roles) in ({"energy", "forces"}, {"energy", "forces", "stress"}):
        if check_backbone and not settings["direct_forces"]:
            raise FairchemFormatError(f"{path}: a direct force head on a backbone with direct_forces=False")
        return "direct"
    raise FairchemFormatError(
        f"{path}: heads {sorted(roles)} are neither an energy/forces/stress head (conservative) nor an energy head "
        "with a direct force head (and optionally a direct stress head)"
    )


def _model_config(settings: dict, ff_key: str, envelope: bool, charge_spin: str, direct: bool) -> ModelConfig:
    return ModelConfig(
        num_layers=int(settings["num_layers"]),
        sphere_channels=int(settings["sphere_channels"]),
        hidden_channels=int(settings["hidden_channels"]),
        edge_channels=int(settings["edge_channels"]),
        lmax=int(settings["lmax"]),
        mmax=int(settings["mmax"]),
        num_radial_basis=int(settings["num_distance_basis"]),
        cutoff=float(settings["cutoff"]),
        # fairchem's element tables have a row for Z = 0..max_num_elements-1, ours Z = 1..
        max_num_elements=int(settings["max_num_elements"]) - 1,
        direct_forces=direct,
        feed_forward=str(settings[ff_key]),
        grid_resolution=int(settings["grid_resolution"] or 0),
        edge_degree_rescale=5.0,  # fixed in fairchem
        envelope_exponent=5,
        envelope=envelope,
        gaussian_width=2.0,
        charge_spin=charge_spin,
        # fairchem's direct stress head does not weight atoms by their neighbours.
        direct_stress_neighbour_weight=False,
    )


def _all_weights(config: ModelConfig, roles: dict) -> list[Weight]:
    energy_head = roles.get("energy+gradients") or roles["energy"]
    weights = backbone_weights(config) + energy_head_weights(energy_head)
    if "forces" in roles:
        weights += force_head_weights(roles["forces"])
    if "stress" in roles:
        weights += stress_head_weights(roles["stress"])
    return weights


def _normalisation(means: dict, scales: dict, path: Path, where: str) -> Normalisation:
    for prop in ("forces", "stress"):
        if means[prop] != 0.0:
            raise FairchemFormatError(f"{path}: {where}: the {prop} normaliser has mean {means[prop]}: this model has no {prop} offset")
    for prop, scale in scales.items():
        if not scale > 0:
            raise FairchemFormatError(f"{path}: {where}: the {prop} normaliser has rmsd {scale}; it must be positive")
    return Normalisation(energy_mean=means["energy"], energy_scale=scales["energy"], force_scale=scales["forces"],
                         stress_scale=scales["stress"])


def _without_prefix(state: dict, prefix: str) -> dict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def _neighbour_cap_note(settings: dict) -> list[str]:
    cap = settings["max_neighbors"]
    return [f"fairchem's graph keeps at most max_neighbors={cap} neighbours per atom (ties kept); this model uses "
            "every neighbour within the cutoff: the same unless an atom has more"]
