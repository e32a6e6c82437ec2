"""What every command shares: --version, the subcommand parsers, exit code 2 for bad input,
and the arguments several commands take."""
from __future__ import annotations

import argparse
import os
import select
import sys
import warnings
from types import ModuleType

from esen_train import __version__
from esen_train.data.sources import LabelKeys

# Bad input, the same code argparse exits with for a bad argument.
BAD_INPUT_EXIT_CODE = 2


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command's parser: the description as written, and --version."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_argument(parser)
    return parser


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version of esen-train and exit")


def add_subcommands(parser: argparse.ArgumentParser, subcommands: dict[str, ModuleType]) -> None:
    """One subparser per subcommand module (`HELP`, `add_arguments(parser)`, `run(args)`);
    the chosen module's `run` ends up in `args.run`."""
    chosen = parser.add_subparsers(dest="command", required=True)
    for name, module in subcommands.items():
        subparser = chosen.add_parser(name, help=module.HELP, description=module.__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        add_version_argument(subparser)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)


def fail(prog: str, error: Exception | str) -> int:
    """Report bad input the way argparse does, in one line, and return its exit code."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return BAD_INPUT_EXIT_CODE


def show_warnings_plainly(prog: str) -> None:
    """Warnings as one line naming the command, without Python's file, line and source line."""
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"


def run_for_a_reader(run, args: argparse.Namespace) -> int:
    """`run(args)` with its output flushed before it returns. Where the reader of the output
    went away (`esen-train status RUN | head -1`), the rest goes nowhere, without a traceback,
    and the exit code is a shell's for a process ended by SIGPIPE, as for any Unix tool."""
    try:
        exit_code = run(args)
        sys.stdout.flush()  # so that a reader gone shows here, not at exit
        return exit_code
    except BrokenPipeError:
        if not _stdout_broken():  # a pipe or socket of the work itself
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _stdout_broken() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll says POLLERR)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this system, or no stdout descriptor
        return False


# ----- arguments more than one command takes ------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


LABEL_HELP = {
    "energy": "total energy in eV, e.g. REF_energy or free_energy",
    "forces": "forces in eV/Å, e.g. REF_forces",
    "stress": "stress in eV/Å³ (ASE's sign), e.g. REF_stress",
    "config_type": "kind of structure (config type)",
    "weight": "per-structure weight",
}


def add_label_key_arguments(parser: argparse.ArgumentParser, fields=tuple(LABEL_HELP)) -> None:
    """--energy-key and the other label names of `sources.LabelKeys` (those in `fields`)."""
    defaults = LabelKeys()
    for field in fields:
        what = LABEL_HELP[field]
        flag = "--" + field.replace("_", "-") + "-key"
        parser.add_argument(flag, dest=f"{field}_key", default=getattr(defaults, field), metavar="KEY",
                            help=f"input name of the {what} (default {getattr(defaults, field)})")


def label_keys(args: argparse.Namespace) -> LabelKeys:
    """The LabelKeys of the --*-key options a parser has (defaults for the others)."""
    given = {field: getattr(args, f"{field}_key") for field in LABEL_HELP if hasattr(args, f"{field}_key")}
    return LabelKeys(**given)
