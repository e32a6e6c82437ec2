"""`ModelConfig`: the hyperparameters of one eSEN model, and the presets in configs/model/.

A plain dataclass so omegaconf can use it as a structured config: a preset YAML may
only name fields that exist here, and a misspelt key fails with the key's name.

Fixed choices (not options): RMS normalisation over spherical-harmonic degrees, the
gated nonlinearity between the two SO(2) convolutions (a grid nonlinearity in the edge
frame would depend on the frame's arbitrary roll about the edge), Gaussian distance basis,
polynomial envelope shape, no neighbour cap.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from esen_train import CONFIG_DIR
from esen_train.config_loading import ConfigError, omegaconf_errors

PRESET_DIR = CONFIG_DIR / "model"

FEED_FORWARDS = ("spectral", "grid")
CHARGE_SPIN_EMBEDDINGS = ("none", "sinusoidal", "table")


@dataclass
class ModelConfig:
    num_layers: int = 2
    sphere_channels: int = 32  # channels of every (l, m) coefficient of a node
    hidden_channels: int = 32  # channels inside the edge and atom-wise blocks and the heads
    edge_channels: int = 32  # width of the radial MLPs and of the element embeddings on edges
    lmax: int = 2  # highest spherical-harmonic degree of node features
    mmax: int = 2  # highest order kept in the edge-aligned frame (mmax <= lmax)
    num_radial_basis: int = 16  # Gaussians on [0, cutoff]
    cutoff: float = 5.0  # Å; every neighbour within it is used (no cap)
    max_num_elements: int = 100  # atomic numbers 1..max_num_elements
    direct_forces: bool = False  # whether the direct force and stress heads exist
    # Atom-wise feed-forward: "spectral" (SO(3) linear, gate, SO(3) linear; exactly
    # equivariant) or "grid" (MLP on a point grid over the sphere; equivariant up to the
    # grid's sampling error).
    feed_forward: str = "spectral"
    # Points of the sphere grid (latitude = longitude = this) for "grid"; 0 picks
    # eSEN's default of 2(lmax+1) x 2(lmax+1)+1.
    grid_resolution: int = 0
    # The edge-degree embedding is a sum over neighbours divided by this (about the
    # square root of the mean number of neighbours).
    edge_degree_rescale: float = 5.0
    envelope_exponent: int = 5  # polynomial envelope; value and 2 derivatives vanish at the cutoff
    # Whether the envelope multiplies every message. Off only for imported fairchem eSEN v1
    # models trained without it (use_envelope: false): their messages do not vanish at the
    # cutoff, so energy and forces jump when a neighbour crosses it.
    envelope: bool = True
    gaussian_width: float = 2.0  # Gaussian width in units of the spacing of their centres
    # Total charge and spin multiplicity of each structure as inputs (fairchem's OMol models):
    # "none"; "sinusoidal": sin and cos of the value times fixed random frequencies (fairchem's
    # "pos_emb"; spin 0 means unknown and embeds as zeros); "table": a learned vector per
    # integer charge -100..100 and spin 0..100 ("rand_emb"). Their mix is added to every
    # atom's l=0 features at the start and after each block's first norm.
    charge_spin: str = "none"
    # Each atom's isotropic share of the direct stress is weighted by how much it has
    # neighbours (ESEN.neighbour_weight; 0 for an isolated atom). Off only for imported
    # fairchem direct models: their MLP_Stress_Head has no such weight.
    direct_stress_neighbour_weight: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigError (a ValueError) naming the first field whose value cannot build a
        model. Every ModelConfig checks itself when it is made; ESEN checks again, for a config
        changed after that."""
        positive = ("num_layers", "sphere_channels", "hidden_channels", "edge_channels",
                    "num_radial_basis", "max_num_elements", "envelope_exponent")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lmax < 1:
            raise ConfigError(f"ModelConfig.lmax must be >= 1 (forces need l=1), got {self.lmax}")
        if not 1 <= self.mmax <= self.lmax:
            raise ConfigError(f"ModelConfig.mmax must be in [1, lmax={self.lmax}], got {self.mmax}")
        if not self.cutoff > 0:
            raise ConfigError(f"ModelConfig.cutoff must be > 0, got {self.cutoff}")
        if self.feed_forward not in FEED_FORWARDS:
            raise ConfigError(f"ModelConfig.feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
        if self.grid_resolution < 0:
            raise ConfigError(f"ModelConfig.grid_resolution must be >= 0, got {self.grid_resolution}")
        if not self.edge_degree_rescale > 0:
            raise ConfigError(f"ModelConfig.edge_degree_rescale must be > 0, got {self.edge_degree_rescale}")
        if not self.gaussian_width > 0:
            raise ConfigError(f"ModelConfig.gaussian_width must be > 0, got {self.gaussian_width}")
        if self.charge_spin not in CHARGE_SPIN_EMBEDDINGS:
            raise ConfigError(f"ModelConfig.charge_spin must be one of {CHARGE_SPIN_EMBEDDINGS}, got {self.charge_spin!r}")
        if self.charge_spin == "sinusoidal" and self.sphere_channels % 2:
            raise ConfigError(f"ModelConfig.charge_spin 'sinusoidal' needs an even sphere_channels, got {self.sphere_channels}")


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (configs/model/<name>.yaml) or the path of a YAML file -> ModelConfig.

    Raises FileNotFoundError for an unknown preset or missing file, and ConfigError (a
    ValueError) naming the file and key for an unknown key or a value out of its range.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no model preset {str(name_or_path)!r} in {PRESET_DIR} (known: {known})")
    elif not path.is_file():
        raise FileNotFoundError(f"model config file not found: {path}")
    with omegaconf_errors(str(path)):
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    try:
        return OmegaConf.to_object(merged)
    except ConfigError as error:  # the values, checked by ModelConfig.check
        raise ConfigError(f"{path}: {error}") from None
