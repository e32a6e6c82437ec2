"""The NVE energy-conservation test: velocity-Verlet MD and the drift of the total energy.

The eSEN paper's point is that a potential must conserve energy in NVE before its test errors
mean anything. With conservative forces velocity Verlet conserves a shadow Hamiltonian, so the
total energy only fluctuates (by O(dt^2)); with non-gradient forces the work done along the
trajectory is path dependent and the total energy drifts. `run_nve` runs the dynamics with any
ASE calculator, `energy_drift` turns the total-energy series into the three numbers we report.

A time step too long for the potential, or a model that is wrong somewhere the trajectory
goes, makes the dynamics blow up: the temperature climbs by orders of magnitude and the
numbers above mean nothing. `run_nve` checks after every step that the temperature and the
total energy per atom stay within bounds and raises `UnstableDynamics`, with the trajectory
so far, when they do not.
"""
from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from esen_train.data.validate import UnphysicalGeometry
from esen_train.progress import ConsoleProgress

MEV_PER_EV = 1000.0
FS_PER_PS = 1000.0
# Default bounds: a temperature of 10 times the starting one (at least 300 K), a change of
# the total energy of 1 eV per atom. A working NVE run changes its total energy by meV.
TEMPERATURE_BOUND_FACTOR = 10.0
MAX_ENERGY_CHANGE_EV_PER_ATOM = 1.0


class UnstableDynamics(RuntimeError):
    """The dynamics left its bounds; `result` is the run up to there (as `run_nve` returns it)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def check_can_move(atoms: Atoms) -> None:
    """Raise ValueError for a structure with no dynamics to test: with its net momentum removed
    a lone atom stands still (and ASE's rescaling of its zero temperature divides by zero)."""
    if len(atoms) < 2:
        raise ValueError(f"NVE needs at least 2 atoms, the structure has {len(atoms)}: repeat a one-atom "
                         "cell into a supercell (ase.Atoms.repeat)")


def default_max_temperature(temperature_K: float) -> float:
    return TEMPERATURE_BOUND_FACTOR * max(temperature_K, 300.0)


def run_nve(
    atoms: Atoms,
    calculator: Calculator,
    steps: int,
    timestep_fs: float,
    temperature_K: float,
    seed: int = 0,
    max_temperature_K: float | None = None,
    max_energy_change_ev_per_atom: float = MAX_ENERGY_CHANGE_EV_PER_ATOM,
    progress: ConsoleProgress | None = None,
) -> dict:
    """Run `steps` velocity-Verlet steps from Maxwell-Boltzmann velocities drawn with `seed`.

    `atoms` is not modified. Returns the drift summary of `energy_drift` plus the run's settings
    and the per-step series `time_ps`, `potential_energy_ev`, `kinetic_energy_ev` (step 0 included).
    Raises `UnstableDynamics` as soon as the temperature exceeds `max_temperature_K` (default
    `default_max_temperature(temperature_K)`), the total energy per atom moves more than
    `max_energy_change_ev_per_atom` from its start, or the calculator refuses the geometry the
    dynamics reached (overlapping atoms). `progress` counts the steps, with the total energy's
    change so far.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if timestep_fs <= 0:
        raise ValueError(f"timestep must be positive, got {timestep_fs} fs")
    if temperature_K < 0:
        raise ValueError(f"temperature must be non-negative, got {temperature_K} K")
    check_can_move(atoms)
    if max_temperature_K is None:
        max_temperature_K = default_max_temperature(temperature_K)
    if not (max_temperature_K > 0 and max_energy_change_ev_per_atom > 0):
        raise ValueError(f"the bounds must be positive, got {max_temperature_K} K and "
                         f"{max_energy_change_ev_per_atom} eV per atom")
    atoms = atoms.copy()
    atoms.calc = calculator
    _draw_velocities(atoms, temperature_K, seed)
    settings = {"steps": steps, "timestep_fs": timestep_fs, "temperature_K": temperature_K, "seed": seed,
                "num_atoms": len(atoms), "max_temperature_K": max_temperature_K,
                "max_energy_change_ev_per_atom": max_energy_change_ev_per_atom}

    potential, kinetic = [], []
    progress = progress or ConsoleProgress("md", steps, "steps", enabled=False)

    def record() -> None:
        potential.append(atoms.get_potential_energy())
        kinetic.append(atoms.get_kinetic_energy())
        problem = _out_of_bounds(potential, kinetic, len(atoms), max_temperature_K, max_energy_change_ev_per_atom)
        if problem:
            raise _unstable(problem, len(potential) - 1, potential, kinetic, timestep_fs, settings)
        change = (potential[-1] + kinetic[-1] - potential[0] - kinetic[0]) * MEV_PER_EV / len(atoms)
        progress.update_to(len(potential) - 1, f"total energy change {change:+.4f} meV/atom")

    dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    dynamics.attach(record, interval=1)  # ASE calls observers once before the first step too
    try:
        dynamics.run(steps)
    except UnphysicalGeometry as error:
        if not potential:  # the starting structure itself: the caller's input
            raise
        raise _unstable(f"the calculator refused the structure ({error})", len(potential), potential, kinetic,
                        timestep_fs, settings) from None
    return _result(potential, kinetic, timestep_fs, settings)


def _out_of_bounds(potential: list, kinetic: list, num_atoms: int, max_temperature_K: float,
                   max_energy_change: float) -> str | None:
    temperature = kinetic[-1] / (1.5 * units.kB * num_atoms)
    change = (potential[-1] + kinetic[-1] - potential[0] - kinetic[0]) / num_atoms
    if not np.isfinite(temperature) or temperature > max_temperature_K:
        return f"the temperature reached {temperature:,.0f} K, above the bound of {max_temperature_K:,.0f} K"
    if not np.isfinite(change) or abs(change) > max_energy_change:
        return (f"the total energy moved by {change:+.4g} eV per atom, beyond the bound of "
                f"±{max_energy_change:g} eV per atom")
    return None


def _unstable(problem: str, step: int, potential: list, kinetic: list, timestep_fs: float,
              settings: dict) -> UnstableDynamics:
    message = (f"the dynamics became unstable at step {step} ({step * timestep_fs / FS_PER_PS:g} ps): {problem}. "
               "A shorter time step, or a model trained on structures like these, keeps it stable")
    return UnstableDynamics(message, _result(potential, kinetic, timestep_fs, {**settings, "stopped_at_step": step}))


def _result(potential: list, kinetic: list, timestep_fs: float, settings: dict) -> dict:
    time_ps = np.arange(len(potential)) * timestep_fs / FS_PER_PS
    potential_ev = np.asarray(potential)
    kinetic_ev = np.asarray(kinetic)
    num_atoms = settings["num_atoms"]
    summary = energy_drift(time_ps, potential_ev + kinetic_ev, num_atoms) if len(time_ps) > 1 else {}
    return {
        **settings,
        **summary,
        "final_temperature_K": float(kinetic_ev[-1] / (1.5 * units.kB * num_atoms)),
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
