"""The whole pre-training-source comparison in one command (``python -m experiment --config …``).

Stages, each resumable and skipped when its outputs exist:

1. ``corpus``     unlabelled synthetic MRI for pre-training (``python -m synth generate``)
2. ``cohorts``    labelled AD / PD / brain-age cohorts over K scanner sites (``python -m synth cohort``), from the
   corpus's generator settings or their own (``synth.cohort_config``, ``synth.cohort_overrides``)
3. ``oracle``     each generated cohort's ceiling: a linear model on its true regional volumes (``experiment.oracle``)
4. ``domain_gap`` how well classifiers tell the corpus's volumes from each generated cohort's (``synth.gap``)
5. ``video``      synthetic clips of moving, deforming shapes (``synth.video``; the video corpus, no downloads)
6. ``pretrain``   one DeepSpeed run per entry of ``pretrain`` (``python -m pretrain``), each exporting an encoder
7. ``finetune``   scratch vs every pre-trained init on every fine-tuned task and training fraction
   (``finetune.grid``), with subject-level k-fold CV; then the same grid tested on held-out sites
8. ``report``     ``report.md``: the tables, learning curves and out-of-site results

The synth and pretrain stages run as child processes through the same CLIs a user runs (so DeepSpeed starts and
ends cleanly, and each child resumes on its own terms); fine-tuning runs in this process.
"""

from __future__ import annotations

import copy
import dataclasses
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

from common.checkpoint import read_export_metadata
from common.config import load_config, save_config, to_object
from common.data import read_manifest
from common.errors import ConfigError, NeurotransferError
from common.io import atomic_write_text
from common.models import list_backbones
from experiment.config import ExperimentConfig, PretrainSpec, finetuned_cohorts, validate
from experiment.oracle import oracle_ceiling
from experiment.report import write_experiment_report
from finetune.config import GridConfig, InitEntry
from finetune.config import validate as validate_run
from finetune.grid import expand, run_grid
from pretrain.config import PretrainConfig, SynthMRIConfig
from pretrain.config import validate as validate_pretrain
from pretrain.views import rescan_views
from synth.config import SynthConfig
from synth.gap import domain_gap
from synth.video import write_synthetic_videos

log = logging.getLogger(__name__)

# pretrain keys the experiment sets, and from what (an entry's override of one is an error that says so)
PRETRAIN_OWNED = {
    "corpus": "the entry's corpus",
    "model.backbone": "the entry's grid backbone (grid.backbones)",
    "model.kwargs": "the entry's grid backbone (grid.backbones)",
    "data.shape": "grid.base.data.shape",
    "data.spacing": "spacing",
    "data.medical.manifest": "the entry's manifest",
    "data.medical.intensity": "grid.base.data.intensity",
    "data.input_size": "grid.base.data.shape",
    "data.synthmri": "the experiment's corpus",
    "data.video.paths": "the experiment's video clips",
    "train.seed": "seed",
}
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
        cfg.grid.base.data.spacing = self.spacing()  # flows down from spacing (its one key)
        self.backbones = {b.label: b for b in cfg.grid.backbones}
        self.timings: dict[str, float] = {}
        self.pretrain_configs: dict[str, PretrainConfig] = {}  # by entry name, built and checked once by check()
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
        self.synth_config(corpus=True), self.synth_config(corpus=False)
        for bb in self.cfg.grid.backbones:
            if bb.name not in list_backbones():
                raise ConfigError(f"grid.backbones: {bb.label!r} names {bb.name!r}, not one of {list_backbones()}")
        for spec in self.cfg.pretrain:
            cfg = self.pretrain_configs[spec.name] = self.pretrain_config(spec)
            try:
                validate_pretrain(cfg)
            except ConfigError as e:
                raise ConfigError(f"pretrain entry {spec.name!r} ({spec.config} + its overrides): {e}") from None
            if spec.corpus == "synthmri" and rescan_views(cfg) and self.cfg.synth.corpus_renderings < 2:
                raise ConfigError(
                    f"pretrain entry {spec.name!r} asks for rescan views (objective.contrastive.views=rescan), which "
                    f"need two scans of each corpus subject; set synth.corpus_renderings: 2 (now "
                    f"{self.cfg.synth.corpus_renderings})"
                )
        self._check_cohorts()
        for ood in (False, True) if self.cfg.ood else (False,):
            self._check_grid(ood)

    def _check_cohorts(self) -> None:
        """Your cohorts' and corpora's manifests must be readable, and each cohort must hold the held-out sites
        and another one to train on (a generated cohort's sites are checked by ``experiment.config``)."""
        for spec in self.cfg.pretrain:
            if spec.manifest is not None:
                read_manifest(spec.manifest, required=("path",))
        for task, manifest in self.cfg.cohorts.items():
            sites = set(read_manifest(manifest, required=("path", "subject_id", "site"))["site"])
            if self.cfg.ood and (not set(self.cfg.ood_sites) <= sites or sites <= set(self.cfg.ood_sites)):
                raise ConfigError(
                    f"cohorts.{task}: {manifest} has the sites {sorted(sites)}; ood_sites {list(self.cfg.ood_sites)} "
                    "must be among them and leave at least one to train on (or set ood=false)"
                )

    def synth_config(self, corpus: bool) -> SynthConfig:
        """synth's config for the corpus (``corpus``) or the cohorts, checked by synth's own schema, at ``spacing``.

        The corpus: synth's defaults ⊕ ``synth.overrides``, in ``synth.contrast``. The cohorts: ``synth.cohort_config``
        (a synth YAML; none: synth's defaults) ⊕ ``synth.overrides`` ⊕ ``synth.cohort_overrides`` — the file's own
        ``spacing`` is replaced (every synth YAML states one), its contrast is the cohorts'."""
        s = self.cfg.synth
        lists = {"synth.overrides": s.overrides} | ({} if corpus else {"synth.cohort_overrides": s.cohort_overrides})
        for name, items in lists.items():
            # the key the experiment sets it from (synth.contrast is the corpus's: the cohorts' contrast is theirs)
            owned = {"spacing": "spacing"} | ({"contrast": "synth.contrast"} if name == "synth.overrides" else {})
            for item in items:
                key = item.partition("=")[0].strip()
                if key in owned:
                    raise ConfigError(f"{name} sets {key} ({item!r}); set {owned[key]} instead (one key per fact)")
        file = None if corpus else s.cohort_config
        if file is not None and not Path(file).is_file():
            raise ConfigError(f"synth.cohort_config: {file} not found (a synth YAML, as in configs/synth/)")
        overrides = [item for items in lists.values() for item in items]
        where = " + ".join(([f"synth.cohort_config {file}"] if file else []) + [f"{k} {v}" for k, v in lists.items()])
        try:
            base = to_object(load_config(SynthConfig, file, overrides))
            return dataclasses.replace(base, spacing=self.cfg.spacing, **({"contrast": s.contrast} if corpus else {}))
        except NeurotransferError as e:
            problem = str(e).splitlines()[0].removeprefix("command line: ")
            raise ConfigError(f"{where}: {problem}") from None
        except Exception as e:  # OmegaConf wraps SynthConfig's own check (__post_init__): keep its message
            cause = e.__cause__ or e.__context__ or e
            raise ConfigError(f"{where}: {str(cause).splitlines()[0]}") from None

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
    def _synth_cmd(self, command: str, corpus: bool, *args: str) -> list[str]:
        """``python -m synth COMMAND`` with its config written from ``synth_config`` (the stage's one input besides
        the job: which folder, how many subjects, which seed)."""
        config = self.data / f"synth_{'corpus' if corpus else 'cohorts'}.yaml"
        save_config(self.synth_config(corpus), config)
        workers = str(self.cfg.workers)
        return [sys.executable, "-m", "synth", command, "--config", str(config), "--workers", workers, *args]

    def makes_corpus(self) -> bool:
        """Whether a pretrain entry pre-trains on the synthetic corpus (else the experiment does not make it)."""
        return any(spec.corpus == "synthmri" for spec in self.cfg.pretrain)

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
                True,
                "--out",
                str(self.corpus_dir()),
                "--n",
                str(s.corpus_n),
                "--seed",
                str(self.cfg.seed),
                "--renderings",
                str(s.corpus_renderings),
            )
        _child(cmd, self.out / "logs" / "corpus.log")

    def _cohorts(self) -> None:
        for i, (task, spec) in enumerate(self.cfg.synth.cohorts.items()):
            # cohort seeds differ from the corpus's, so no downstream subject is a pre-training subject
            seed = 1000 * (self.cfg.seed + 1) + i
            _child(
                self._synth_cmd(
                    "cohort",
                    False,
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

    def oracle_file(self) -> Path:
        return self.out / "oracle.json"

    def _oracle(self) -> None:
        """Every generated cohort's oracle ceiling (``experiment.oracle``), bootstrapped as the grid's cells are."""
        ceilings = {}
        for task in self.cfg.synth.cohorts:
            manifest = self.cohort_dir(task) / "manifest.csv"
            ceilings[task] = oracle_ceiling(
                pd.read_csv(manifest), task, self.cfg.grid.base.bootstrap, self.cfg.seed, source=str(manifest)
            )
            log.info("oracle ceiling of %s: %s %.3f", task, ceilings[task]["metric"], ceilings[task]["value"])
        atomic_write_text(self.oracle_file(), json.dumps(ceilings, indent=1))

    def gap_file(self) -> Path:
        return self.out / "domain_gap.json"

    def _domain_gap(self) -> None:
        """The domain gap between the corpus and each generated cohort (``synth.gap.domain_gap``), saved after each
        cohort: a killed run keeps the gaps it measured."""
        gaps = json.loads(self.gap_file().read_text()) if self.gap_file().is_file() else {}
        for task in self.cfg.synth.cohorts:
            if task not in gaps:
                gaps[task] = domain_gap(self.corpus_dir(), self.cohort_dir(task), seed=self.cfg.seed)
                log.info("domain gap corpus -> %s: voxel ROC-AUC %.3f", task, gaps[task]["voxels"]["roc_auc"])
                atomic_write_text(self.gap_file(), json.dumps(gaps, indent=1))

    def _covers_cohorts(self, path: Path) -> bool:
        """Whether the JSON at ``path`` holds a result for every generated cohort (a rerun does not recompute it)."""
        return path.is_file() and set(self.cfg.synth.cohorts) <= set(json.loads(path.read_text()))

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

    def pretrain_config(self, spec: PretrainSpec) -> PretrainConfig:
        """The config ``python -m pretrain`` runs for ``spec``: its recipe ⊕ its overrides, with what the experiment
        decides (``PRETRAIN_OWNED``: corpus, model, input grid, seed) set from the experiment's own keys; an
        override of one of those is an error (the pre-trained model must be the grid's, at the grid's input)."""
        if not Path(spec.config).is_file():
            raise ConfigError(f"pretrain entry {spec.name!r}: recipe {spec.config} not found")
        for item in spec.overrides:
            key = item.partition("=")[0].strip()
            owner = next((v for k, v in PRETRAIN_OWNED.items() if key == k or key.startswith(k + ".")), None)
            if owner is not None:
                raise ConfigError(
                    f"pretrain entry {spec.name!r}: override {item!r} sets {key}, which the experiment sets from "
                    f"{owner}; change it there"
                )
        try:  # an error names the recipe file, or "command line" for the entry's overrides
            cfg = to_object(load_config(PretrainConfig, spec.config, spec.overrides))
        except ConfigError as e:
            problem = str(e).replace("command line", "overrides", 1)
            raise ConfigError(f"pretrain entry {spec.name!r}: {problem}") from None
        bb, data = self.backbones[spec.backbone], self.cfg.grid.base.data
        cfg.corpus = spec.corpus
        # replaced, not merged: a recipe's own model.kwargs must not leak into the pre-trained architecture
        cfg.model.backbone, cfg.model.kwargs = bb.name, dict(bb.kwargs)
        cfg.data.shape, cfg.data.spacing = list(data.shape), self.spacing()
        cfg.train.seed = self.cfg.seed
        if spec.corpus == "synthmri":
            cfg.data.synthmri = SynthMRIConfig(directory=str(self.corpus_dir()))
        elif spec.corpus == "medical":  # your images, preprocessed as the fine-tuning's are
            cfg.data.medical.manifest, cfg.data.medical.intensity = spec.manifest, data.intensity
        else:
            cfg.data.video.paths = [str(self.video_dir())]
        return cfg

    def _pretrain_done(self, spec: PretrainSpec) -> bool:
        """Finished = the export is of the last step (exports are also written at intermediate checkpoints)."""
        if not self.export_path(spec).is_file():
            return False
        steps = self.pretrain_configs[spec.name].train.steps
        return int(read_export_metadata(self.export_path(spec)).get("step", -1)) >= steps

    def _pretrain(self, spec: PretrainSpec) -> None:
        config = save_config(self.pretrain_configs[spec.name], self.out / "pretrain" / f"{spec.name}.yaml")
        cmd = [sys.executable, "-m", "pretrain", "--config", str(config), "--out", str(self.pretrain_dir(spec))]
        _child([*cmd, "--resume", "auto"], self.out / "logs" / f"pretrain_{spec.name}.log")

    # ------------------------------------------------------------------ fine-tuning
    def spacing(self) -> list[float]:
        """The one voxel size of the experiment (``spacing``): the corpus's, the cohorts', the models'."""
        return [float(self.cfg.spacing)] * 3

    def grid_config(self, ood: bool) -> GridConfig:
        grid = copy.deepcopy(self.cfg.grid)
        grid.tasks = {t: str(self.cohort_dir(t) / "manifest.csv") for t in finetuned_cohorts(self.cfg)}
        grid.tasks.update(self.cfg.cohorts)
        grid.inits = [InitEntry(name="scratch", spec="scratch")] + [
            InitEntry(name=spec.name, spec=str(self.export_path(spec)), backbones=[spec.backbone])
            for spec in self.cfg.pretrain
        ]
        # downstream test images must not be in a pre-training corpus: checked by the protocol
        corpus = self.corpus_dir() / "manifest.csv"  # made for a pretrain entry now, or by an earlier run
        grid.base.protocol.pretrain_manifests = [str(corpus)] if self.makes_corpus() or corpus.is_file() else []
        grid.base.protocol.pretrain_manifests += [spec.manifest for spec in self.cfg.pretrain if spec.manifest]
        grid.base.protocol.scheme = self.cfg.in_site_scheme
        if ood:
            grid.base.protocol.scheme = "ood"
            grid.base.protocol.ood_sites = list(self.cfg.ood_sites)
            grid.fractions = list(self.cfg.ood_fractions)
        grid.out_dir = str(self.grid_dir(ood))
        return grid

    def grid_dir(self, ood: bool) -> Path:
        return self.out / "finetune" / ("out_of_site" if ood else "in_site")

    def _finetune(self, ood: bool) -> None:
        run_grid(self.grid_config(ood), self.grid_dir(ood))

    # ------------------------------------------------------------------ the run
    def stages(self) -> list[Stage]:
        stages = []
        if self.makes_corpus():
            s = self.cfg.synth
            corpus_done = lambda: self._manifest_complete(self.corpus_dir(), s.corpus_n * s.corpus_renderings)
            stages.append(Stage("corpus", corpus_done, self._corpus))
        if self.cfg.synth.cohorts:
            stages.append(Stage("cohorts", self._cohorts_done, self._cohorts))
            stages.append(Stage("oracle", lambda: self._covers_cohorts(self.oracle_file()), self._oracle))
            if self.makes_corpus():
                stages.append(Stage("domain_gap", lambda: self._covers_cohorts(self.gap_file()), self._domain_gap))
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
        # a result of a cohort this config no longer generates (an earlier run's) is left out
        read = lambda path: {
            task: result
            for task, result in (json.loads(path.read_text()) if path.is_file() else {}).items()
            if task in self.cfg.synth.cohorts
        }
        write_experiment_report(
            self.cfg,
            self.out,
            dict(self.timings),
            {spec.name: self.pretrain_dir(spec) for spec in self.cfg.pretrain},
            {"in_site": self.grid_dir(False), "out_of_site": self.grid_dir(True)},
            oracle=read(self.oracle_file()),
            domain_gaps=read(self.gap_file()),
        )


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or resume) the experiment; returns the path of ``report.md``."""
    return Experiment(cfg).run()
