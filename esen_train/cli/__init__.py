"""The console commands: `esen-train`, `esen-data` and `esen-launch`, all in one shape.

    cli/train/     esen-train: fit, status, config, eval, md, quickstart, import-fairchem, export-fairchem
    cli/data/      esen-data: convert, export, inspect, verify, split, stats, emt
    cli/launch.py  esen-launch

A console script's module (`cli/train`, `cli/data`, `cli/launch.py`) has `build_parser()` and
`main(argv=None) -> int`; a subcommand's module has `HELP` (its line in the command's help),
`add_arguments(parser)` and `run(args) -> int`, and its docstring is its `--help` text.
Every command and subcommand answers `--version`. Bad input (arguments, files, data, configs)
ends a command with one line `PROG: error: MESSAGE` on stderr and exit code 2, as argparse's
own errors do. The packages below (data, model, engine, evaluation, fairchem, launch) never
import this one; `python -m esen_train.cli` is `esen-train` (so `torchrun -m esen_train.cli fit`).
"""
