"""Self-supervised pre-training, under DeepSpeed.

    deepspeed pretrain/main.py --corpus synthmri --config configs/pretrain/quickstart.yaml
    deepspeed --num_accelerators 2 pretrain/main.py --corpus video --config … data.video.paths=[clips/]
    python pretrain/main.py --corpus synthmri --config configs/pretrain/quickstart.yaml   # a world of one

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

if __package__ in (None, ""):  # run as a script (`deepspeed pretrain/main.py`): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf

from common.checkpoint import manifest_hash
from common.config import load_config, save_config
from common.distributed import seed_everything
from common.errors import CheckpointError, ConfigError, NeurotransferError
from common.models import create_backbone
from pretrain.config import CORPORA, PretrainConfig

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", choices=CORPORA, help="pre-training corpus (overrides the config's corpus)"
    )
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("--output", help="run directory (default runs/pretrain-<corpus>-<objective>)")
    parser.add_argument(
        "--resume", help="'auto' (latest checkpoint in --output, if any) or a checkpoint folder"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.steps=50")
    deepspeed.add_config_arguments(parser)  # --deepspeed, --deepspeed_config (JSON in configs/deepspeed/)
    return parser.parse_args(argv)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        force=True,
    )


def export_metadata(cfg) -> dict:
    """Provenance recorded with the exported encoder (``arch`` and the package version are added on
    export)."""
    d = cfg.data
    medical_used = cfg.corpus == "medical" or (cfg.corpus == "mixed" and d.mixed.medical > 0)
    # synthmri and video volumes are scaled to [0, 1] like common's "percentile" normalisation
    intensity = d.medical.intensity if cfg.corpus == "medical" else "percentile"
    hashed = manifest_hash(d.medical.manifest) if medical_used and d.medical.manifest else None
    if cfg.corpus == "packed":  # the pack records its preprocessing and its source manifest
        from common.data.packed import PackedVolumes

        pack = PackedVolumes(d.packed.directory).settings
        intensity, hashed = pack["preprocess"]["intensity"], pack["source_hash"]
    return {
        "input_size": list(d.input_size),
        "spacing": list(d.spacing),
        "intensity": intensity,
        "corpus": cfg.corpus,
        "objective": cfg.objective.name,
        "manifest_hash": hashed,
    }


def find_resume(out: Path, resume: str | None) -> tuple[Path, str | None] | None:
    """(checkpoint folder, tag or None for ``latest``) to resume from, or None for a fresh run."""
    ckpt = out / "checkpoints"
    if resume is None:
        if (ckpt / "latest").is_file():
            raise ConfigError(
                f"{out} already holds checkpoints; pass --resume auto to continue that run, or "
                "choose another --output"
            )
        return None
    if resume == "auto":
        return (ckpt, None) if (ckpt / "latest").is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, None
    if path.is_dir() and any(path.glob("mp_rank_*_model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(
        f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file) nor a checkpoint tag"
    )


def run(args: argparse.Namespace) -> dict:
    from pretrain.corpora import CorpusStream, build_source, make_loader
    from pretrain.engine import Engine, build_ds_config, init_distributed, resolve_precision
    from pretrain.objectives import NEEDS_VIEWS, build_objective
    from pretrain.trainer import Trainer
    from pretrain.views import TwoViews

    overrides = list(args.overrides) + ([f"corpus={args.corpus}"] if args.corpus else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    rank, world = init_distributed()
    _setup_logging(rank)
    out = Path(args.output or f"runs/pretrain-{cfg.corpus}-{cfg.objective.name}")
    resume_from = find_resume(out, args.resume)
    precision = resolve_precision(cfg.train.precision)
    if cfg.train.steps < 1 or cfg.data.batch_size < 1:
        raise ConfigError("train.steps and data.batch_size must be >= 1")

    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    encoder = create_backbone(
        cfg.model.backbone,
        img_size=tuple(cfg.data.input_size),
        in_chans=1,
        **OmegaConf.to_container(cfg.model.kwargs),
    )
    if hasattr(encoder, "attn_backend"):
        encoder.attn_backend = cfg.model.attn_backend
    encoder.set_grad_checkpointing(cfg.model.grad_checkpointing)
    objective = build_objective(cfg.objective, encoder)
    source = build_source(cfg)
    views = (
        TwoViews(cfg.objective.contrastive, cfg.data.input_size) if NEEDS_VIEWS[cfg.objective.name] else None
    )

    ds_config = build_ds_config(cfg, args.deepspeed_config, world, precision)
    engine = Engine(objective, ds_config)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
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
        from pretrain.corpora.synthmri_device import DeviceSynthStream, generation_device

        on_device = generation_device(cfg.data.synthmri.device, engine.device)
        if on_device is not None and views is not None:
            raise ConfigError("data.synthmri.device=cuda makes MAE batches; contrastive views need device=cpu")

    def loader_for(position):
        if on_device is not None:  # generated in this process, a batch at a time, on the training device
            start = position.next_index.get(0, 0)
            return DeviceSynthStream(source, cfg.train.seed, rank, world, cfg.data.batch_size, on_device, start)
        stream = CorpusStream(source, cfg.train.seed, rank, world, views, **position.stream_kwargs())
        return make_loader(stream, cfg.data.batch_size, cfg.data.num_workers, cfg.data.prefetch_factor)

    trainer = Trainer(cfg, out, engine, objective, loader_for, export_metadata(cfg))
    if resume_from is not None:
        trainer.resume(*resume_from)
    result = trainer.run()
    result["precision"] = precision
    result["export"] = str(out / "export" / "encoder.safetensors")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except NeurotransferError as e:
        rank = os.environ.get("RANK", "0")
        print(f"error [rank {rank}]: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
