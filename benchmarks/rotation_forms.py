"""The rotation to the edge frame, in two forms, through a conservative step's three phases; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/rotation_forms.py [--edges 8424] [--channels 128]
        [--lmax 2] [--repeats 7] [--threads 1]

D(R) is block-diagonal (blocks of 1, 3, 5, ... for l = 0, 1, 2, ...), so of the (lmax+1)^4
products of the one batched matmul the model uses (`EdgeRotation`: D's rows in edge order,
one bmm) only sum (2l+1)^2 are non-zero: 35 of 81 at lmax 2. This times both forms on the
same edges, the shapes of Cu108's message rotation by default:
- `one_bmm`: what the model does, EdgeRotation.rotate_to_edges;
- `per_degree`: D^0 = 1 passes l = 0 through, one bmm per degree l >= 1 on its block, then
  one gather into edge order;
- `copy`: x.clone(), the memory traffic of one pass over the features, as a floor.
For each: the median seconds of the forward, the first backward (create_graph, as for
conservative forces; D depends on the positions, so both D and x get gradients) and the
second backward (of a loss on those gradients), as in a conservative training step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esen_train.model.coefficients import edge_order  # noqa: E402
from esen_train.model.rotation import EdgeRotation, WignerD, edge_frames  # noqa: E402


def one_bmm(wigner, x, rows, order_sizes):
    return torch.cat(EdgeRotation(wigner, rows, order_sizes, None).rotate_to_edges(x), dim=1)


def per_degree(wigner, x, rows, order_sizes):
    lmax = len(order_sizes) - 1
    sizes = [2 * l + 1 for l in range(lmax + 1)]
    starts = [l * l for l in range(lmax + 1)]
    degrees = x.split(sizes, dim=1)
    rotated = [degrees[0]] + [
        torch.bmm(wigner[:, start:start + size, start:start + size], degree)
        for start, size, degree in zip(starts[1:], sizes[1:], degrees[1:])
    ]
    return torch.cat(rotated, dim=1).index_select(1, rows)


def copy(wigner, x, rows, order_sizes):
    return x.clone()


def phases(form, frames, x0, weight, rows, order_sizes, wigner_module) -> tuple[float, float, float]:
    vectors = frames.clone().requires_grad_()
    x = x0.clone().requires_grad_()
    wigner = wigner_module(edge_frames(vectors))  # not timed: the same for both forms
    start = time.perf_counter()
    loss = (form(wigner, x, rows, order_sizes) ** 2 * weight).sum()
    forward = time.perf_counter() - start
    start = time.perf_counter()
    grad_vectors, grad_x = torch.autograd.grad(loss, (vectors, x), create_graph=True, materialize_grads=True)
    first = time.perf_counter() - start
    start = time.perf_counter()
    ((grad_vectors ** 2).sum() + (grad_x ** 2).sum()).backward()
    second = time.perf_counter() - start
    return forward, first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=8424)
    parser.add_argument("--channels", type=int, default=128, help="of [x_source, x_target]: 2x sphere channels")
    parser.add_argument("--lmax", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = (args.lmax + 1) ** 2
    vectors = torch.nn.functional.normalize(torch.randn(args.edges, 3), dim=1)
    x = torch.randn(args.edges, size, args.channels)
    weight = torch.randn(size, args.channels)
    rows, order_sizes = edge_order(args.lmax, args.lmax)
    wigner_module = WignerD(args.lmax)

    forms = {"one_bmm": one_bmm, "per_degree": per_degree, "copy": copy}
    with torch.no_grad():
        wigner = wigner_module(edge_frames(vectors))
        difference = (one_bmm(wigner, x, rows, order_sizes) - per_degree(wigner, x, rows, order_sizes)).abs().max()
    timings = {name: [] for name in forms}
    for _ in range(args.repeats + 1):  # the first round warms the allocator and is dropped
        for name, form in forms.items():
            timings[name].append(phases(form, vectors, x, weight, rows, order_sizes, wigner_module))
    result = {
        "edges": args.edges, "channels": args.channels, "lmax": args.lmax, "threads": args.threads,
        "repeats": args.repeats, "max_abs_difference_one_bmm_per_degree": float(difference),
        "median_s": {
            name: dict(zip(("forward", "first_backward", "second_backward"),
                           (round(statistics.median(run[i] for run in runs[1:]), 5) for i in range(3))))
            for name, runs in timings.items()
        },
    }
    one = result["median_s"]["one_bmm"]
    result["per_degree_over_one_bmm"] = {
        phase: round(result["median_s"]["per_degree"][phase] / one[phase], 3) for phase in one
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
