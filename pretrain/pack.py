"""``python -m pretrain.pack``: preprocess a manifest's images once into packed shards (the ``packed`` corpus).

    python -m pretrain.pack --manifest data/synth_corpus/manifest.csv --out data/synth_packed \\
        --spacing 2 --shape 96 96 96 --intensity none --dtype uint8 [--per-shard 256] [--workers 8]

Any manifest in the project's format works (``python -m synth`` output, a medical cohort). Preprocessing is
common's pipeline (``PreprocessConfig``: RAS, spacing, foreground crop, pad/crop to shape, intensity) and is
recorded in ``OUT/pack.json``; see ``common/data/packed.py`` for the layout. Resumable: rerun the same command
(it also retries the images an earlier run skipped). ``--print-config`` prints the effective settings and packs
nothing. Mistakes give one ``error:`` line on stderr and exit code 2; Ctrl-C gives one line and exit code 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from common.cli import add_print_config, command_parser, log_to_stderr, print_config, run_command
from common.data.packed import PACK_DTYPES, pack_manifest
from common.data.volume import INTENSITY_MODES, PreprocessConfig
from common.errors import UsageError

RESUME = "finished shards are kept, rerun the same command to resume"


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("python -m pretrain.pack", __doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="manifest CSV (path column; relative to the CSV)")
    p.add_argument("--out", required=True, help="output folder (finished shards in it are kept)")
    p.add_argument("--spacing", type=float, nargs="+", required=True, help="voxel size in mm: one value or three")
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("D", "H", "W"), help="packed volume size")
    p.add_argument("--intensity", choices=INTENSITY_MODES, required=True, help="common's intensity normalisation")
    p.add_argument("--dtype", choices=PACK_DTYPES, default="float16", help="uint8 needs volumes in [0, 1]")
    p.add_argument("--no-crop-foreground", action="store_true", help="keep the field of view (template grids)")
    p.add_argument("--per-shard", type=int, default=256, help="volumes per shard file")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    add_print_config(p, "the effective settings")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr(fmt="%(name)s: %(message)s")
    spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    if len(spacing) != 3:
        raise UsageError(f"--spacing takes one value or three, got {len(args.spacing)}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    cfg = PreprocessConfig(
        spacing=tuple(spacing),
        shape=tuple(args.shape),
        intensity=args.intensity,
        crop_foreground=not args.no_crop_foreground,
    )
    if args.print_config:
        settings = {"manifest": args.manifest, "out": args.out, "preprocess": dataclasses.asdict(cfg)}
        return print_config({**settings, "dtype": args.dtype, "per_shard": args.per_shard, "workers": args.workers})
    print(pack_manifest(args.manifest, args.out, cfg, args.dtype, args.per_shard, args.workers))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C keeps the finished shards (each written atomically): the next run goes on from them
    return run_command(lambda: run(argv), RESUME)


if __name__ == "__main__":
    sys.exit(main())
