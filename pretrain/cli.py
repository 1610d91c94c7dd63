"""Self-supervised pre-training, under DeepSpeed: this module parses the command line and wires the run.

    deepspeed pretrain/main.py --corpus synthmri --config configs/pretrain/quickstart.yaml
    deepspeed --module pretrain --corpus synthmri --config configs/pretrain/quickstart.yaml   # the same
    deepspeed --num_accelerators 2 pretrain/main.py --corpus video --config … data.video.paths=[clips/]
    python -m pretrain --corpus synthmri --config configs/pretrain/quickstart.yaml   # a world of one
    python -m pretrain --config configs/pretrain/quickstart.yaml --print-config     # the config, as YAML

Run directory (``--out``): ``config.yaml``, ``deepspeed.json``, ``tb/``, ``checkpoints/`` (DeepSpeed),
``export/`` (the export folder ``finetune`` loads), ``metrics.jsonl``. ``--resume auto`` continues from the
last checkpoint in it, if any (``pretrain.resume``). A mistake ends with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.cli import add_print_config, add_renamed_option, command_parser, log_to_stderr, print_config, run_command
from common.config import load_config, parse_with_overrides, save_config
from common.distributed import seed_everything
from common.errors import ConfigError
from common.io import atomic_write
from common.models import create_backbone
from pretrain.config import PretrainConfig, validate
from pretrain.corpora import CORPORA, CorpusStream, build_source, make_loader, require_covariates, synthmri_device
from pretrain.corpora.weak_labels import WeakLabels
from pretrain.engine import Engine, add_launcher_arguments, build_ds_config, init_distributed
from pretrain.objectives import build_objective
from pretrain.precision import run_precision
from pretrain.provenance import export_metadata
from pretrain.resume import resume_point
from pretrain.trainer import Trainer
from pretrain.views import TwoViews

log = logging.getLogger("pretrain")
RESUME = "rerun with --resume auto to continue from the last checkpoint"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser("python -m pretrain", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=CORPORA, help="pre-training corpus (overrides the config's corpus)")
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("--out", help="run directory (default runs/pretrain-<corpus>-<objective>)")
    add_renamed_option(parser, "--output", "--out")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in --out, if any) or a checkpoint folder")
    add_print_config(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.steps=50")
    add_launcher_arguments(parser)  # --deepspeed, --deepspeed_config (JSON in configs/deepspeed/)
    return parse_with_overrides(parser, argv)


def load(args: argparse.Namespace) -> DictConfig:
    """The run's config: defaults ⊕ ``--config`` ⊕ ``key=value`` ⊕ ``--corpus``, checked."""
    overrides = list(args.overrides) + ([f"corpus={args.corpus}"] if args.corpus else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    validate(cfg)
    return cfg


def _setup_logging(rank: int) -> None:
    fmt = f"%(asctime)s [rank {rank}] %(name)s: %(message)s"
    log_to_stderr(logging.INFO if rank == 0 else logging.WARNING, fmt, force=True)


def build_model(cfg) -> nn.Module:
    """The objective (``pretrain.objectives``) around a new encoder, alike on every rank."""
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    encoder = create_backbone(
        cfg.model.backbone,
        img_size=tuple(cfg.data.shape),
        in_chans=1,
        **OmegaConf.to_container(cfg.model.kwargs, resolve=True),
    )
    if hasattr(encoder, "attn_backend"):
        encoder.attn_backend = cfg.model.attn_backend
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return build_objective(cfg.objective, encoder)


def loaders(cfg, source, objective, engine: Engine, rank: int, world: int) -> Callable:
    """``loader_for(position)``: this rank's batches from a stream position on (the trainer resumes with it)."""
    views = TwoViews(cfg.objective.contrastive, cfg.data.shape) if objective.needs_views else None
    on_device = None
    if cfg.corpus == "synthmri":
        on_device = synthmri_device.generation_device(cfg.data.synthmri.device, engine.device)
        if on_device is not None and views is not None:
            raise ConfigError("data.synthmri.device=cuda makes MAE batches; contrastive views need device=cpu")

    def loader_for(position):
        if on_device is not None:  # generated in this process, a batch at a time, on the training device
            return synthmri_device.DeviceSynthStream(
                source, cfg.train.seed, rank, world, cfg.data.batch_size, on_device, position.batches
            )
        stream = CorpusStream(
            source,
            cfg.train.seed,
            rank,
            world,
            views,
            cfg.data.batch_size,
            covariates=objective.needs_covariates,
            labels=WeakLabels.from_config(cfg),
            **position.stream_kwargs(),
        )
        return make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor)

    return loader_for


def run(cfg, args: argparse.Namespace) -> dict:
    """Train ``cfg`` into the run folder ``--out``; returns the trainer's summary with precision and export."""
    rank, world = init_distributed()
    _setup_logging(rank)
    out = Path(args.out or f"runs/pretrain-{cfg.corpus}-{cfg.objective.name}")
    resume_from = resume_point(cfg, out, args.resume)
    objective = build_model(cfg)
    source = build_source(cfg)
    require_covariates(source, objective.needs_covariates)
    precision = run_precision(cfg, objective)  # checked before it trains; auto: bf16 only where it passes
    ds_config = build_ds_config(cfg, args.deepspeed_config, world, precision)
    engine = Engine(objective, ds_config)
    log.info(
        "corpus %s, objective %s, %s, %d rank(s), precision %s, ZeRO stage %d → %s",
        cfg.corpus,
        cfg.objective.name,
        cfg.model.backbone,
        world,
        precision,
        engine.zero_stage,
        out,
    )
    loader_for = loaders(cfg, source, objective, engine, rank, world)
    trainer = Trainer(cfg, out, engine, objective, loader_for, {**export_metadata(cfg), "precision": precision})
    if resume_from is not None:
        trainer.resume(*resume_from)  # before anything is written: a checkpoint that cannot load changes nothing
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        with atomic_write(out / "deepspeed.json") as tmp:
            tmp.write_text(json.dumps(ds_config, indent=2))
    result = trainer.run()
    result["precision"] = precision
    result["export"] = str(out / "export" / "encoder.safetensors")
    return result


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cfg = load(args)
    if args.print_config:
        return print_config(cfg)
    result = run(cfg, args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(lambda: _main(argv), RESUME)
