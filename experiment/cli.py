"""``python -m experiment --config configs/experiment/quickstart.yaml [--out DIR] [key=value ...]``.

Runs (or resumes) the whole chain: synthetic cohorts → pre-training per source → fine-tuning → ``report.md``.
Bad input ends with one ``error:`` line naming the file or key.
"""

from __future__ import annotations

import argparse
import logging
import sys

from common.config import parse_with_overrides
from common.errors import USER_FACING, end_of_command
from experiment.config import load_experiment_config
from experiment.stages import run_experiment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML with ExperimentConfig keys (configs/experiment/*.yaml)")
    parser.add_argument("--out", help="output directory (default: the config's out_dir)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. synth.corpus_n=100 grid.seeds=[0,1]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    try:
        report = run_experiment(load_experiment_config(args.config, overrides))
    except USER_FACING as e:
        line, code = end_of_command(e, "rerun the same command: finished stages are skipped")
        print(line, file=sys.stderr)
        return code
    print(f"report: {report}")
    return 0
