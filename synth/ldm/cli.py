"""``ldm-train`` and ``ldm-sample``: argparse subcommands for ``python -m synth`` and ``python -m synth.ldm``.

python -m synth ldm-train --manifest train.csv --out runs/ldm --config configs/synth/ldm_quickstart.yaml
python -m synth ldm-sample --model runs/ldm --n 100 --out corpora/ldm --age 70 --sex F --ddim-steps 50
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from common.cli import add_print_config, command_parser, log_to_stderr, print_config, run_command
from common.config import load_config, parse_with_overrides, to_object
from common.errors import ConfigError
from common.precision import DEVICES, PRECISIONS, resolve_device, resolve_precision
from synth.ldm.config import LDMTrainConfig
from synth.ldm.covariates import sex_code


def add_ldm_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ldm-train`` and ``ldm-sample`` to a subparser set; each sets ``func`` to its handler."""
    t = subparsers.add_parser(
        "ldm-train",
        help="train a conditional latent diffusion model (autoencoder, then diffusion UNet)",
        description="Train the autoencoder, then the diffusion UNet conditioned on sex, age, ventricular and "
        "brain volume; writes config.yaml, tb/, checkpoints/, metrics.jsonl and export/ to --out.",
    )
    t.add_argument("--manifest", help="training manifest CSV (sets data.manifest)")
    t.add_argument("--out", required=True, type=Path, help="run folder")
    t.add_argument(
        "--config",
        type=Path,
        help="YAML recipe, e.g. configs/synth/ldm_quickstart.yaml (with --resume: defaults to OUT/config.yaml)",
    )
    t.add_argument("--resume", action="store_true", help="continue the checkpoints in --out")
    add_print_config(t)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train_diffusion.steps=10")
    t.set_defaults(func=run_ldm_train)

    s = subparsers.add_parser(
        "ldm-sample",
        help="sample NIfTI volumes + manifest.csv from a trained LDM or the public MONAI bundle",
        description="Covariates not given are drawn per volume (from the training covariates, or uniformly "
        "the bundle, whose units are its own [0, 1] scale). Rerunning continues a partial --out.",
    )
    s.add_argument(
        "--model",
        required=True,
        type=Path,
        help="ldm-train run folder, model folder (ldm.json) or MONAI bundle folder",
    )
    s.add_argument("--n", required=True, type=int, help="number of volumes")
    s.add_argument("--out", required=True, type=Path, help="corpus folder (images/ + manifest.csv)")
    s.add_argument("--age", type=float, help="years (bundle: its [0, 1] scale)")
    s.add_argument("--sex", help="F or M (or 0 / 1)")
    s.add_argument("--ventricles", type=float, help="ventricular volume, mL (bundle: [0, 1])")
    s.add_argument("--brain", type=float, help="brain volume, mL (bundle: [0, 1])")
    s.add_argument("--seed", type=int, default=0, help="volume i depends only on (seed, i)")
    s.add_argument("--ddim-steps", type=int, help="denoising steps (default: the model's, 50 for the bundle)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--device", default="auto", help=f"{' | '.join(DEVICES)} | cuda:N")
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast or fp32 (auto: bf16 where native)",
    )
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_print_config(s, "the effective settings")
    s.set_defaults(func=run_ldm_sample)


def run_ldm_train(args: argparse.Namespace) -> int:
    from synth.ldm.train import train_ldm  # heavy imports only when the command runs

    config = args.config
    if config is None and args.resume and (args.out / "config.yaml").is_file():
        config = args.out / "config.yaml"
    overrides = list(args.overrides)
    if args.manifest:
        overrides.append(f"data.manifest={Path(args.manifest).expanduser().resolve()}")
    cfg: LDMTrainConfig = to_object(load_config(LDMTrainConfig, config, overrides))
    if args.print_config:
        return print_config(cfg)
    export = train_ldm(cfg, args.out, resume=args.resume)
    print(f"LDM written to {export}")
    return 0


def run_ldm_sample(args: argparse.Namespace) -> int:
    from synth.ldm.load import load_model  # heavy imports only when the command runs
    from synth.ldm.sampling import sample_to_directory

    fixed = {"age": args.age, "ventricle_volume": args.ventricles, "brain_volume": args.brain}
    if args.sex is not None:
        try:
            fixed["sex"] = sex_code(args.sex)
        except ValueError as e:
            raise ConfigError(f"--sex: {e}") from None
    device = resolve_device(args.device, key="--device")
    precision = resolve_precision(args.precision, device, key="--precision")
    if args.print_config:  # no config file: the command's own settings, as resolved
        settings = {"model": str(args.model), "n": args.n, "out": str(args.out), "seed": args.seed}
        settings.update(covariates=fixed, ddim_steps=args.ddim_steps, batch_size=args.batch_size)
        return print_config({**settings, "device": str(device), "precision": precision})
    model = load_model(args.model)
    manifest = sample_to_directory(
        model,
        args.out,
        n=args.n,
        seed=args.seed,
        fixed=fixed,
        ddim_steps=args.ddim_steps,
        batch_size=args.batch_size,
        device=device,
        precision=precision,
        show_progress=not args.no_progress,
    )
    print(f"{args.n} volumes listed in {manifest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m synth.ldm``: the two LDM commands on their own."""
    parser = command_parser("python -m synth.ldm", __doc__.splitlines()[0])
    add_ldm_commands(parser.add_subparsers(dest="command", required=True))

    def run() -> int:
        args = parse_with_overrides(parser, argv)
        log_to_stderr(fmt="%(levelname)s %(name)s: %(message)s")
        return args.func(args)

    return run_command(run, "rerun the same command (ldm-train with --resume) to continue")
