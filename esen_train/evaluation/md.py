"""The NVE energy-conservation test: velocity-Verlet MD and the drift of the total energy.

The eSEN paper's point is that a potential must conserve energy in NVE before its test errors
mean anything. With conservative forces velocity Verlet conserves a shadow Hamiltonian, so the
total energy only fluctuates (by O(dt^2)); with non-gradient forces the work done along the
trajectory is path dependent and the total energy drifts. `run_nve` runs the dynamics with any
ASE calculator, `energy_drift` turns the total-energy series into the three numbers we report.
"""
from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from esen_train.progress import ConsoleProgress

MEV_PER_EV = 1000.0
FS_PER_PS = 1000.0


def run_nve(
    atoms: Atoms,
    calculator: Calculator,
    steps: int,
    timestep_fs: float,
    temperature_K: float,
    seed: int = 0,
    progress: ConsoleProgress | None = None,
) -> dict:
    """Run `steps` velocity-Verlet steps from Maxwell-Boltzmann velocities drawn with `seed`.

    `atoms` is not modified. Returns the drift summary of `energy_drift` plus the run's settings
    and the per-step series `time_ps`, `potential_energy_ev`, `kinetic_energy_ev` (step 0 included).
    `progress` counts the steps, with the total energy's change so far.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if timestep_fs <= 0:
        raise ValueError(f"timestep must be positive, got {timestep_fs} fs")
    if temperature_K < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature_K} K")
    atoms = atoms.copy()
    atoms.calc = calculator
    _draw_velocities(atoms, temperature_K, seed)

    potential, kinetic = [], []
    progress = progress or ConsoleProgress("md", steps, "steps", enabled=False)

    def record() -> None:
        potential.append(atoms.get_potential_energy())
        kinetic.append(atoms.get_kinetic_energy())
        change = (potential[-1] + kinetic[-1] - potential[0] - kinetic[0]) * MEV_PER_EV / len(atoms)
        progress.update_to(len(potential) - 1, f"total energy change {change:+.4f} meV/atom")

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(record, interval=1)  # ASE calls observers once before the first step too
    dynamics.run(steps)

    time_ps = np.arange(len(potential)) * timestep_fs / FS_PER_PS
    potential_ev = np.asarray(potential)
    kinetic_ev = np.asarray(kinetic)
    summary = energy_drift(time_ps, potential_ev + kinetic_ev, len(atoms))
    return {
        "steps": steps,
        "timestep_fs": timestep_fs,
        "temperature_K": temperature_K,
        "seed": seed,
        "num_atoms": len(atoms),
        **summary,
        "final_temperature_K": float(kinetic_ev[-1] / (1.5 * units.kB * len(atoms))),
        "time_ps": time_ps,
        "potential_energy_ev": potential_ev,
        "kinetic_energy_ev": kinetic_ev,
    }


def _draw_velocities(atoms: Atoms, temperature_K: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta (each component normal with variance m kB T), then no net
    momentum, and no net rotation for a molecule."""
    masses = atoms.get_masses()[:, None]
    normal = np.random.default_rng(seed).standard_normal((len(atoms), 3))
    atoms.set_momenta(normal * np.sqrt(masses * units.kB * temperature_K))
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)


def energy_drift(time_ps: np.ndarray, total_energy_ev: np.ndarray, num_atoms: int) -> dict:
    """Drift (slope of a least-squares line), fluctuation (std) and largest deviation from the
    starting value of the total energy, per atom, in meV/atom/ps and meV/atom."""
    time_ps = np.asarray(time_ps, dtype=float)
    per_atom_mev = (np.asarray(total_energy_ev, dtype=float) - total_energy_ev[0]) * MEV_PER_EV / num_atoms
    if len(time_ps) != len(per_atom_mev) or len(time_ps) < 2:
        raise ValueError("energy_drift needs matching time and energy series of at least two points")
    slope, _ = np.polyfit(time_ps, per_atom_mev, deg=1)
    return {
        "drift_mev_per_atom_per_ps": float(slope),
        "fluctuation_mev_per_atom": float(np.std(per_atom_mev)),
        "max_deviation_mev_per_atom": float(np.max(np.abs(per_atom_mev))),
    }
