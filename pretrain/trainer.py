"""The pre-training loop: batches in, DeepSpeed steps, logs, checkpoints and the encoder export out.

Per micro-batch: read (timed: the data-wait share), forward through the engine, agree across ranks whether the
loss is finite (skip and count it if not), backward, step. Per optimizer step: the objective's ``after_step``
hook, scalars every ``log_every``, MAE slices every ``image_every``, a checkpoint every ``checkpoint_every``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.checkpoint import FOLDER_WEIGHTS
from common.distributed import is_rank_zero
from common.errors import DataError, NeurotransferError, TrainingDiverged
from common.export import export_folder, link_file
from common.io import atomic_write
from common.tb import RankZeroWriter, progress
from pretrain.corpora import CORPORA
from pretrain.corpora.stream import StreamPosition
from pretrain.engine import Engine
from pretrain.objectives import OBJECTIVES
from pretrain.objectives.base import Objective

log = logging.getLogger(__name__)
TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def card_descriptions(cfg) -> dict[str, str]:
    """How the export's model card words the run's objective and corpus: the descriptions registered with them."""
    described = {"objective": OBJECTIVES[cfg.objective.name].description, "corpus": CORPORA[cfg.corpus].description}
    return {field: words for field, words in described.items() if words is not None}


def new_window() -> dict[str, Any]:
    """Accumulators for the scalars of one logging interval."""
    return {"loss": torch.zeros(()), "micro": 0, "volumes": 0, "wait": 0.0, "start": time.perf_counter()}


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Seed of the torch RNG for one micro-step (masking, dropout): reproducible after a resume."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step) % 2**63


class Trainer:
    """Runs ``objective`` under ``engine`` on the stream ``make_loader(position)`` for ``cfg.train.steps`` steps."""

    def __init__(
        self,
        cfg,
        out: Path,
        engine: Engine,
        objective: Objective,
        make_loader: Callable[[StreamPosition], DataLoader],
        export_metadata: dict[str, Any],
    ):
        self.cfg, self.out, self.engine, self.objective = cfg, Path(out), engine, objective
        self.make_loader = make_loader
        self.export_metadata = export_metadata
        self.ckpt_dir = self.out / "checkpoints"
        self.step = 0
        self.position = StreamPosition()
        self.nonfinite = 0  # skipped micro-steps, whole run
        self.streak = 0  # ... in a row

    # ---- resume ------------------------------------------------------------------------------------------
    def resume(self, folder: Path, tag: str | None = None) -> str:
        """Restore engine state and the data stream position from a checkpoint; returns the tag."""
        tag, client = self.engine.load(folder, tag)
        self.step = int(client["step"])
        self.nonfinite = int(client.get("nonfinite", 0))
        states = client["data"]
        if len(states) == self.engine.world_size:
            self.position = StreamPosition.from_state(states[self.engine.rank])
        else:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: data streams restart",
                tag,
                len(states),
                self.engine.world_size,
            )
        if self.engine.global_step != self.step:
            raise NeurotransferError(
                f"{folder}/{tag}: DeepSpeed is at step {self.engine.global_step} but the "
                f"checkpoint records step {self.step}; the checkpoint is inconsistent"
            )
        log.info("resumed from %s at step %d", folder / tag, self.step)
        return tag

    def _truncate_metrics(self) -> None:
        """Drop metrics.jsonl lines of steps after the start (all of them on a fresh start, e.g. after a kill
        before the first checkpoint): they are about to be trained again."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            with atomic_write(path) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in lines))

    # ---- loop --------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, engine, rank = self.cfg.train, self.engine, self.engine.rank
        if is_rank_zero():
            self._truncate_metrics()
        writer = RankZeroWriter(self.out / "tb", purge_step=self.step or None)
        loader = self.make_loader(self.position)
        batches = iter(loader)
        bar = progress(total=cfg.steps, initial=self.step, desc="pretrain")
        window = new_window()
        last_loss = float("nan")
        waited, started = 0.0, time.perf_counter()  # whole run: the data-wait share in the result line
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batch = next(batches)
                wait = time.perf_counter() - t0
                window["wait"] += wait
                waited += wait
                self.position.update(batch)
                self._check_bad_share()
                inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
                torch.manual_seed(step_seed(cfg.seed, rank, self.position.batches))
                out = engine(inputs)
                if not engine.all_finite(out["loss"]):
                    self._skip_nonfinite()
                    continue
                self.streak = 0
                engine.backward(out["loss"])
                boundary = engine.is_boundary()
                log_now = boundary and ((self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps)
                grad_norm = engine.grad_norm() if log_now else None
                lr = engine.lr  # the lr this step applies; the schedule advances inside step()
                engine.step()
                window["loss"] = window["loss"] + out["loss"].detach().float()  # on device: no sync
                window["micro"] += 1
                window["volumes"] += int(batch["_batch"].numel())
                if not boundary:
                    continue
                self.step += 1
                bar.update(1)
                self.objective.after_step(self.step, cfg.steps)
                if log_now:
                    last_loss = self._log(writer, window, grad_norm, lr)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    window = new_window()
                tag = self.objective.image_tag
                if tag and cfg.image_every and self.step % cfg.image_every == 0:
                    for name, image in self.objective.images(engine.to_device(inputs), out).items():
                        writer.add_image(f"{tag}/{name}", image.float().cpu(), self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.checkpoint()
            elapsed = time.perf_counter() - started  # before the final checkpoint: training steps only
            self.checkpoint()
        finally:
            bar.close()
            writer.close()
            del batches  # stops the DataLoader workers
        return {
            "step": self.step,
            "loss": last_loss,
            "nonfinite": self.nonfinite,
            "bad_items": self.position.skipped,
            "data_wait_share": round(waited / max(elapsed, 1e-9), 4),
        }

    def _skip_nonfinite(self) -> None:
        self.nonfinite += 1
        self.streak += 1
        log.warning(
            "non-finite loss at step %d (micro-batch %d): step skipped (%d in a row, %d in the run)",
            self.step,
            self.position.batches,
            self.streak,
            self.nonfinite,
        )
        if self.streak >= self.cfg.train.max_nonfinite_streak:
            raise TrainingDiverged(
                f"the loss was NaN/Inf for {self.streak} micro-batches in a row at step {self.step}; "
                "training diverged. Lower optim.lr, raise optim.warmup_steps, or use "
                f"train.precision=fp32, then {self._restart_hint()}"
            )

    def _restart_hint(self) -> str:
        """Where to go on from: the last checkpoint written, if there is one."""
        latest = self.ckpt_dir / "latest"
        if latest.is_file() and (self.ckpt_dir / latest.read_text().strip()).is_dir():
            return f"resume from its last checkpoint {self.ckpt_dir / latest.read_text().strip()} (--resume auto)"
        return f"start again: no checkpoint was written yet in {self.ckpt_dir}"

    def _check_bad_share(self) -> None:
        pos, data = self.position, self.cfg.data
        tried = pos.items + pos.skipped
        if tried >= data.min_items_for_bad_share and pos.bad_share() > data.max_bad_share:
            raise DataError(
                None,
                f"corpus {self.cfg.corpus}: {pos.skipped} of {tried} items "
                f"({pos.bad_share():.0%}) were unreadable or too short, more than "
                f"data.max_bad_share={data.max_bad_share:.0%}; see the warnings above for "
                "which files, fix or remove them",
            )

    def _log(self, writer: RankZeroWriter, window: dict[str, Any], grad_norm: float | None, lr: float) -> float:
        engine = self.engine
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        loss = engine.mean_over_ranks(window["loss"] / max(1, window["micro"]))
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/volumes_per_s": window["volumes"] * engine.world_size / elapsed,
            "train/data_wait_share": window["wait"] / elapsed,
            "train/memory_peak_gb": engine.peak_memory_gb(),
            "train/nonfinite_skipped": float(self.nonfinite),
            "data/bad_items": float(self.position.skipped),
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        for name, value in scalars.items():
            writer.add_scalar(name, value, self.step)
        writer.flush()
        if is_rank_zero():
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **{k.split("/")[1]: v for k, v in scalars.items()}}) + "\n")
        return loss

    # ---- checkpoints and export --------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """DeepSpeed checkpoint (all ranks' stream positions in its client state), then the encoder export."""
        tag = tag_for(self.step)
        if (
            (self.ckpt_dir / tag).is_dir()
            and (self.ckpt_dir / "latest").is_file()
            and (self.ckpt_dir / "latest").read_text().strip() == tag
        ):
            return  # already written (the final step fell on a checkpoint step)
        states = self.engine.all_gather_object(self.position.state_dict())
        client = {"step": self.step, "data": states, "nonfinite": self.nonfinite, "corpus": self.cfg.corpus}
        self.engine.save(self.ckpt_dir, tag, client)
        self.export()
        if is_rank_zero():
            self._prune()
        self.engine.barrier()

    def _prune(self) -> None:
        keep = max(1, self.cfg.train.keep_checkpoints)
        tags = sorted(p for p in self.ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def export(self) -> Path:
        """``export/``: the export folder (``model.safetensors``, ``config.json``, the ``README.md`` card with
        the loss so far), written by rank 0, each file atomically; ``encoder.safetensors`` names the same
        weights for readers of the single file."""
        folder = self.out / "export"
        encoder = self.objective.encoder
        with self.engine.full_parameters(encoder):
            if is_rank_zero():
                batch = self.cfg.data.batch_size * self.cfg.optim.accumulation_steps * self.engine.world_size
                meta = {**self.export_metadata, "step": self.step, "images_seen": self.step * batch}
                export_folder(encoder, folder, meta, self.out / "metrics.jsonl", card_descriptions(self.cfg))
                link_file(folder / FOLDER_WEIGHTS, folder / "encoder.safetensors")
        return folder / "encoder.safetensors"
