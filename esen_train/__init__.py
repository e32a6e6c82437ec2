"""esen-train: train eSEN machine-learning interatomic potentials, from a laptop CPU to
multi-node clusters. Dependencies run one way: data -> model -> engine -> evaluation -> cli."""
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path

try:
    __version__ = version("esen-train")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

# The YAML configs shipped inside the package (the repository's configs/ links here): model
# presets in model/, cluster profiles in cluster/, the quickstart and the dataset recipes.
CONFIG_DIR = Path(str(files(__name__) / "configs"))


def shipped_config(name_or_path: str | Path) -> Path:
    """A YAML path as given when it exists, else the shipped config of that name
    (`tiny` or `tiny.yaml` -> CONFIG_DIR/tiny.yaml), so installed users need no checkout."""
    path = Path(name_or_path)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path
