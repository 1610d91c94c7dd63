"""The experiment's config schema and its checks: what the YAML may set, and what the experiment decides itself.

The grid's tasks, inits, output folder and evaluation scheme follow from the experiment's own stages (its
cohorts, its pre-training runs, ``ood``); a YAML or override that sets one of them is a ``ConfigError`` naming
the field, rather than a value silently replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.config import load_config, to_object
from common.errors import ConfigError
from finetune.config import GridBackbone, GridConfig
from finetune.tasks import get_task
from synth.config import TASKS

log = logging.getLogger(__name__)

IN_SITE_SCHEMES = ("kfold", "holdout")  # in-site evaluation: every subject tested once, or one test split per seed
MADE_CORPORA = ("synthmri", "video")  # the pre-training corpora the experiment makes itself
EXPERIMENT_CORPORA = (*MADE_CORPORA, "medical")  # ... and yours, from a manifest
CORPUS_BACKENDS = ("anatomy", "ldm")  # how the synthetic pre-training corpus is made
# grid fields the experiment fills in, and from what (a YAML setting one is an error that says so)
OWNED = {
    "grid.tasks": "the cohorts of synth.cohorts and cohorts",
    "grid.inits": "scratch plus one init per pretrain entry",
    "grid.out_dir": "out_dir/finetune/in_site and out_dir/finetune/out_of_site",
    "grid.base.data.spacing": "spacing (one voxel size for the corpus, the cohorts and the models)",
    "grid.base.protocol.scheme": "in_site_scheme in-site (kfold | holdout), ood out-of-site (the ood flag)",
    "grid.base.protocol.ood_sites": "ood_sites",
    "grid.base.protocol.ood_datasets": "ood_sites (held-out sites, not datasets)",
    "grid.base.protocol.pretrain_manifests": "the pre-training corpora's manifests",
}


@dataclass
class CohortSpec:
    n: int = 60  # subjects in the labelled cohort
    sites: int = 3  # scanner sites; each gets both classes
    finetune: bool = True  # false: generated only for the report's oracle ceiling and domain gap, never fine-tuned


@dataclass
class SynthStage:
    corpus_n: int = 64  # unlabelled pre-training subjects
    corpus_renderings: int = 1  # scans per corpus subject, each by another scanner (>= 2 for rescan views)
    contrast: str = "t1"  # contrast of the pre-training corpus: t1 | random (contrast-agnostic)
    corpus_backend: str = "anatomy"  # anatomy (MNI152 model) | ldm (sampled from a trained latent diffusion model)
    ldm_model: str | None = None  # for backend ldm: an ldm-train run, its export, or the public bundle's folder
    ldm_ddim_steps: int = 50  # DDIM steps per LDM sample
    # task -> size; the tasks of the experiment are exactly the ones listed (a default could not be removed by a
    # YAML, whose mappings merge into the defaults)
    cohorts: dict[str, CohortSpec] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # synth config key=value for corpus and cohorts
    cohort_config: str | None = None  # a synth YAML the cohorts are generated from (null: the corpus's defaults)
    cohort_overrides: list[str] = field(default_factory=list)  # synth config key=value for the cohorts only


@dataclass
class VideoStage:
    count: int = 16  # synthetic clips
    frames: int = 64  # frames per clip (>= input depth x stride)
    height: int = 64
    width: int = 64


@dataclass
class PretrainSpec:
    name: str = "synthmri_mae"  # the init's label in the tables
    corpus: str = "synthmri"  # EXPERIMENT_CORPORA: synthmri | video (made by the experiment) | medical (yours)
    manifest: str | None = None  # corpus medical: your images' manifest (CSV/TSV: path [, subject_id, age ...])
    config: str = "configs/pretrain/quickstart.yaml"  # the recipe; model and input size come from `backbone`
    backbone: str = "vit"  # label of the grid backbone it pre-trains (its name, kwargs and input size are used)
    overrides: list[str] = field(default_factory=list)  # further pretrain key=value


def _default_grid() -> GridConfig:
    # a ViT labelled "vit": the default pretrain entry (MAE) pre-trains it, so an experiment YAML that sets
    # neither list names the same backbone in both
    return GridConfig(backbones=[GridBackbone(label="vit", name="vit_tiny_p16")])


@dataclass
class ExperimentConfig:
    # keys of experiment YAMLs written before spacing and the held-out sites were the experiment's own
    __renamed__ = {"synth.spacing": "spacing", "synth.ood_sites": "ood_sites"}

    out_dir: str = "runs/experiment"  # everything goes here: data/, pretrain/, finetune/, report.md
    seed: int = 0
    workers: int = 2  # synth generator processes
    spacing: float = 4.0  # mm: the one voxel size of the corpora, the generated cohorts and the models' input grid
    # task -> your cohort's manifest (CSV/TSV with path, subject_id, site and the task's label; e.g. from `python -m
    # finetune manifest --bids ROOT`); these tasks run next to (or instead of) the generated synth.cohorts
    cohorts: dict[str, str] = field(default_factory=dict)
    ood_sites: list[str] = field(default_factory=lambda: ["site2"])  # held out for the out-of-site test
    synth: SynthStage = field(default_factory=SynthStage)
    video: VideoStage = field(default_factory=VideoStage)
    pretrain: list[PretrainSpec] = field(default_factory=lambda: [PretrainSpec()])
    grid: GridConfig = field(default_factory=_default_grid)  # backbones, fractions, seeds, base (not the OWNED fields)
    in_site_scheme: str = "kfold"  # IN_SITE_SCHEMES; holdout trains one model per cell instead of protocol.folds
    ood: bool = True  # also test every cell on the held-out sites (trained on the other sites)
    ood_fractions: list[float] = field(default_factory=lambda: [1.0])  # fractions of the out-of-site grid


def validate(cfg: ExperimentConfig) -> None:
    """Raise ``ConfigError`` naming the first field with a value the experiment cannot run (the stages' own
    configs are checked by ``experiment.stages.Experiment``, which builds them)."""
    labels = [b.label for b in cfg.grid.backbones]
    names = [spec.name for spec in cfg.pretrain]
    for spec in cfg.pretrain:
        if spec.backbone not in labels:
            raise ConfigError(
                f"pretrain entry {spec.name!r}: backbone {spec.backbone!r} is not a label of grid.backbones "
                f"({labels}); set the entry's backbone to one of them, or add a grid backbone with that label"
            )
        if spec.corpus not in EXPERIMENT_CORPORA:
            raise ConfigError(
                f"pretrain entry {spec.name!r}: corpus must be one of {EXPERIMENT_CORPORA}, not {spec.corpus!r} "
                "(the experiment makes synthmri and video; medical reads your manifest)"
            )
        if (spec.corpus == "medical") != (spec.manifest is not None):
            raise ConfigError(
                f"pretrain entry {spec.name!r}: corpus medical takes its images from `manifest` (and only it does); "
                f"got corpus {spec.corpus!r} with manifest {spec.manifest!r}"
            )
        if spec.name == "scratch" or names.count(spec.name) > 1:
            raise ConfigError(
                f"pretrain entry names must be unique and not 'scratch' (the baseline's label), got {names}"
            )
    if cfg.in_site_scheme not in IN_SITE_SCHEMES:
        raise ConfigError(f"in_site_scheme must be one of {IN_SITE_SCHEMES}, not {cfg.in_site_scheme!r}")
    if cfg.synth.corpus_backend not in CORPUS_BACKENDS:
        raise ConfigError(f"synth.corpus_backend must be one of {CORPUS_BACKENDS}, not {cfg.synth.corpus_backend!r}")
    if cfg.synth.corpus_renderings < 1:
        raise ConfigError(f"synth.corpus_renderings must be >= 1, got {cfg.synth.corpus_renderings}")
    if cfg.synth.corpus_backend == "ldm" and cfg.synth.corpus_renderings != 1:
        raise ConfigError("synth.corpus_renderings: an ldm corpus has one image per subject; set it to 1")
    if cfg.synth.corpus_backend == "ldm" and not cfg.synth.ldm_model:
        raise ConfigError("synth.corpus_backend=ldm needs synth.ldm_model: an ldm-train run or bundle folder")
    if not cfg.synth.cohorts and not cfg.cohorts:
        raise ConfigError(
            "no tasks: list generated cohorts in synth.cohorts, e.g. ad: {n: 120, sites: 3} "
            f"(tasks: {list(TASKS)}), or your own in cohorts, e.g. ad: manifest.csv"
        )
    if not finetuned_cohorts(cfg) and not cfg.cohorts:
        raise ConfigError(
            f"no task to fine-tune: every cohort of synth.cohorts ({list(cfg.synth.cohorts)}) has finetune: false; "
            "set finetune: true on one, or list your own in cohorts"
        )
    both = sorted(set(cfg.synth.cohorts) & set(cfg.cohorts))
    if both:
        raise ConfigError(f"task(s) {both} are in both synth.cohorts and cohorts; a task has one cohort")
    unknown = sorted(set(cfg.synth.cohorts) - set(TASKS))
    if unknown:
        raise ConfigError(f"synth.cohorts: unknown task(s) {unknown}; known: {list(TASKS)}")
    for task in cfg.cohorts:
        try:
            get_task(task)
        except ConfigError as e:
            raise ConfigError(f"cohorts: {e}") from None
    for task, spec in cfg.synth.cohorts.items():
        if spec.n < 2 or spec.sites < 1:
            raise ConfigError(
                f"synth.cohorts.{task}: n must be >= 2 and sites >= 1, got n={spec.n}, sites={spec.sites}"
            )
    _check_fractions("grid.fractions", cfg.grid.fractions)
    if not cfg.grid.seeds:
        raise ConfigError("grid.seeds is empty: list at least one seed, e.g. grid.seeds=[0]")
    if cfg.ood:
        _check_fractions("ood_fractions", cfg.ood_fractions)
        _check_ood_sites(cfg)


def finetuned_cohorts(cfg: ExperimentConfig) -> dict[str, CohortSpec]:
    """The generated cohorts the grid fine-tunes on (the others are made for the report's oracle and gap only)."""
    return {task: spec for task, spec in cfg.synth.cohorts.items() if spec.finetune}


def _check_fractions(key: str, fractions: list[float]) -> None:
    if not fractions:
        raise ConfigError(f"{key} is empty: list the training fractions, e.g. {key}=[1.0]")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{key}: every fraction must lie in (0, 1], got {bad}")


def _check_ood_sites(cfg: ExperimentConfig) -> None:
    """The held-out sites must be sites every fine-tuned generated cohort will have (``site0`` .. ``site{n-1}``),
    leaving one to train (your cohorts' sites are checked against their manifests by ``experiment.stages``)."""
    if not cfg.ood_sites:
        raise ConfigError("ood_sites is empty: name the held-out site(s), e.g. [site2], or set ood=false")
    for task, spec in finetuned_cohorts(cfg).items():
        sites = [f"site{i}" for i in range(spec.sites)]
        unknown = [s for s in cfg.ood_sites if s not in sites]
        if unknown:
            raise ConfigError(
                f"ood_sites: {unknown} not among the sites of cohort {task} ({sites}, from "
                f"synth.cohorts.{task}.sites={spec.sites})"
            )
        if set(sites) <= set(cfg.ood_sites):
            raise ConfigError(
                f"ood_sites {list(cfg.ood_sites)} hold out every site of cohort {task} ({sites}); "
                "leave at least one site to train on"
            )


def _sets(node: DictConfig, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def _spacing_agrees(raw: DictConfig, cfg: ExperimentConfig) -> bool:
    """A YAML written before spacing had one key states it twice; the same value twice is only redundant."""
    given = OmegaConf.to_container(raw)["grid"]["base"]["data"]["spacing"]
    given = given if isinstance(given, list) else [given] * 3
    return [float(v) for v in given] == [float(cfg.spacing)] * 3


def load_experiment_config(file: str | Path | None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Defaults ⊕ ``file`` ⊕ ``key=value`` overrides, checked: no OWNED field set, then ``validate``."""
    overrides = list(overrides)
    cfg = to_object(load_config(ExperimentConfig, file, overrides))  # file, YAML and keys checked here
    given = {str(file): OmegaConf.load(file)} if file is not None else {}
    if overrides:
        given["the command line"] = OmegaConf.from_dotlist(overrides)
    for source, raw in given.items():
        for key, made_from in OWNED.items():
            if key == "grid.base.data.spacing" and _sets(raw, key) and _spacing_agrees(raw, cfg):
                log.warning("%s: %s is set by the experiment (%s); remove it", source, key, made_from)
            elif _sets(raw, key):
                raise ConfigError(f"{source}: {key} is set by the experiment ({made_from}); remove it")
    validate(cfg)
    return cfg
