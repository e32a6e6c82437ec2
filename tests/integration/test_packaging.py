"""What a new user installs: the lock agrees with pyproject, and a plain (non-editable) wheel
carries the configs and runs from a directory outside the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from esen_train import CONFIG_DIR, shipped_config
from tests.conftest import REPO_ROOT


def _locked_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", f"lock.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_lock_pins_every_dependency_within_pyproject_bounds():
    pins = _locked_versions()
    assert "torch" not in pins, "torch stays out of the lock: a GPU user's CUDA build must be kept"
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"pyproject asks for {requirement}, requirements/lock.txt has no pin for it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/lock.txt pins {name}=={pins[name]}, outside pyproject's {requirement}: run tools/lock.sh")


def test_torch_pin_is_within_pyproject_bounds():
    torch_requirement = next(r for r in _pyproject_requirements() if r.name == "torch")
    lines = (REPO_ROOT / "requirements" / "torch-cpu.txt").read_text().splitlines()
    (pinned,) = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert torch_requirement.specifier.contains(next(iter(pinned.specifier)).version)


def test_configs_ship_inside_the_package():
    assert (CONFIG_DIR / "model" / "tiny.yaml").is_file() and (CONFIG_DIR / "cluster" / "local.yaml").is_file()
    assert shipped_config("tiny") == CONFIG_DIR / "tiny.yaml" == shipped_config("tiny.yaml")
    assert shipped_config("no/such/file.yaml") == Path("no/such/file.yaml")
    # The repository's configs/ is the same folder, so paths in the docs keep working.
    assert (REPO_ROOT / "configs").resolve() == CONFIG_DIR.resolve()


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    local_only = {".git", ".venv", ".venvs", "runs", "data", "build", "dist", "wandb", ".pytest_cache"}

    def leave_out(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == REPO_ROOT
        return {n for n in names if (top and n in local_only) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=leave_out)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheels"), str(source)], check=True)
    (wheel,) = (tmp_path / "wheels").glob("esen_train-*.whl")
    return wheel


def _venv_with_this_environments_dependencies(venv: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch and the rest) through a
    .pth line: that line adds the folder only, so this environment's editable install of the
    checkout (itself a .pth hook) stays out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
def test_wheel_trains_and_launches_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("esen_train/configs/tiny.yaml", "esen_train/configs/model/esen-sm.yaml",
                    "esen_train/configs/cluster/local-slurm.yaml", "esen_train/cli/launch.py"):
        assert shipped in names
    assert not [name for name in names if name.split("/")[0] in ("launch", "configs", "tests")], \
        "no generic top-level package may be installed"

    python = _venv_with_this_environments_dependencies(tmp_path / "venv")
    # pip of this environment installs into the new one (`--python` needs pip >= 22.3).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    bin_dir = python.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def run(*command: str) -> str:
        result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    location = run(str(python), "-c", "import esen_train; print(esen_train.__file__)").strip()
    assert location.startswith(str(tmp_path / "venv")), location
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for script in project["scripts"]:
        assert run(str(bin_dir / script), "--version") == f"{script} {project['version']}\n"
    run(str(bin_dir / "esen-train"), "fit", "tiny", "run_dir=run", "data.emt_structures=24",
        "direct.max_steps=2", "direct.val_every=2", "direct.checkpoint_every=2",
        "conservative.max_steps=2", "conservative.val_every=2", "conservative.checkpoint_every=2",
        "logging.wandb.mode=disabled")
    assert (elsewhere / "run" / "checkpoints" / "conservative" / "last" / "model.pt").is_file()
    dry_run = run(str(bin_dir / "esen-launch"), "tiny", "cluster=local", "--dry-run")
    assert f"esen-train fit {location.rsplit('/', 1)[0]}/configs/tiny.yaml" in dry_run, dry_run
