"""ConfigError, and the one place where omegaconf's errors become it.

Every loader of a structured config (the training config, model presets, cluster profiles,
the model_config stored in a model.pt) merges inside `omegaconf_errors(where)`, so an
unknown, missing or mistyped key is reported the same way everywhere: the file (or other
source) and the key's full name. Each config class then checks its own values in its
`check(where)` method. Like progress.py, this depends on nothing else in esen_train.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file, override or stored config that cannot be used; the message says where."""


@contextmanager
def omegaconf_errors(where: str, error: type[Exception] = ConfigError) -> Iterator[None]:
    """Re-raise an omegaconf error of the block as `error` (ConfigError, or a caller's own
    kind such as CheckpointError): "<where>: key '<full key>': <omegaconf's first line>"; a
    YAML syntax error as "<where>: not valid YAML at line L, column C: <problem>"."""
    try:
        yield
    except OmegaConfBaseException as raised:
        key = getattr(raised, "full_key", None)
        message = str(raised).splitlines()[0]
        raise error(f"{where}: key '{key}': {message}" if key else f"{where}: {message}") from None
    except yaml.YAMLError as raised:  # OmegaConf.load of a file that is not YAML
        mark = getattr(raised, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(raised, "problem", None) or str(raised).splitlines()[0]
        raise error(f"{where}: not valid YAML{place}: {problem}") from None
