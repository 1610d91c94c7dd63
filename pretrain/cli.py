"""Self-supervised pre-training, under DeepSpeed.

    deepspeed pretrain/main.py --corpus synthmri --config configs/pretrain/quickstart.yaml
    deepspeed --module pretrain --corpus synthmri --config configs/pretrain/quickstart.yaml   # the same
    deepspeed --num_accelerators 2 pretrain/main.py --corpus video --config … data.video.paths=[clips/]
    python -m pretrain --corpus synthmri --config configs/pretrain/quickstart.yaml   # a world of one

Run directory (``--output``): ``config.yaml``, ``deepspeed.json``, ``tb/``, ``checkpoints/`` (DeepSpeed),
``export/encoder.safetensors`` (what ``finetune`` loads), ``metrics.jsonl``. ``--resume auto`` continues from
the last checkpoint in it, if any.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
from omegaconf import OmegaConf

from common.config import load_config, parse_with_overrides, save_config
from common.data.packed import PackedVolumes
from common.distributed import seed_everything
from common.errors import USER_FACING, CheckpointError, ConfigError, end_of_command
from common.io import atomic_write, file_hash
from common.models import create_backbone
from pretrain.config import CORPORA, PretrainConfig, validate
from pretrain.corpora import CorpusStream, build_source, make_loader, require_covariates, synthmri_device
from pretrain.engine import Engine, build_ds_config, init_distributed, resolve_run_precision, train_precision
from pretrain.objectives import build_objective
from pretrain.trainer import Trainer
from pretrain.views import TwoViews

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=CORPORA, help="pre-training corpus (overrides the config's corpus)")
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("--output", help="run directory (default runs/pretrain-<corpus>-<objective>)")
    parser.add_argument("--resume", help="'auto' (latest checkpoint in --output, if any) or a checkpoint folder")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.steps=50")
    deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config (JSON in configs/deepspeed/)
    return parse_with_overrides(parser, argv)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        force=True,
    )


# What each corpus feeds the model, as the nearest of common's intensity modes and in words: synthmri and video
# are not normalised by common.data but arrive in [0, 1], as common's "percentile" mode gives.
SOURCE_SCALING = {"synthmri": ("percentile", "generated on [0, 1]"), "video": ("percentile", "grey (luma) / 255")}


def export_metadata(cfg) -> dict:
    """Provenance recorded with the exported encoder (``arch`` and the package version are added on export).
    ``sources`` holds each corpus the run drew from with its weight and real preprocessing; ``intensity`` is
    their shared mode, or ``"mixed"`` when a mixed corpus combines different ones."""
    d = cfg.data
    weights = (
        {name: float(getattr(d.mixed, name)) for name in ("synthmri", "medical", "video")}
        if cfg.corpus == "mixed"
        else {cfg.corpus: 1.0}
    )
    sources, hashed = {}, None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        if name == "medical":
            mode, how = d.medical.intensity, f"common.data {d.medical.intensity} at {list(d.spacing)} mm"
            hashed = file_hash(d.medical.manifest) if d.medical.manifest else None
        elif name == "packed":  # the pack records its preprocessing and its source manifest
            pack = PackedVolumes(d.packed.directory).settings
            mode, how = pack["preprocess"]["intensity"], f"packed shards of {d.packed.directory}"
            hashed = pack["source_hash"]
        else:
            mode, how = SOURCE_SCALING[name]
        sources[name] = {"weight": weight, "intensity": mode, "preprocessing": how}
    modes = {s["intensity"] for s in sources.values()}
    return {
        "input_size": list(d.input_size),
        "spacing": list(d.spacing),
        "intensity": modes.pop() if len(modes) == 1 else "mixed",
        "sources": sources,
        "corpus": cfg.corpus,
        "objective": cfg.objective.name,
        "steps": cfg.train.steps,
        "manifest_hash": hashed,
    }


def find_resume(out: Path, resume: str | None) -> tuple[Path, str | None] | None:
    """(checkpoint folder, tag or None for ``latest``) to resume from, or None for a fresh run."""
    ckpt = out / "checkpoints"
    if resume is None:
        if (ckpt / "latest").is_file():
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume auto to continue that run, or choose another --output"
            )
        return None
    if resume == "auto":
        return (ckpt, None) if (ckpt / "latest").is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, None
    if path.is_dir() and any(path.glob("mp_rank_*_model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file) nor a checkpoint tag")


# Settings a resumed run may not change: they decide the model's shapes or the data it has been trained on.
# (Loader knobs, logging, the step budget and the optimizer may change on resume.)
RESUME_FIXED = ("corpus", "model.backbone", "model.kwargs", "objective", "data")
RESUME_FREE = ("data.num_workers", "data.prefetch_factor", "data.max_bad_share", "data.min_items_for_bad_share")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_resume_config(cfg, saved: Path) -> None:
    """Refuse a resume whose architecture or data settings differ from the run's saved ``config.yaml``,
    naming the keys, before anything is written."""
    if not saved.is_file():
        return
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(saved)))
    except Exception as e:  # a YAML error, a file that is no mapping
        raise ConfigError(f"{saved}: cannot read the run's saved config ({e})") from None
    # resolve: the loaded config holds user strings escaped (common.config), the saved YAML holds them as text
    new = _flat(
        OmegaConf.to_container(OmegaConf.structured(cfg) if not OmegaConf.is_config(cfg) else cfg, resolve=True)
    )
    fixed = lambda k: k.startswith(RESUME_FIXED) and not k.startswith(RESUME_FREE)
    differ = sorted(k for k in set(old) | set(new) if fixed(k) and old.get(k) != new.get(k))
    if differ:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{saved}: the run being resumed was trained with other settings ({changes}); resume with the "
            "same settings, or start a new run in another --output"
        )


def run(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides) + ([f"corpus={args.corpus}"] if args.corpus else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    validate(cfg)
    rank, world = init_distributed()
    _setup_logging(rank)
    out = Path(args.output or f"runs/pretrain-{cfg.corpus}-{cfg.objective.name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --output is a file, not a run folder; choose a folder path")
    resume_from = find_resume(out, args.resume)
    if resume_from is not None:
        check_resume_config(cfg, resume_from[0].parent / "config.yaml")
    precision = resolve_run_precision(cfg.train.precision)

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    encoder = create_backbone(
        cfg.model.backbone,
        img_size=tuple(cfg.data.input_size),
        in_chans=1,
        **OmegaConf.to_container(cfg.model.kwargs, resolve=True),
    )
    if hasattr(encoder, "attn_backend"):
        encoder.attn_backend = cfg.model.attn_backend
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
    objective = build_objective(cfg.objective, encoder)
    source = build_source(cfg)
    require_covariates(source, objective.needs_covariates)
    views = TwoViews(cfg.objective.contrastive, cfg.data.input_size) if objective.needs_views else None

    if precision == "bf16":  # checked before it trains; auto: kept only where it passes and is not slower
        keys = ("view1", "view2") if objective.needs_views else ("image",)
        example = {k: torch.rand(cfg.data.batch_size, 1, *cfg.data.input_size) for k in keys}
        example.update({c: 20 + 60 * torch.rand(cfg.data.batch_size) for c in objective.needs_covariates})
        precision, why = train_precision(objective, example, cfg.train.precision)
        log.info("train.precision %s -> %s: %s", cfg.train.precision, precision, why)
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
            **position.stream_kwargs(),
        )
        return make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_factor)

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except USER_FACING as e:
        line, code = end_of_command(e, "rerun with --resume auto to continue from the last checkpoint")
        rank = os.environ.get("RANK", "0")
        print(line.replace("error:", f"error [rank {rank}]:", 1), file=sys.stderr)
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0
