"""`esen-train`: fit, status, config, eval, md, quickstart, and fairchem's eSEN checkpoints in and out.

    esen-train fit CONFIG [key=value ...] [--nproc N] [--quiet]
    esen-train status RUN [--json]
    esen-train config CONFIG [key=value ...]
    esen-train eval CHECKPOINT --data DIR_OR_FILE [--json]
    esen-train md CHECKPOINT --structure FILE --steps N --timestep FS --temperature K
    esen-train quickstart [--out DIR]
    esen-train import-fairchem FAIRCHEM_CHECKPOINT --out DIR
    esen-train export-fairchem CHECKPOINT --out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from omegaconf import OmegaConf

from esen_train.engine.config import ConfigError, check_against_data, check_resume, load_train_config
from esen_train.engine.config_keys import config_keys_help
from esen_train.engine.status import StatusError, format_status, read_status
from esen_train.evaluation.commands import add_eval_parser, add_md_parser
from esen_train.fairchem.commands import add_export_parser, add_import_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esen-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fit_parser(commands)
    _add_status_parser(commands)
    _add_config_parser(commands)
    add_eval_parser(commands)
    add_md_parser(commands)
    _add_quickstart_parser(commands)
    add_import_parser(commands)
    add_export_parser(commands)
    # Options may come before, between or after the key=value overrides: argparse leaves
    # overrides that follow an option unparsed, so they are collected here.
    args, rest = parser.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(arg.startswith("-") or "=" not in arg for arg in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args.run(args)


def _add_fit_parser(commands) -> None:
    fit = commands.add_parser("fit", help="train the stages of a config", epilog=config_keys_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("config", help="a YAML path (configs/tiny.yaml) or a shipped config by name (tiny)")
    fit.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. direct.max_steps=100")
    fit.add_argument("--nproc", type=int, default=1, help="start N local processes (torch.distributed.run)")
    fit.add_argument("--quiet", action="store_true", help="no progress lines (same as logging.progress=false)")
    fit.set_defaults(run=_run_fit)


def _add_status_parser(commands) -> None:
    status = commands.add_parser("status", help="where a run is: state, stage, step, metrics, best checkpoint, time left")
    status.add_argument("run_dir", metavar="RUN", help="run directory")
    status.add_argument("--json", action="store_true", help="print RUN/status.json (with process_alive) instead")
    status.set_defaults(run=_run_status)


def _add_config_parser(commands) -> None:
    config = commands.add_parser("config", help="print the resolved config: presets expanded, defaults filled")
    config.add_argument("config", help="a YAML path or a shipped config by name")
    config.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for fit")
    config.set_defaults(run=_run_config)


def _run_status(args) -> int:
    try:
        status = read_status(args.run_dir)
    except StatusError as error:
        print(f"esen-train status: {error}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _run_config(args) -> int:
    try:
        config = load_train_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"esen-train config: {error}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), end="")
    return 0


def _run_fit(args) -> int:
    if args.quiet:
        args.overrides = [*args.overrides, "logging.progress=false"]
    try:
        config = load_train_config(args.config, args.overrides)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            check_against_data(config)  # once here, rather than once per process
            check_resume(config)
            return _launch_local_processes(args, config.run_dir)
        from esen_train.engine.fit import fit

        run_dir = fit(config)
    except ConfigError as error:
        print(f"esen-train fit: {error}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    return 0


def _launch_local_processes(args, run_dir: str) -> int:
    """Re-run this command under torch's launcher with N processes on this machine.
    The run directory is fixed here so every process agrees on it."""
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    if not any(o.startswith("strategy.name=") for o in overrides) and load_train_config(args.config, overrides).strategy.name == "single":
        overrides.append("strategy.name=ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        "-m", "esen_train.cli", "fit", args.config, *overrides,
    ]
    return subprocess.call(command)


def _add_quickstart_parser(commands) -> None:
    quickstart = commands.add_parser("quickstart", help="the whole recipe on built-in EMT data")
    quickstart.add_argument("--out", default="runs/quickstart", help="output directory")
    quickstart.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    quickstart.add_argument("--structures", type=int, default=800, help="EMT structures to make (default 800)")
    quickstart.add_argument("--md-steps", type=int, default=400, help="NVE steps of 2 fs (default 400)")
    quickstart.add_argument("overrides", nargs="*", help="key=value settings for the training, e.g. direct.max_steps=50")
    quickstart.set_defaults(run=_run_quickstart)


def _run_quickstart(args) -> int:
    from esen_train.quickstart import run_quickstart

    run_quickstart(args.out, nproc=args.nproc, structures=args.structures, md_steps=args.md_steps,
                   overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
