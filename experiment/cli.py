"""``python -m experiment --config configs/experiment/quickstart.yaml [--out DIR] [key=value ...]``.

Runs (or resumes) the whole chain: synthetic cohorts → pre-training per source → fine-tuning → ``report.md``.
``--print-config`` prints the checked config (without the fields the experiment fills in) and runs nothing.
Bad input ends with one ``error:`` line naming the file or key, and exit code 2.
"""

from __future__ import annotations

import argparse

from common.cli import add_print_config, command_parser, log_to_stderr, print_config, run_command
from common.config import parse_with_overrides
from experiment.config import OWNED, load_experiment_config
from experiment.stages import run_experiment

RESUME = "rerun the same command: finished stages are skipped"


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m experiment", __doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with ExperimentConfig keys (configs/experiment/*.yaml)")
    parser.add_argument("--out", help="output directory (default: the config's out_dir)")
    add_print_config(parser)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. synth.corpus_n=100 grid.seeds=[0,1]")
    return parser


def _run(argv: list[str] | None) -> int:
    args = parse_with_overrides(_parser(), argv)
    log_to_stderr()
    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    cfg = load_experiment_config(args.config, overrides)
    if args.print_config:  # the OWNED fields are the experiment's to fill: a config that set them would be refused
        return print_config(cfg, leave_out=OWNED)
    print(f"report: {run_experiment(cfg)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _run(argv), RESUME)
