"""The `model.pt` file of a checkpoint: its format, writing and reading it, finding it.

A CHECKPOINT argument is either a checkpoint directory (RUN/checkpoints/<stage>/{last,best,
step_<n>}) or a run directory, which means the best checkpoint of the run's last stage. Each
checkpoint directory holds `model.pt`, a plain dict of tensors and primitives:

    {"format_version": 1, "model_config": dict, "model": state_dict, "ema": state_dict | None,
     "stage": str, "step": int, "metrics": dict, "elements": list[int]}

`elements` (the atomic numbers of the training data) may be absent; the calculator then
cannot refuse elements the model never saw. An imported model adds `imported_from`.
`model_file_payload` builds that dict and `write_model_file` writes it; the trainer's
checkpoints and `esen-train import-fairchem` both write through them.

It is read with `torch.load(weights_only=True)`, never unpickled. Anything that does not fit
(a missing file, a corrupt one, weights of another shape than the config, a config other than
the one asked for) raises `CheckpointError` naming the file and what is wrong.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

from esen_train.config_loading import ConfigError, omegaconf_errors
from esen_train.model.config import ModelConfig, load_model_config
from esen_train.model.esen import ESEN

MODEL_FILE = "model.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model_config", "model", "ema", "stage", "step")
# Fields that may differ between a checkpoint and the size asked for: the direct heads are
# dropped for conservative fine-tuning, which does not change the model's size.
FIELDS_NOT_COMPARED = ("direct_forces",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or used; the message names the file."""


@dataclass
class CheckpointInfo:
    path: Path  # the model.pt that was read
    stage: str
    step: int
    metrics: dict
    used_ema: bool
    elements: list[int] | None = None  # atomic numbers of the training data, where recorded


def model_file_payload(
    model_config: ModelConfig,
    weights: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    stage: str,
    step: int,
    metrics: dict,
    elements: list[int] | None = None,
    **extra,
) -> dict:
    """The dict a model.pt holds; `elements` is left out when unknown, `extra` added as given."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": asdict(model_config),
        "model": weights,
        "ema": ema,
        "stage": stage,
        "step": step,
        "metrics": dict(metrics),
    }
    if elements is not None:
        payload["elements"] = list(elements)
    return {**payload, **extra}


def write_model_file(payload: dict, model_file: Path) -> None:
    """Write a payload of `model_file_payload`. The caller builds the checkpoint directory in a
    temporary place and renames it, so a reader never sees half a file."""
    torch.save(payload, model_file)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by `path` (a checkpoint directory or a run directory)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if (path / MODEL_FILE).is_file():
        return path
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        raise CheckpointError(
            f"{path} is neither a checkpoint directory (no {MODEL_FILE}) nor a run directory (no checkpoints/)"
        )
    for stage in reversed(_stage_order(path)):
        best = checkpoints / stage / "best"
        if (best / MODEL_FILE).is_file():
            return best
    present = sorted(str(p.relative_to(path)) for p in checkpoints.glob(f"*/*/{MODEL_FILE}"))
    raise CheckpointError(
        f"run directory {path} has no best checkpoint of any stage "
        f"(looked for checkpoints/<stage>/best/{MODEL_FILE}; found: {', '.join(present) or 'nothing'})"
    )


def _stage_order(run_dir: Path) -> list[str]:
    """The stages in the order the run trains them: `stages` of RUN/config.yaml if there is one."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        with omegaconf_errors(f"{config_file}: cannot be read", CheckpointError):
            stages = OmegaConf.load(config_file).get("stages")
        if stages:
            return [str(stage) for stage in stages]
    return ["direct", "conservative"]


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    expected_config: ModelConfig | str | None = None,
) -> tuple[ESEN, CheckpointInfo]:
    """The model of a checkpoint, in eval mode on `device` in `dtype`.

    `use_ema` takes the EMA weights where the checkpoint has them (what validation used).
    `expected_config` (a ModelConfig or a name in configs/model/) is the size the caller wants;
    a checkpoint of another size is refused.
    """
    model_file = resolve_checkpoint(path) / MODEL_FILE
    payload = read_model_file(model_file)
    config = _model_config(payload["model_config"], model_file)
    if expected_config is not None:
        _check_same_size(config, expected_config, model_file)
    used_ema = use_ema and payload["ema"] is not None
    weights = payload["ema"] if used_ema else payload["model"]
    model = ESEN(config)
    _load_weights(model, weights, model_file)
    model.to(device=device, dtype=dtype).eval()
    info = CheckpointInfo(model_file, str(payload["stage"]), int(payload["step"]), dict(payload.get("metrics") or {}),
                          used_ema, _elements(payload.get("elements"), model_file))
    return model, info


def checkpoint_model_config(model_file: Path) -> ModelConfig:
    """The ModelConfig a model.pt was written with."""
    return _model_config(read_model_file(model_file)["model_config"], model_file)


def read_model_file(model_file: Path) -> dict:
    """The checked payload of a model.pt."""
    try:
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{model_file}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{model_file}: expected a dict, found {type(payload).__name__}")
    version = payload.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{model_file}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{model_file}: missing field(s) {', '.join(missing)}")
    for key in ("model", "ema"):
        if key == "ema" and payload[key] is None:
            continue
        if not isinstance(payload[key], dict) or not all(isinstance(v, torch.Tensor) for v in payload[key].values()):
            raise CheckpointError(f"{model_file}: field '{key}' is not a state dict of tensors")
        payload[key] = upgrade_older_weights(payload[key])
    return payload


def upgrade_older_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved before the separate force and stress scales, in the layout of today's
    model: there one energy scale served energy, forces and stress (so it becomes the force
    and stress scale, and the energy mean is 0), and the Gaussian centres were saved (they are
    rebuilt in float64 now). Today's weights come back unchanged."""
    upgraded = {key: value for key, value in weights.items() if key != "backbone.distance_basis.centres"}
    if "energy_scale" in upgraded and "force_scale" not in upgraded:
        scale = upgraded["energy_scale"]
        upgraded.update(energy_mean=torch.zeros_like(scale), force_scale=scale.clone(), stress_scale=scale.clone())
    return upgraded


def _elements(stored: object, model_file: Path) -> list[int] | None:
    if stored is None:
        return None
    if not isinstance(stored, list) or not all(isinstance(z, int) and not isinstance(z, bool) for z in stored):
        raise CheckpointError(f"{model_file}: field 'elements' is not a list of atomic numbers")
    return stored


def _model_config(stored: object, model_file: Path) -> ModelConfig:
    """The stored config dict, checked field by field against ModelConfig."""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{model_file}: field 'model_config' is not a dict")
    with omegaconf_errors(f"{model_file}: field 'model_config' does not fit this version's ModelConfig", CheckpointError):
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), stored)
    try:
        return OmegaConf.to_object(merged)
    except ConfigError as error:  # ModelConfig.check
        raise CheckpointError(f"{model_file}: field 'model_config' has an invalid value ({error})") from None


def _check_same_size(config: ModelConfig, expected: ModelConfig | str, model_file: Path) -> None:
    wanted = load_model_config(expected) if isinstance(expected, str) else expected
    have, want = asdict(config), asdict(wanted)
    differences = [
        f"{f.name}={have[f.name]!r} (expected {want[f.name]!r})"
        for f in fields(ModelConfig)
        if f.name not in FIELDS_NOT_COMPARED and have[f.name] != want[f.name]
    ]
    if differences:
        name = f"'{expected}'" if isinstance(expected, str) else "the requested config"
        raise CheckpointError(f"{model_file}: the checkpoint is not of model size {name}: {'; '.join(differences)}")


def _load_weights(model: ESEN, weights: dict[str, torch.Tensor], model_file: Path) -> None:
    """load_state_dict, with a short message saying which weights do not fit the config."""
    own = model.state_dict()
    missing = [key for key in own if key not in weights]
    unexpected = [key for key in weights if key not in own]
    mismatched = [
        f"{key} {tuple(weights[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in own.items()
        if key in weights and weights[key].shape != tensor.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape (checkpoint vs config), e.g. {', '.join(mismatched[:3])}")
        if missing:
            problems.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} not in the model, e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{model_file}: the weights do not fit the checkpoint's model_config: {'; '.join(problems)}")
    model.load_state_dict(weights, strict=True)
