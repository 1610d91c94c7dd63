"""The whole pre-training-source comparison in one command (``python -m experiment --config …``).

Stages, each resumable and skipped when its outputs exist:

1. ``corpus``   unlabelled synthetic MRI for pre-training (``python -m synth generate``)
2. ``cohorts``  labelled AD / PD / brain-age cohorts over K scanner sites (``python -m synth cohort``)
3. ``video``    synthetic clips of moving, deforming shapes (``synth.video``; the video corpus, no downloads)
4. ``pretrain`` one DeepSpeed run per entry of ``pretrain`` (``python -m pretrain``), each exporting an encoder
5. ``finetune`` scratch vs every pre-trained init on every task and training fraction (``finetune.grid``),
   with subject-level k-fold CV; then the same grid tested on held-out sites
6. ``report``   ``report.md``: the tables, learning curves and out-of-site results

The synth and pretrain stages run as child processes through the same CLIs a user runs (so DeepSpeed starts and
ends cleanly, and each child resumes on its own terms); fine-tuning runs in this process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.checkpoint import read_export_metadata
from common.config import load_config, save_config, to_object
from common.errors import ConfigError, NeurotransferError
from common.io import atomic_write_text
from common.models import list_backbones
from experiment.config import ExperimentConfig, PretrainSpec, validate
from experiment.report import write_experiment_report
from finetune.config import GridConfig, InitEntry
from finetune.config import validate as validate_run
from finetune.grid import expand, run_grid
from pretrain.config import PretrainConfig
from pretrain.config import validate as validate_pretrain
from synth.config import SynthConfig
from synth.video import write_synthetic_videos

log = logging.getLogger(__name__)

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]


def _child(cmd: list[str], log_file: Path) -> None:
    """Run a CLI as a child process; its output goes to the terminal and to ``log_file``."""
    log.info("$ %s", " ".join(cmd))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # each stage is a job of its own: a distributed world this process belongs to (a launcher's, or one set up
    # in-process before) must not leak into it, or the child would try to join it or reuse its port
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_file, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
        code = proc.wait()
    if code != 0:
        raise NeurotransferError(f"stage command failed with exit code {code}: {' '.join(cmd)} (log: {log_file})")


class Experiment:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.data = self.out / "data"
        validate(cfg)
        self.backbones = {b.label: b for b in cfg.grid.backbones}
        self.timings: dict[str, float] = {}
        self.check()

    # ------------------------------------------------------------------ checks before anything is written
    def check(self) -> None:
        """Every stage's config as the stage will load it, checked by the stage's own schema and ``validate``:
        a mistake in the last stage stops the experiment before the first writes anything."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: out_dir (--out) is a file, not a folder; choose a folder path")
        for parent in self.out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{self.out}: out_dir (--out) lies under {parent}, which is a file")
                break
        self._check_synth()
        for bb in self.cfg.grid.backbones:
            if bb.name not in list_backbones():
                raise ConfigError(f"grid.backbones: {bb.label!r} names {bb.name!r}, not one of {list_backbones()}")
        for spec in self.cfg.pretrain:
            cfg = self.pretrain_config(spec)
            try:
                validate_pretrain(cfg)
            except ConfigError as e:
                raise ConfigError(f"pretrain entry {spec.name!r} ({spec.config} + its overrides): {e}") from None
        for ood in (False, True) if self.cfg.ood else (False,):
            self._check_grid(ood)

    def _check_synth(self) -> None:
        s = self.cfg.synth
        overrides = [*s.overrides, f"spacing={s.spacing}", f"contrast={s.contrast}"]
        try:
            to_object(load_config(SynthConfig, None, overrides))
        except NeurotransferError as e:
            problem = str(e).splitlines()[0].removeprefix("command line: ")
            raise ConfigError(f"synth.overrides {list(s.overrides)}: {problem}") from None
        except Exception as e:  # OmegaConf wraps SynthConfig's own check (__post_init__): keep its message
            cause = e.__cause__ or e.__context__ or e
            raise ConfigError(f"synth.overrides {list(s.overrides)}: {str(cause).splitlines()[0]}") from None

    def _check_grid(self, ood: bool) -> None:
        """Each cell's ``RunConfig`` as ``finetune.grid`` builds it, through ``finetune.config.validate``; the
        exports do not exist yet, so the inits are checked as scratch (their paths are the experiment's own)."""
        grid = self.grid_config(ood)
        grid.inits = [InitEntry(name=e.name, spec="scratch", backbones=e.backbones) for e in grid.inits]
        # a cell's config differs between fractions and seeds only in those two (checked by validate): one of each
        grid.fractions, grid.seeds = grid.fractions[:1], grid.seeds[:1]
        where = "out-of-site" if ood else "in-site"
        for cell in expand(grid, self.grid_dir(ood)):
            try:
                validate_run(cell.cfg)
            except ConfigError as e:
                raise ConfigError(
                    f"grid ({where} cell {cell.key}): {e} (from grid.base or the backbone's overrides)"
                ) from None

    # ------------------------------------------------------------------ data
    def _synth_cmd(self, *args: str) -> list[str]:
        s = self.cfg.synth
        return [
            sys.executable,
            "-m",
            "synth",
            *args,
            "--spacing",
            str(s.spacing),
            "--workers",
            str(self.cfg.workers),
            *s.overrides,
        ]

    def corpus_dir(self) -> Path:
        return self.data / "synthmri"

    def cohort_dir(self, task: str) -> Path:
        return self.data / f"cohort_{task}"

    def video_dir(self) -> Path:
        return self.data / "video"

    def _corpus(self) -> None:
        s = self.cfg.synth
        if s.corpus_backend == "ldm":
            cmd = [
                sys.executable,
                "-m",
                "synth",
                "ldm-sample",
                "--model",
                str(s.ldm_model),
                "--n",
                str(s.corpus_n),
                "--out",
                str(self.corpus_dir()),
                "--seed",
                str(self.cfg.seed),
                "--ddim-steps",
                str(s.ldm_ddim_steps),
            ]
        else:
            cmd = self._synth_cmd(
                "generate",
                "--out",
                str(self.corpus_dir()),
                "--n",
                str(s.corpus_n),
                "--seed",
                str(self.cfg.seed),
                "--contrast",
                s.contrast,
            )
        _child(cmd, self.out / "logs" / "corpus.log")

    def _cohorts(self) -> None:
        for i, (task, spec) in enumerate(self.cfg.synth.cohorts.items()):
            # cohort seeds differ from the corpus's, so no downstream subject is a pre-training subject
            seed = 1000 * (self.cfg.seed + 1) + i
            _child(
                self._synth_cmd(
                    "cohort",
                    "--task",
                    task,
                    "--out",
                    str(self.cohort_dir(task)),
                    "--n",
                    str(spec.n),
                    "--sites",
                    str(spec.sites),
                    "--seed",
                    str(seed),
                ),
                self.out / "logs" / f"cohort_{task}.log",
            )

    def _cohorts_done(self) -> bool:
        return all(self._manifest_complete(self.cohort_dir(t), spec.n) for t, spec in self.cfg.synth.cohorts.items())

    @staticmethod
    def _manifest_complete(folder: Path, n: int) -> bool:
        manifest = folder / "manifest.csv"
        return manifest.is_file() and len(pd.read_csv(manifest)) >= n

    def _video(self) -> None:
        v = self.cfg.video
        tmp = self.video_dir().with_name("video.partial")
        write_synthetic_videos(tmp, v.count, n_frames=v.frames, height=v.height, width=v.width, seed=self.cfg.seed)
        tmp.replace(self.video_dir())  # all clips or none: a killed run re-makes them

    # ------------------------------------------------------------------ pre-training
    def pretrain_dir(self, spec: PretrainSpec) -> Path:
        return self.out / "pretrain" / spec.name

    def export_path(self, spec: PretrainSpec) -> Path:
        return self.pretrain_dir(spec) / "export" / "encoder.safetensors"

    def _recipe(self, spec: PretrainSpec):
        """The recipe with the model and input grid of the grid backbone it pre-trains (replaced, not merged: a
        recipe's own ``model.kwargs`` must not leak into the pre-trained architecture)."""
        if not Path(spec.config).is_file():
            raise ConfigError(f"pretrain entry {spec.name!r}: recipe {spec.config} not found")
        load_config(PretrainConfig, spec.config)  # the recipe's own keys and YAML, errors naming the file
        bb = self.backbones[spec.backbone]
        data = self.cfg.grid.base.data
        recipe = OmegaConf.load(spec.config)
        recipe.model = OmegaConf.merge(recipe.get("model", {}), {"backbone": bb.name})
        recipe.model.kwargs = dict(bb.kwargs)
        recipe.corpus = spec.corpus
        recipe.train = OmegaConf.merge(recipe.get("train", {}), {"seed": self.cfg.seed})
        recipe.data = OmegaConf.merge(
            recipe.get("data", {}), {"input_size": list(data.shape), "spacing": list(data.spacing)}
        )
        if spec.corpus == "synthmri":
            recipe.data.synthmri = {"directory": str(self.corpus_dir())}
        else:
            recipe.data.video = OmegaConf.merge(recipe.data.get("video", {}), {"paths": [str(self.video_dir())]})
        return recipe

    def pretrain_config(self, spec: PretrainSpec):
        """The config ``python -m pretrain`` will run for ``spec``: the recipe ⊕ the entry's overrides."""
        try:
            base = OmegaConf.merge(OmegaConf.structured(PretrainConfig), self._recipe(spec))
        except OmegaConfBaseException as e:
            raise ConfigError(f"pretrain entry {spec.name!r}: recipe {spec.config}: {e}") from None
        try:
            return load_config(base, None, spec.overrides)
        except ConfigError as e:
            problem = str(e).removeprefix("command line: ")
            raise ConfigError(f"pretrain entry {spec.name!r}: overrides {list(spec.overrides)}: {problem}") from None

    def _pretrain_recipe(self, spec: PretrainSpec) -> Path:
        """The recipe (``_recipe``), written next to the run."""
        path = self.out / "pretrain" / f"{spec.name}.yaml"
        save_config(self._recipe(spec), path)
        return path

    def _pretrain_done(self, spec: PretrainSpec) -> bool:
        """Finished = the export is of the last step (exports are also written at intermediate checkpoints)."""
        if not self.export_path(spec).is_file():
            return False
        steps = load_config(PretrainConfig, spec.config, list(spec.overrides)).train.steps
        return int(read_export_metadata(self.export_path(spec)).get("step", -1)) >= steps

    def _pretrain(self, spec: PretrainSpec) -> None:
        cmd = [
            sys.executable,
            "-m",
            "pretrain",
            "--config",
            str(self._pretrain_recipe(spec)),
            "--output",
            str(self.pretrain_dir(spec)),
            "--resume",
            "auto",
            *spec.overrides,
        ]
        _child(cmd, self.out / "logs" / f"pretrain_{spec.name}.log")

    # ------------------------------------------------------------------ fine-tuning
    def grid_config(self, ood: bool) -> GridConfig:
        grid = copy.deepcopy(self.cfg.grid)
        grid.tasks = {t: str(self.cohort_dir(t) / "manifest.csv") for t in self.cfg.synth.cohorts}
        grid.inits = [InitEntry(name="scratch", spec="scratch")] + [
            InitEntry(name=spec.name, spec=str(self.export_path(spec)), backbones=[spec.backbone])
            for spec in self.cfg.pretrain
        ]
        # downstream test images must not be in a pre-training corpus: checked by the protocol
        grid.base.protocol.pretrain_manifests = [str(self.corpus_dir() / "manifest.csv")]
        grid.base.protocol.scheme = self.cfg.in_site_scheme
        if ood:
            grid.base.protocol.scheme = "ood"
            grid.base.protocol.ood_sites = list(self.cfg.synth.ood_sites)
            grid.fractions = list(self.cfg.ood_fractions)
        grid.out_dir = str(self.grid_dir(ood))
        return grid

    def grid_dir(self, ood: bool) -> Path:
        return self.out / "finetune" / ("out_of_site" if ood else "in_site")

    def _finetune(self, ood: bool) -> None:
        run_grid(self.grid_config(ood), self.grid_dir(ood))

    # ------------------------------------------------------------------ the run
    def stages(self) -> list[Stage]:
        stages = [
            Stage("corpus", lambda: self._manifest_complete(self.corpus_dir(), self.cfg.synth.corpus_n), self._corpus),
            Stage("cohorts", self._cohorts_done, self._cohorts),
        ]
        if any(spec.corpus == "video" for spec in self.cfg.pretrain):
            stages.append(Stage("video", self.video_dir().is_dir, self._video))
        for spec in self.cfg.pretrain:
            stages.append(
                Stage(
                    f"pretrain:{spec.name}",
                    lambda spec=spec: self._pretrain_done(spec),
                    lambda spec=spec: self._pretrain(spec),
                )
            )
        stages.append(
            Stage("finetune:in_site", (self.grid_dir(False) / "results.csv").is_file, lambda: self._finetune(False))
        )
        if self.cfg.ood:
            stages.append(
                Stage(
                    "finetune:out_of_site", (self.grid_dir(True) / "results.csv").is_file, lambda: self._finetune(True)
                )
            )
        stages.append(Stage("report", lambda: False, self._report))
        return stages

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(OmegaConf.structured(self.cfg), self.out / "config.yaml")
        timings_file = self.out / "timings.json"
        if timings_file.is_file():
            self.timings = json.loads(timings_file.read_text())
        stages = self.stages()
        start = time.perf_counter()
        for i, stage in enumerate(stages, 1):
            if stage.done():
                log.info("[%d/%d] %s: done already, skipped", i, len(stages), stage.name)
                continue
            log.info(
                "[%d/%d] %s: starting (experiment time so far %s)",
                i,
                len(stages),
                stage.name,
                _hms(time.perf_counter() - start),
            )
            t0 = time.perf_counter()
            stage.run()
            self.timings[stage.name] = round(time.perf_counter() - t0, 1)
            atomic_write_text(timings_file, json.dumps(self.timings, indent=1))
            log.info("[%d/%d] %s: finished in %s", i, len(stages), stage.name, _hms(self.timings[stage.name]))
        return self.out / "report.md"

    def _report(self) -> None:
        write_experiment_report(
            self.cfg,
            self.out,
            dict(self.timings),
            {spec.name: self.pretrain_dir(spec) for spec in self.cfg.pretrain},
            {"in_site": self.grid_dir(False), "out_of_site": self.grid_dir(True)},
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or resume) the experiment; returns the path of ``report.md``."""
    return Experiment(cfg).run()
