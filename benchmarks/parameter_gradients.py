"""A conservative training step's backward: every leaf's gradients against the parameters' alone; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/parameter_gradients.py [--model esen-sm] [--steps 6] [--threads 1]
    OMP_NUM_THREADS=1 python benchmarks/parameter_gradients.py --recipe quickstart

A conservative loss reaches the positions and the strain as well as the parameters: forces
and stress are their gradients (create_graph), and the loss's backward runs through that
graph again. `loss.backward()` computes every leaf's gradient, the positions' and strain's
included, which training throws away; `loss.backward(inputs=parameters)`, what the
strategies do (esen_train/engine/strategies/base.py), lets autograd skip the branches that
lead only to them. Per system, the median wall seconds of a step (forward, the trainer's
loss with stress, backward) in each form, the two forms taking turns in this one process
(so the machine's load weighs on both alike), and the ratio parameters / every leaf.
Systems and `--recipe` as in model_compile.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch_geometric.data import Batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accuracy import DATASETS  # noqa: E402
from case_server import backward_to_parameters  # noqa: E402
from esen_train.engine.host_memory import keep_freed_host_memory  # noqa: E402
from esen_train.engine.losses import LossWeights, batch_counts, training_loss  # noqa: E402
from esen_train.model import ESEN, load_model_config  # noqa: E402
from model_compile import batch_of, recipe_system, systems  # noqa: E402

WEIGHTS = LossWeights(energy=20.0, forces=10.0, stress=5.0)  # the quickstart's
FORMS = ("every_leaf", "parameters")


def step(model: ESEN, batch: Batch, form: str) -> float:
    """Wall seconds of one step, the atoms moved a little first."""
    batch.pos = batch.pos.detach() + 1e-4 * torch.randn_like(batch.pos)
    started = time.perf_counter()
    out = model(batch, forces="conservative", stress=True, create_graph=True)
    loss, _ = training_loss(out, batch, WEIGHTS, batch_counts(batch), world_size=1)
    if form == "parameters":
        backward_to_parameters(loss, model)
    else:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def measure(model: ESEN, batch: Batch, steps: int) -> dict:
    for form in FORMS:
        step(model, batch, form)  # warm-up
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for index in range(steps):
        for form in FORMS if index % 2 == 0 else FORMS[::-1]:
            times[form].append(step(model, batch, form))
    medians = {form: statistics.median(values) for form, values in times.items()}
    return {
        "atoms": int(batch.natoms.sum()),
        "edges": int(batch.edge_index.shape[1]),
        **{f"{form}_step_s": round(median, 4) for form, median in medians.items()},
        "ratio_parameters_over_every_leaf": round(medians["parameters"] / medians["every_leaf"], 3),
        "spread_s": {form: [round(min(values), 4), round(max(values), 4)] for form, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="esen-sm", help="model preset (configs/model/)")
    parser.add_argument("--recipe", choices=["quickstart", *sorted(DATASETS)],
                        help="a shipped recipe (configs/RECIPE.yaml): its model on its data")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each form after warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()
    model_config, cases = recipe_system(args.recipe) if args.recipe else (load_model_config(args.model), systems())
    torch.manual_seed(0)
    model = ESEN(replace(model_config, direct_forces=False))
    report = {"model": args.recipe or args.model, "torch": torch.__version__, "threads": args.threads}
    for name, structures in cases.items():
        report[name] = measure(model, batch_of(structures, model_config.cutoff), args.steps)
        print(f"{name}: {report[name]}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
