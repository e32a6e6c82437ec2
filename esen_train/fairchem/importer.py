"""`esen-train import-fairchem`: a fairchem eSEN checkpoint as a checkpoint of this project.

    imported = import_fairchem("esen_sm_conserving_all.pt")   # -> ImportedCheckpoint
    write_imported(imported, Path("imported/esen-sm-omol"))       # model.pt + import.json

The output directory is a checkpoint directory like RUN/checkpoints/<stage>/best: `eval`,
`md`, `ESENCalculator.from_checkpoint` and `<stage>.init_from` read it. Its model.pt has
the usual fields (model_config, model, ema, stage, step 0, metrics {}) plus `imported_from`
(file, sha256, format, datasets, fairchem's backbone settings, notes); import.json says the
same for people. Every fairchem weight is mapped one to one (esen_train/fairchem/weights.py)
and every fairchem tensor is accounted for: mapped, or a constant buffer that matches the
settings; anything else is refused with its name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from esen_train.fairchem.files import FairchemFormatError
from esen_train.fairchem.source import FairchemModel, read_fairchem_model
from esen_train.fairchem.weights import Layout, constant_buffer_problem, is_constant_buffer, to_ours
from esen_train.model import ESEN
from esen_train.model.model_file import MODEL_FILE, model_file_payload, write_model_file

SUMMARY_FILE = "import.json"


@dataclass
class ImportedCheckpoint:
    payload: dict  # what model.pt holds
    summary: dict  # what import.json holds


def import_fairchem(path: str | Path) -> ImportedCheckpoint:
    source = read_fairchem_model(path)
    model = _model_with(source, source.state)
    ema = _model_with(source, source.ema).state_dict() if source.ema is not None else None
    provenance = {
        "file": str(Path(path).resolve()),
        "sha256": _sha256(Path(path)),
        "format": source.generation,
        "datasets": source.datasets,
        "fairchem_backbone": _primitive(source.settings),
        "notes": list(source.notes),
    }
    payload = model_file_payload(source.config, model.state_dict(), ema, source.stage, step=0, metrics={},
                                 imported_from=provenance)
    summary = {
        **provenance,
        "stage": source.stage,
        "used_weights": "ema" if ema is not None else "model",
        "model_config": asdict(source.config),
        "normalisation": asdict(source.normalisation),
        "reference_energies": {int(z): float(e) for z, e in enumerate(model.reference_energies.tolist()) if e != 0.0},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return ImportedCheckpoint(payload, summary)


def _model_with(source: FairchemModel, state: dict) -> ESEN:
    """This model holding fairchem's `state` (raw or EMA weights), normalisers and references."""
    _check_accounted_for(source, state)
    torch.manual_seed(0)
    model = ESEN(source.config)
    ours = model.state_dict()
    for weight in source.weights:
        if weight.layout is Layout.UNUSED:
            continue
        value = to_ours(state[weight.theirs], weight.layout)
        if value.shape != ours[weight.ours].shape:
            raise FairchemFormatError(
                f"{source.path}: weight {weight.theirs} has shape {tuple(state[weight.theirs].shape)}, which does not fit "
                f"the settings in its config (this model's {weight.ours} is {tuple(ours[weight.ours].shape)})"
            )
        ours[weight.ours] = value.to(ours[weight.ours].dtype)
    if source.config.direct_forces and not any(w.ours and w.ours.startswith("direct_heads.stress.") for w in source.weights):
        # fairchem's direct model has no stress head: ours predicts zero stress until trained.
        ours.update({name: torch.zeros_like(value) for name, value in ours.items() if name.startswith("direct_heads.stress.")})
    model.load_state_dict(ours, strict=True)
    norm = source.normalisation
    model.set_normalisation(norm.energy_mean, norm.energy_scale, norm.force_scale, norm.stress_scale)
    if source.references is not None:
        model.set_reference_energies(_our_references(source))
    return model


def _check_accounted_for(source: FairchemModel, state: dict) -> None:
    """Every tensor of the file is a weight this model takes or a constant buffer that fits."""
    expected = {weight.theirs for weight in source.weights}
    missing = sorted(expected - set(state))
    if missing:
        raise FairchemFormatError(f"{source.path}: weights missing for these settings: {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''}")
    for name in sorted(set(state) - expected):
        if not is_constant_buffer(name):
            raise FairchemFormatError(
                f"{source.path}: tensor {name} is not part of an eSEN model with the config's settings; refused"
            )
        problem = constant_buffer_problem(name, state[name], source.config)
        if problem is not None:
            raise FairchemFormatError(f"{source.path}: constant buffer {name}: {problem}")


def _our_references(source: FairchemModel) -> torch.Tensor:
    """fairchem's references (by Z) cut or padded to this model's elements (fairchem cannot
    embed Z >= its max_num_elements either, so no used value is dropped)."""
    size = source.config.max_num_elements + 1
    theirs = source.references
    ours = torch.zeros(size, dtype=torch.float64)
    ours[: min(size, theirs.numel())] = theirs[:size]
    return ours


def write_imported(imported: ImportedCheckpoint, out: Path, overwrite: bool = False) -> Path:
    """model.pt and import.json into `out`, built beside it and renamed into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    temporary = out.with_name(f".{out.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write_model_file(imported.payload, temporary / MODEL_FILE)
    (temporary / SUMMARY_FILE).write_text(json.dumps(imported.summary, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old)
    else:
        os.replace(temporary, out)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _primitive(value):
    """JSON- and weights_only-safe copy of a settings value."""
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_primitive(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
