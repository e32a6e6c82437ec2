"""Parameter counts of the model presets in configs/model/, as JSON.

    python benchmarks/model_params.py [PRESET ...]

For each preset: the total without direct heads (the conservative model, what a released
checkpoint holds), the total with them (the direct pretraining stage), a breakdown by
part, and, where one is published, the reference count and the relative difference.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esen_train.model import ESEN, load_model_config  # noqa: E402
from esen_train.model.config import PRESET_DIR  # noqa: E402

# Published sizes: eSEN-30M-OAM from the Matbench Discovery model card (model_params);
# esen-sm from fairchem-core's K4L2 backbone, which also has a 32,896-parameter
# charge/spin mixing layer that these materials models do not have.
REFERENCES = {
    "esen-30m": {"count": 30_161_153, "source": "Matbench Discovery models/eSEN/eSEN-30m-oam.yml"},
    "esen-sm": {"count": 5_964_417, "source": "fairchem-core K4L2 (5.96M), incl. 32,896 charge/spin mixing"},
}


def count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def describe(name: str) -> dict:
    config = load_model_config(name)
    model = ESEN(replace(config, direct_forces=False))
    with_heads = ESEN(replace(config, direct_forces=True))
    backbone = model.backbone
    parts = {
        "embeddings": count(backbone.element_embedding) + count(backbone.source_embedding)
        + count(backbone.target_embedding),
        "edge_degree_embedding": count(backbone.edge_degree),
        "blocks": count(backbone.blocks),
        "final_norm": count(backbone.norm),
        "energy_head": count(model.energy_head),
        "direct_heads": count(with_heads.direct_heads),
    }
    result = {
        "preset": name,
        "config": asdict(config),
        "parameters": count(model),
        "parameters_with_direct_heads": count(with_heads),
        "parts": parts,
    }
    if name in REFERENCES:
        reference = REFERENCES[name]
        result["reference"] = reference
        result["relative_difference"] = (result["parameters"] - reference["count"]) / reference["count"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names (default: all in configs/model/)")
    args = parser.parse_args()
    names = args.presets or sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
    print(json.dumps([describe(name) for name in names], indent=2))


if __name__ == "__main__":
    main()
