"""``python -m finetune run|benchmark|probe``: one cell, the grid, or the representation probe of an init (the whole
chain: ``python -m experiment``).

Configs merge defaults ⊕ ``--config`` YAML ⊕ ``key=value`` overrides (``common.config``); the resolved config
is written into the output directory. Bad input ends with one ``error:`` line naming the file or key.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from common.config import load_config, parse_with_overrides
from common.errors import USER_FACING, end_of_command
from finetune.config import TRAIN_MODES, GridConfig, RunConfig
from finetune.grid import run_grid
from finetune.probe import COVARIATES, format_table, run_probe
from finetune.run import run_cell


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one cell: a task, a backbone with an init, one fraction and seed")
    run.add_argument("--task", help="ad | pd | brain_age | classify:COLUMN | regress:COLUMN")
    run.add_argument("--manifest", help="the task's manifest CSV")
    run.add_argument(
        "--init",
        help="scratch | EXPORT_FOLDER | EXPORT.safetensors | deepspeed:DIR | timm2d:PATH | videomae:PATH | "
        "medicalnet:PATH | monai:PATH",
    )
    run.add_argument("--backbone", help="a registry name (resnet18, vit_small_p16, ...)")
    run.add_argument("--mode", choices=TRAIN_MODES)
    run.add_argument("--config", help="YAML with RunConfig keys")
    run.add_argument("--out", help="run directory")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or other run in --out, whole")
    run.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=5 protocol.folds=3")
    bench = sub.add_parser("benchmark", help="the grid backbones × inits × tasks × fractions × seeds")
    bench.add_argument("--config", required=True, help="YAML with GridConfig keys (configs/finetune/*.yaml)")
    bench.add_argument("--out", help="output directory (default: the config's out_dir)")
    bench.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0,1] base.train.epochs=3")
    probe = sub.add_parser("probe", help="frozen features of an init -> cross-validated linear fits of covariates")
    probe.add_argument("--init", required=True, help="any init spec `run --init` takes (scratch, an export, ...)")
    probe.add_argument("--manifest", required=True, help="a manifest CSV with the covariates as columns")
    probe.add_argument("--backbone", help="a registry name (as `run`; an export's own architecture is checked)")
    probe.add_argument(
        "--covariates", help=f"columns to probe, comma-separated (default: those of {COVARIATES} present)"
    )
    probe.add_argument("--folds", type=int, default=5, help="outer subject-level folds (default 5)")
    probe.add_argument("--config", help="YAML with RunConfig keys (data.shape, data.spacing, backbone.kwargs ...)")
    probe.add_argument("--out", help="folder for probe.csv (default: print only)")
    probe.add_argument("overrides", nargs="*", help="key=value, e.g. data.shape=[32,32,32] seed=1")
    return parser


def _run(args: argparse.Namespace) -> None:
    flags = {
        "task": args.task,
        "manifest": args.manifest,
        "init": args.init,
        "backbone.name": args.backbone,
        "train.mode": args.mode,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(RunConfig, args.config, overrides)
    init_slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.init.split(":")[-1]).stem or cfg.init)
    out = Path(args.out or cfg.out_dir or f"runs/finetune/{cfg.task}-{cfg.backbone.name}-{init_slug}")
    result = run_cell(cfg, out, overwrite=args.overwrite)
    primary = result["primary"]
    m, b = result["metrics"], result["baseline"]
    print(
        f"{result['task']} {result['backbone']} init={result['init']}: {primary} = {m[primary]:.3f} "
        f"[{m.get(primary + '_lo')}, {m.get(primary + '_hi')}] (trivial baseline {b[primary]:.3f}); "
        f"run directory {out}"
    )


def _benchmark(args: argparse.Namespace) -> None:
    cfg = load_config(GridConfig, args.config, args.overrides)
    out = Path(args.out or cfg.out_dir)
    run_grid(cfg, out)
    print((out / "results.md").read_text())


def _probe(args: argparse.Namespace) -> None:
    flags = {"init": args.init, "manifest": args.manifest, "backbone.name": args.backbone}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(RunConfig, args.config, overrides)
    covariates = tuple(c.strip() for c in args.covariates.split(",")) if args.covariates else None
    table = run_probe(cfg, covariates, folds=args.folds, out=args.out)
    print(format_table(table, cfg.init))


def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        {"run": _run, "benchmark": _benchmark, "probe": _probe}[args.command](args)
    except USER_FACING as e:
        line, code = end_of_command(e)
        print(line, file=sys.stderr)
        return code
    return 0
