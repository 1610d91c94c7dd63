"""``python -m finetune run|benchmark|probe|manifest|predict``: one cell, the grid, the representation probe of an
init, a BIDS folder as a manifest, or fine-tuned models applied to new scans (the whole chain: ``python -m
experiment``).

Configs merge defaults ⊕ ``--config`` YAML ⊕ ``key=value`` overrides (``common.config``); the resolved config
is written into the output directory (``--print-config`` prints it and runs nothing). Bad input ends with one
``error:`` line naming the file or key, and exit code 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from common.cli import add_print_config, command_parser, log_to_stderr, print_config, run_command
from common.config import load_config, parse_with_overrides, to_object
from common.errors import UsageError
from finetune.arch import resolve_arch
from finetune.bids import bids_manifest, parse_label_map, write_manifest
from finetune.config import TRAIN_MODES, GridConfig, RunConfig, validate
from finetune.grid import expand, run_grid
from finetune.metrics import with_ci
from finetune.predict import describe, predict_manifest, write_predictions
from finetune.probe import COVARIATES, format_table, run_probe
from finetune.run import run_cell


def _parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m finetune", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one cell: a task, a backbone with an init, one fraction and seed")
    run.add_argument("--task", help="ad | pd | brain_age | classify:COLUMN | regress:COLUMN")
    run.add_argument("--manifest", help="the task's manifest CSV")
    run.add_argument(
        "--init",
        help="scratch | EXPORT_FOLDER | EXPORT.safetensors | deepspeed:DIR | timm2d:PATH | videomae:PATH | "
        "medicalnet:PATH | monai:PATH",
    )
    run.add_argument("--backbone", help="a registry name (default: an export init's own, else resnet18)")
    run.add_argument("--mode", choices=TRAIN_MODES)
    run.add_argument(
        "--allow-partial",
        action="store_true",
        help="load our own init into a model it does not fit (tensors left as initialised or resized)",
    )
    run.add_argument("--config", help="YAML with RunConfig keys")
    run.add_argument("--out", help="run directory")
    run.add_argument("--overwrite", action="store_true", help="replace a finished or other run in --out, whole")
    add_print_config(run)
    run.add_argument("overrides", nargs="*", help="key=value, e.g. train.epochs=5 protocol.folds=3")
    bench = sub.add_parser("benchmark", help="the grid backbones × inits × tasks × fractions × seeds")
    bench.add_argument("--config", required=True, help="YAML with GridConfig keys (configs/finetune/*.yaml)")
    bench.add_argument("--out", help="output directory (default: the config's out_dir)")
    add_print_config(bench)
    bench.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0,1] base.train.epochs=3")
    probe = sub.add_parser("probe", help="frozen features of an init -> cross-validated linear fits of covariates")
    probe.add_argument("--init", required=True, help="any init spec `run --init` takes (scratch, an export, ...)")
    probe.add_argument("--manifest", required=True, help="a manifest CSV with the covariates as columns")
    probe.add_argument("--backbone", help="a registry name (as `run`; an export's own architecture is checked)")
    probe.add_argument(
        "--covariates", help=f"columns to probe, comma-separated (default: those of {COVARIATES} present)"
    )
    probe.add_argument("--folds", type=int, default=5, help="outer subject-level folds (default 5)")
    probe.add_argument("--config", help="YAML with RunConfig keys (data.shape, data.spacing, model.kwargs ...)")
    probe.add_argument("--out", help="folder for probe.csv (default: print only)")
    add_print_config(probe)
    probe.add_argument("overrides", nargs="*", help="key=value, e.g. data.shape=[32,32,32] seed=1")
    bids = sub.add_parser("manifest", help="a BIDS folder -> a manifest, one row per T1w image (docs/finetune.md)")
    bids.add_argument("--bids", required=True, help="the BIDS dataset's root (participants.tsv, sub-*/)")
    bids.add_argument("--out", required=True, help="the manifest to write (.csv, or .tsv for tab-separated)")
    bids.add_argument("--label-map", help="FROM=TO,... onto the task's labels, e.g. Control=CN,Dementia=AD")
    bids.add_argument("--label-column", help="the participants.tsv column holding the label (default diagnosis)")
    bids.add_argument(
        "--site-from-sidecar", action="store_true", help="site = the JSON sidecar's scanner (maker, model, tesla)"
    )
    bids.add_argument("--derivatives", metavar="PIPELINE", help="the T1w images of derivatives/PIPELINE instead")
    predict = sub.add_parser("predict", help="fine-tuned models (a run's model/ or fold{k}/model/) on new scans")
    predict.add_argument("--model", required=True, help="a model folder, or a run folder (the mean of its folds)")
    predict.add_argument("--manifest", required=True, help="the scans: a manifest with path and subject_id")
    predict.add_argument("--out", required=True, help="the predictions CSV to write")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    predict.add_argument("--batch-size", type=int, default=4, help="scans per forward pass (default 4)")
    add_print_config(predict, "the effective settings (the model folders, their task and preprocessing)")
    return parser


def _run(args: argparse.Namespace) -> None:
    flags = {
        "task": args.task,
        "manifest": args.manifest,
        "init": args.init,
        "model.backbone": args.backbone,
        "train.mode": args.mode,
        "allow_partial_init": "true" if args.allow_partial else None,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(RunConfig, args.config, overrides)
    if args.print_config:
        validate(to_object(cfg))
        print_config(cfg)
        return
    init_slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.init.split(":")[-1]).stem or cfg.init)
    out = Path(args.out or cfg.out_dir or f"runs/finetune/{cfg.task}-{resolve_arch(cfg)[0]}-{init_slug}")
    result = run_cell(cfg, out, overwrite=args.overwrite)
    primary = result["primary"]
    m, b = result["metrics"], result["baseline"]
    print(
        f"{result['task']} {result['backbone']} init={result['init']}: {primary} = "
        f"{with_ci(m[primary], m.get(primary + '_lo'), m.get(primary + '_hi'))} "
        f"(trivial baseline {with_ci(b[primary])}); run directory {out}"
    )


def _benchmark(args: argparse.Namespace) -> None:
    cfg = load_config(GridConfig, args.config, args.overrides)
    out = Path(args.out or cfg.out_dir)
    if args.print_config:
        for cell in expand(to_object(cfg), out):  # every cell's config, checked as a run would check it
            validate(cell.run)
        print_config(cfg)
        return
    run_grid(cfg, out)
    print((out / "results.md").read_text())


def _probe(args: argparse.Namespace) -> None:
    flags = {"init": args.init, "manifest": args.manifest, "model.backbone": args.backbone}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    cfg = load_config(RunConfig, args.config, overrides)
    if args.print_config:
        validate(to_object(cfg))
        print_config(cfg)
        return
    covariates = tuple(c.strip() for c in args.covariates.split(",")) if args.covariates else None
    table = run_probe(cfg, covariates, folds=args.folds, out=args.out)
    print(format_table(table, cfg.init))


def _manifest(args: argparse.Namespace) -> None:
    label_map = parse_label_map(args.label_map) if args.label_map else None
    df = bids_manifest(args.bids, args.out, label_map, args.label_column, args.site_from_sidecar, args.derivatives)
    out = write_manifest(df, args.out)
    visits = df.drop_duplicates(["subject_id", "session_id"]) if "session_id" in df else df["subject_id"].unique()
    print(
        f"{out}: {len(df)} images of {df['subject_id'].nunique()} subjects ({len(visits)} sessions); "
        f"columns {', '.join(df.columns)}"
    )


def _predict(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.print_config:
        settings = {"manifest": args.manifest, "out": args.out, "device": args.device, "batch_size": args.batch_size}
        print_config({**settings, **describe(args.model)})
        return
    table = predict_manifest(args.model, args.manifest, args.device, args.batch_size)
    out = write_predictions(table, args.out)
    print(f"{out}: {len(table)} scans predicted by {args.model}")


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        args = parse_with_overrides(_parser(), argv)
        log_to_stderr()
        commands = {"run": _run, "benchmark": _benchmark, "probe": _probe, "manifest": _manifest, "predict": _predict}
        commands[args.command](args)
        return 0

    return run_command(run)
