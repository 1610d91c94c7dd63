"""``python -m synth``: write a synthetic pre-training corpus or a labelled cohort to a folder.

    python -m synth generate --out DIR --n N --seed S [--spacing MM] [--contrast t1|random] [--workers W]
        [--renderings K] [key=value ...]
    python -m synth cohort --task ad|pd|brain_age --out DIR --n N --sites K --seed S [--spacing MM] [...]
    python -m synth generate|cohort ... --shard K/N     # one job of an array; then: python -m synth merge --out DIR
    python -m synth calibrate --n N --spacing MM [--seed S] [--sites K] [key=value ...]
    python -m synth gap --a DIR_A --b DIR_B [--out FILE]   # how well a classifier tells two folders apart

``key=value`` overrides any ``SynthConfig`` field (e.g. ``atrophy.hippocampus_ad_mm=2``); ``--config FILE``
reads a YAML first (``configs/synth/default.yaml`` holds the defaults); ``--print-config`` prints the merged
config and generates nothing. Mistakes give one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from common.cli import add_print_config, command_parser, print_config, run_command
from common.config import load_config, parse_with_overrides, to_object
from common.errors import ConfigError, NeurotransferError, UsageError
from common.io import atomic_write_text
from synth.config import CONTRASTS, TASKS, SynthConfig
from synth.ldm.cli import add_ldm_commands

RESUME = "finished volumes are kept; rerun the same command to resume (ldm-train: with --resume)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; finished subjects in it are kept)")
    p.add_argument("--n", type=int, required=True, help="number of subjects (indices 0 .. n-1)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and index always give the same volume")
    p.add_argument("--spacing", type=float, default=None, help="voxel size in mm (default 1; 2 for quick runs)")
    p.add_argument("--contrast", choices=CONTRASTS, default=None, help="t1 (WM > GM > CSF) or random (GMM)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.add_argument("--config", default=None, help="YAML config file (SynthConfig fields)")
    add_print_config(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default=None, metavar="K/N", help="make only the K-th of N index ranges (job arrays)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. atrophy.ventricle_ad_mm=2")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("python -m synth", __doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="unlabelled pre-training corpus (ages 20-90, CN with some AD/PD)")
    generate.add_argument(
        "--renderings",
        type=int,
        default=1,
        metavar="K",
        help="volumes per subject: the same anatomy by K scanners (K >= 2: rescan views for contrastive pre-training)",
    )
    _common(generate)
    cohort = sub.add_parser("cohort", help="labelled cohort for a downstream task, over K sites")
    cohort.add_argument("--task", required=True, choices=TASKS, help="ad: CN/AD, pd: HC/PD, brain_age: CN 20-90")
    cohort.add_argument("--sites", type=int, default=1, help="number of sites (scanners); each gets both classes")
    _common(cohort)
    merge = sub.add_parser("merge", help="join the shard manifests of a folder into manifest.csv")
    merge.add_argument("--out", required=True, help="the folder the shards wrote")
    gap = sub.add_parser("gap", help="domain gap: classifiers telling folder A's volumes from folder B's")
    gap.add_argument("--a", required=True, help="a generated folder (manifest.csv with a path column)")
    gap.add_argument("--b", required=True, help="the other folder")
    gap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    gap.add_argument("--seed", type=int, default=0, help="the folds' (and any subsample's) seed")
    gap.add_argument("--max-per-side", type=int, default=200, help="volumes read per folder at most")
    cal = sub.add_parser("calibrate", help="measure the defaults' effect sizes against synth.targets (exit 1 on fail)")
    cal.add_argument("--n", type=int, default=120, help="subjects per cohort (AD, PD, brain age)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--sites", type=int, default=3)
    cal.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    cal.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores, at most 3)")
    cal.add_argument("--config", default=None, help="YAML config file (SynthConfig fields)")
    add_print_config(cal)
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    add_ldm_commands(sub)  # ldm-train, ldm-sample: the latent-diffusion backend
    return parser


def load(args: argparse.Namespace) -> SynthConfig:
    """The config: defaults <- --config <- --spacing/--contrast <- key=value."""
    overrides = list(args.overrides)
    if getattr(args, "contrast", None) is not None:
        overrides.append(f"contrast={args.contrast}")
    if args.spacing is not None:
        overrides.append(f"spacing={args.spacing}")
    try:
        return to_object(load_config(SynthConfig, args.config, overrides))
    except NeurotransferError:
        raise
    except Exception as e:  # OmegaConf wraps the dataclass's own check; keep only its message
        cause = e.__cause__ or e.__context__ or e
        if isinstance(cause, NeurotransferError):
            raise cause from None
        raise ConfigError(str(e).splitlines()[0]) from None


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_with_overrides(build_parser(), argv)
    if hasattr(args, "func"):  # a latent-diffusion command
        return args.func(args)
    if args.command == "merge":
        from synth.shard import merge

        print(merge(args.out))
        return 0
    if args.command == "gap":
        return _gap(args)
    cfg = load(args)
    if args.print_config:
        return print_config(cfg)
    if args.command == "calibrate":
        return _calibrate(cfg, args)
    from synth.cohort import Job, default_workers, generate  # after parsing: --help stays fast
    from synth.shard import Shard

    shard = None if args.shard is None else Shard.parse(args.shard)

    if args.command == "generate":
        job = Job(seed=args.seed, renderings=args.renderings)
    else:
        job = Job(seed=args.seed, task=args.task, sites=args.sites)
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    manifest = generate(args.out, cfg, job, args.n, workers=workers, show_progress=not args.no_progress, shard=shard)
    print(manifest)
    return 0


def _gap(args: argparse.Namespace) -> int:
    if args.max_per_side < 2:
        raise UsageError(f"--max-per-side must be >= 2, got {args.max_per_side}")
    from synth.gap import describe, domain_gap

    gap = domain_gap(args.a, args.b, seed=args.seed, max_per_side=args.max_per_side)
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(gap, indent=1))
    print(describe(gap))
    return 0


def _calibrate(cfg: SynthConfig, args: argparse.Namespace) -> int:
    if args.n < 2 or args.sites < 1:
        raise UsageError(f"--n must be >= 2 and --sites >= 1, got {args.n} and {args.sites}")
    from synth.calibrate import calibrate
    from synth.cohort import default_workers

    workers = default_workers() if args.workers is None else args.workers
    text, ok = calibrate(cfg, args.n, args.seed, args.sites, show=not args.no_progress, workers=workers)
    print(text)
    print("calibration: all targets pass" if ok else "calibration: FAILED (see the table)")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: run(argv), RESUME)
