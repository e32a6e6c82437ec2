"""The commands' shared shape: every console script and subcommand answers --version, and bad
input ends every command with a message naming the problem and exit code 2 (as argparse's own
errors do). Run in-process through the `main` each pyproject console script names."""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import signal
import subprocess
import sys
import tomllib

import pytest

from esen_train import __version__
from tests.conftest import REPO_ROOT

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SUBCOMMANDS = {
    "esen-train": ["fit", "status", "config", "eval", "md", "quickstart", "import-fairchem", "export-fairchem"],
    "esen-data": ["convert", "export", "inspect", "verify", "split", "stats", "emt"],
    "esen-launch": [],
}


def console_script(script: str):
    """The function pyproject's console script `script` runs."""
    module, function = SCRIPTS[script].split(":")
    return getattr(importlib.import_module(module), function)


def exit_code(script: str, argv: list[str]) -> int:
    """The exit code of `script argv`: what main returns, or what argparse exits with."""
    try:
        return console_script(script)(argv)
    except SystemExit as stopped:
        return stopped.code


def prog(script: str, argv: list[str]) -> str:
    """How a command names itself in its messages: `esen-data convert`, `esen-launch`."""
    return f"{script} {argv[0]}" if SUBCOMMANDS[script] else script


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    chosen = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [name for action in chosen for name in action.choices]


def test_every_console_script_has_its_subcommands():
    assert sorted(SCRIPTS) == sorted(SUBCOMMANDS)
    for script, expected in SUBCOMMANDS.items():
        module = importlib.import_module(SCRIPTS[script].split(":")[0])
        assert subcommands(module.build_parser()) == expected


COMMANDS = [[script] for script in SUBCOMMANDS] + [[script, sub] for script in SUBCOMMANDS for sub in SUBCOMMANDS[script]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_answers_version(command, capsys):
    assert exit_code(command[0], [*command[1:], "--version"]) == 0
    assert capsys.readouterr().out == f"{' '.join(command)} {__version__}\n"


# (command, arguments, what the message must name); paths are relative to a fresh directory.
BAD_INPUT = [
    ("esen-train", ["fit", "tiny", "direct.max_stpes=3"], "key 'direct.max_stpes'"),
    ("esen-train", ["fit"], "the following arguments are required: config"),
    ("esen-train", ["status", "no-run"], "no-run/status.json not found"),
    ("esen-train", ["config", "tiny", "direct.lr=-1"], "direct.lr must be > 0"),
    ("esen-train", ["eval", "no-run", "--data", "data.xyz"], "checkpoint not found: no-run does not exist"),
    ("esen-train", ["md", "no-run", "--structure", "s.xyz", "--steps", "1", "--timestep", "1", "--temperature", "300"],
     "checkpoint not found: no-run does not exist"),
    ("esen-train", ["quickstart", "--out", "quickstart", "direct.max_stpes=3"], "key 'direct.max_stpes'"),
    ("esen-train", ["fit", "tiny", "stages=[conservative]"], "the conservative stage starts from this run's direct checkpoint"),
    ("esen-train", ["fit", "tiny", "stages=[conservative,direct]"], "does not train direct before it"),
    ("esen-train", ["fit", "tiny", "--nproc", "0"], "argument --nproc: must be at least 1, got 0"),
    ("esen-train", ["eval", "no-run", "--data", "data.xyz", "--device", "foo"], "argument --device: not a torch device: 'foo'"),
    ("esen-train", ["import-fairchem", "absent.pt", "--out", "imported"], "fairchem checkpoint not found: absent.pt"),
    ("esen-train", ["export-fairchem", "no-run", "--out", "exported.pt"], "checkpoint not found: no-run does not exist"),
    ("esen-data", ["convert", "absent.xyz", "--out", "data"], "absent.xyz: input file does not exist"),
    ("esen-data", ["export", "absent", "--out", "exported.xyz"], "absent: dataset directory does not exist"),
    ("esen-data", ["inspect", "absent"], "absent: dataset directory does not exist"),
    ("esen-data", ["verify", "absent"], "absent: dataset directory does not exist"),
    ("esen-data", ["split", "absent", "--out", "part"], "absent: dataset directory does not exist"),
    ("esen-data", ["split", "absent", "--out", "part", "--fractions", "0.9;0.1"], "expected comma-separated numbers"),
    ("esen-data", ["stats", "absent"], "absent: dataset directory does not exist"),
    ("esen-data", ["emt", "--out", "emt", "--num", "0"], "argument --num: must be at least 1, got 0"),
    ("esen-data", ["emt", "--out", "emt.xyz", "--num", "-3", "--extxyz"], "argument --num: must be at least 1, got -3"),
    ("esen-data", ["convert", "absent.xyz", "--out", "data", "--workers", "0"], "argument --workers: must be at least 1"),
    ("esen-launch", ["tiny", "--dry-run"], "choose a cluster profile with cluster=NAME"),
]


@pytest.mark.parametrize("script, argv, problem", BAD_INPUT, ids=[prog(script, argv) for script, argv, _ in BAD_INPUT])
def test_bad_input_exits_2_naming_the_problem(script, argv, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert exit_code(script, argv) == 2
    error = capsys.readouterr().err
    assert f"{prog(script, argv)}: error: " in error and problem in error, error
    assert list(tmp_path.iterdir()) == [], "bad input leaves nothing behind"


def test_no_package_below_the_commands_imports_them():
    """Dependencies run one way, data -> model -> engine -> evaluation -> cli: nothing outside
    esen_train/cli/ imports esen_train.cli."""
    package = REPO_ROOT / "esen_train"
    importers = []
    for path in package.rglob("*.py"):
        if package / "cli" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "esen_train.cli" or name.startswith("esen_train.cli.") for name in names):
                importers.append(str(path.relative_to(REPO_ROOT)))
    assert importers == []


def test_a_reader_that_stops_reading_ends_esen_train_quietly():
    """`esen-train config tiny | head -1`: the next line written finds no reader."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    esen_train = "import sys; from esen_train.cli.train import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", esen_train, "config", "tiny"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")
