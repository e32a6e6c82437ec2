"""How fairchem names eSEN's weights and how we do: one table, read both ways.

fairchem's eSEN v1 (`models/esen/`) and eSCNMD (`models/uma/escn_md.py`) backbones name their
weights alike (eSCNMD adds the charge/spin embedding), and this model holds the same tensors
one to one, with four differences in layout (`Layout`):
- element tables: fairchem's row Z is element Z (row 0 unused), ours row Z-1 (`ROWS`);
- the direct force head: fairchem's SO3 linear map of l = 0, 1 to one channel, of which only
  the l = 1 weights reach the forces (`L1_OF_SO3_LINEAR`);
- the direct stress head's traceless part: likewise the l = 2 weights (`L2_OF_SO3_LINEAR`);
- parts of those maps that reach no output (their l = 0 bias) are `UNUSED`.

fairchem also saves constant buffers (v1 more than eSCNMD): the Wigner-D constants Jd_l, the
Gaussian centres, index and weight tables of its norms and gates. They are fixed by the
settings, so they are checked against what the settings imply (`constant_buffer_problem`)
rather than loaded; an export writes the Jd_l that fairchem's loader expects.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

import torch
from e3nn import o3

from esen_train.model.coefficients import degree_of_each_coefficient
from esen_train.model.config import ModelConfig


class Layout(Enum):
    SAME = "same"
    ROWS = "element rows"
    L1_OF_SO3_LINEAR = "l=1 weights of an SO3 linear map"
    L2_OF_SO3_LINEAR = "l=2 weights of an SO3 linear map"
    UNUSED = "reaches no output"


@dataclass(frozen=True)
class Weight:
    theirs: str  # fairchem's state-dict name (HydraModel: backbone.*, output_heads.<head>.*)
    ours: str | None  # ours, None for UNUSED
    layout: Layout = Layout.SAME


def backbone_weights(config: ModelConfig) -> list[Weight]:
    """Every weight of fairchem's backbone that is this model (eSCNMD's when config.charge_spin
    is not "none": only eSCNMD has the charge/spin embedding)."""
    weights = [Weight(f"backbone.{table}_embedding.weight", f"backbone.{ours}_embedding.weight", Layout.ROWS)
               for table, ours in (("sphere", "element"), ("source", "source"), ("target", "target"))]
    weights += _radial("backbone.edge_degree_embedding.rad_func", "backbone.edge_degree.radial")
    for block in range(config.num_layers):
        theirs, ours = f"backbone.blocks.{block}.", f"backbone.blocks.{block}."
        weights += _norm(f"{theirs}norm_1", f"{ours}edge_norm") + _norm(f"{theirs}norm_2", f"{ours}atom_norm")
        for conv, our_conv in (("so2_conv_1", "conv1"), ("so2_conv_2", "conv2")):
            weights += [Weight(f"{theirs}edge_wise.{conv}.fc_m0.{p}", f"{ours}edgewise.{our_conv}.m0.{p}")
                        for p in ("weight", "bias")]
            weights += [Weight(f"{theirs}edge_wise.{conv}.so2_m_conv.{m}.fc.weight", f"{ours}edgewise.{our_conv}.m_weights.{m}")
                        for m in range(config.mmax)]
        weights += _radial(f"{theirs}edge_wise.so2_conv_1.rad_func", f"{ours}edgewise.radial")
        if config.feed_forward == "spectral":
            weights += [Weight(f"{theirs}atom_wise.scalar_mlp.0.{p}", f"{ours}feed_forward.gate_scalars.{p}")
                        for p in ("weight", "bias")]
            weights += [Weight(f"{theirs}atom_wise.so3_linear_{i}.{p}", f"{ours}feed_forward.linear_{io}.{p}")
                        for i, io in ((1, "in"), (2, "out")) for p in ("weight", "bias")]
        else:
            weights += [Weight(f"{theirs}atom_wise.grid_mlp.{i}.weight", f"{ours}feed_forward.mlp.{i}.weight") for i in (0, 2, 4)]
    weights += _norm("backbone.norm", "backbone.norm")
    if config.charge_spin != "none":
        if config.charge_spin == "sinusoidal":
            weights += [Weight(f"backbone.{what}_embedding.W", f"backbone.charge_spin.{what}_frequencies")
                        for what in ("charge", "spin")]
        else:
            weights += [Weight(f"backbone.{what}_embedding.rand_emb.weight", f"backbone.charge_spin.{what}_table.weight")
                        for what in ("charge", "spin")]
        weights += [Weight(f"backbone.mix_csd.{p}", f"backbone.charge_spin.mix.{p}") for p in ("weight", "bias")]
    return weights


def energy_head_weights(head: str) -> list[Weight]:
    return [Weight(f"output_heads.{head}.energy_block.{i}.{p}", f"energy_head.mlp.{i}.{p}")
            for i in (0, 2, 4) for p in ("weight", "bias")]


def force_head_weights(head: str) -> list[Weight]:
    return [Weight(f"output_heads.{head}.linear.weight", "direct_heads.forces.weight", Layout.L1_OF_SO3_LINEAR),
            Weight(f"output_heads.{head}.linear.bias", None, Layout.UNUSED)]


def stress_head_weights(head: str) -> list[Weight]:
    weights = [Weight(f"output_heads.{head}.scalar_block.{i}.{p}", f"direct_heads.stress.isotropic.{i}.{p}")
               for i in (0, 2, 4) for p in ("weight", "bias")]
    return weights + [
        Weight(f"output_heads.{head}.l2_linear.weight", "direct_heads.stress.traceless_weight", Layout.L2_OF_SO3_LINEAR),
        Weight(f"output_heads.{head}.l2_linear.bias", None, Layout.UNUSED),
    ]


def _radial(theirs: str, ours: str) -> list[Weight]:
    """Linear, LayerNorm, SiLU, Linear, LayerNorm, SiLU, Linear: the same indices in both."""
    return [Weight(f"{theirs}.net.{i}.{p}", f"{ours}.layers.{i}.{p}") for i in (0, 1, 3, 4, 6) for p in ("weight", "bias")]


def _norm(theirs: str, ours: str) -> list[Weight]:
    return [Weight(f"{theirs}.affine_weight", f"{ours}.weight"), Weight(f"{theirs}.affine_bias", f"{ours}.bias")]


# ----- layouts --------------------------------------------------------------------------------
def to_ours(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout is Layout.ROWS:
        return tensor[1:]
    if layout is Layout.L1_OF_SO3_LINEAR:
        return tensor[1, 0]
    if layout is Layout.L2_OF_SO3_LINEAR:
        return tensor[2, 0]
    return tensor


def to_theirs(tensor: torch.Tensor | None, layout: Layout, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Our tensor in fairchem's layout; UNUSED parts (and the rest of a partial map) are zeros
    of `shape`."""
    if layout is Layout.ROWS:
        return torch.cat([tensor.new_zeros(1, tensor.shape[1]), tensor])
    if layout in (Layout.L1_OF_SO3_LINEAR, Layout.L2_OF_SO3_LINEAR):
        degree = 1 if layout is Layout.L1_OF_SO3_LINEAR else 2
        full = tensor.new_zeros(degree + 1, 1, tensor.shape[0])
        full[degree, 0] = tensor
        return full
    if layout is Layout.UNUSED:
        return torch.zeros(shape)
    return tensor


# ----- fairchem's constant buffers ------------------------------------------------------------
_WIGNER = re.compile(r"backbone\.Jd_(\d+)$")


def is_constant_buffer(name: str) -> bool:
    return bool(_WIGNER.match(name)) or name.endswith((".expand_index", ".balance_degree_weight", "distance_expansion.offset"))


def wigner_constant(degree: int) -> torch.Tensor:
    """fairchem's Jd_l: (-1)^l times the Wigner-D matrix (e3nn's real basis) of the half turn
    about x + y, the rotation that swaps the x and y axes and reverses z; its Jd.pt holds
    these to 1e-6."""
    swap = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    return (-1) ** degree * o3.Irrep(degree, 1).D_from_matrix(swap)


def constant_buffer_problem(name: str, value: torch.Tensor, config: ModelConfig) -> str | None:
    """What is wrong with fairchem's constant buffer `name`, given the settings; None if right."""
    lmax, mmax = config.lmax, config.mmax
    wigner = _WIGNER.match(name)
    if wigner:
        degree = int(wigner.group(1))
        if degree > 11:
            return f"no Wigner-D constant of degree {degree} exists in fairchem"
        expected, tolerance = wigner_constant(degree), 1e-5
    elif name.endswith("distance_expansion.offset"):
        expected = torch.linspace(0.0, config.cutoff, config.num_radial_basis, dtype=torch.float64)
        tolerance = 1e-6 * config.cutoff
    elif name.endswith(".balance_degree_weight"):
        degree = degree_of_each_coefficient(lmax)
        expected, tolerance = (1.0 / ((2 * degree + 1) * (lmax + 1))).double().unsqueeze(1), 1e-7
    elif name.endswith(".act.expand_index"):  # the gate: degree - 1 of each gated coefficient
        orders = mmax if ".edge_wise." in name else lmax
        expected = torch.tensor(
            [l - 1 for l in range(1, lmax + 1) for _ in range(min(2 * l + 1, 2 * orders + 1))], dtype=torch.float64
        )
        tolerance = 0.0
    elif name.endswith(".expand_index"):  # a norm or SO3 linear map: the degree of each coefficient
        size = int(round(math.sqrt(value.numel())))
        expected, tolerance = degree_of_each_coefficient(size - 1).double(), 0.0
    else:
        return "not a constant buffer"
    value = value.double()
    if value.shape != expected.shape:
        return f"shape {tuple(value.shape)}, the settings imply {tuple(expected.shape)}"
    error = float((value - expected).abs().max()) if value.numel() else 0.0
    if error > tolerance:
        return f"differs from the value the settings imply by {error:.3g}"
    return None
