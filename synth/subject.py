"""Who a synthetic subject is — covariates, atrophy, scanner — as a pure function of (seed, index).

A subject's randomness comes from ``numpy.random.SeedSequence(seed, spawn_key=key)`` with a key naming the
source (cohort/corpus subject ``(0, index)``, site ``(1, site)``, rendering ``(2, index, r)``), split into
independent children for covariates, effects, scanner and volume. So the same seed and index give the same subject
whatever the number of workers or the order of generation, and a plan can be rebuilt without making the volume.

A subject can be scanned again: ``rendering(cfg, plan, r)`` is the same anatomy (pose, shape, atrophy) on another
scanner, with its own noise, residual registration pose and bias field; rendering 0 is the plan itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from common.errors import ConfigError
from synth.atrophy import Effects, sample_effects
from synth.config import TASKS, SynthConfig
from synth.scanner import ScannerProfile, jitter_for_subject, sample_site

SUBJECT_KEY, SITE_KEY, RENDERING_KEY = 0, 1, 2
DIAGNOSES = {"ad": ("CN", "AD"), "pd": ("HC", "PD"), "brain_age": ("CN",)}


@dataclass(frozen=True)
class SubjectPlan:
    """Everything about one subject except its voxels."""

    subject_id: str
    index: int
    seed: int
    age: float
    sex: str  # "F" / "M"
    diagnosis: str  # CN / AD / HC / PD
    site: str
    effects: Effects
    scanner: ScannerProfile
    volume_seed: np.random.SeedSequence  # drives pose, deformation, bias and noise
    rendering: int = 0  # which scan of the subject (``rendering``): 0 is the plan's own
    # renderings >= 1: drives the noise, the residual registration pose and the bias; None: the volume seed does
    acquisition_seed: np.random.SeedSequence | None = None

    def row(self) -> dict[str, object]:
        """The manifest columns this plan decides (paths and measured volumes are added by the writer); each
        rendering is a session of its own (another visit, another scanner)."""
        return {
            "subject_id": self.subject_id,
            "session_id": f"ses-{self.rendering + 1}",
            "rendering": self.rendering,
            "site": self.site,
            "age": round(self.age, 2),
            "sex": self.sex,
            "diagnosis": self.diagnosis,
            "seed": self.seed,
            "index": self.index,
            **self.effects.as_dict(),
            **{f"scanner_{k}": v for k, v in self.scanner.as_dict().items()},
        }


def site_profile(cfg: SynthConfig, seed: int, site: int) -> ScannerProfile:
    """Site ``site``'s scanner in cohorts of seed ``seed`` (independent of the cohort's size)."""
    return sample_site(
        cfg, cfg.contrast, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SITE_KEY, site)))
    )


def _plan(
    cfg: SynthConfig,
    seed: int,
    index: int,
    *,
    key: tuple[int, ...],
    subject_id: str,
    age_range: tuple[float, float],
    diagnosis: str | dict[str, float],
    site: tuple[str, ScannerProfile] | None,
) -> SubjectPlan:
    # diagnosis: fixed, or drawn with the given probabilities; site None: a scanner of the subject's own
    cov, eff, scan, vol = np.random.SeedSequence(seed, spawn_key=key).spawn(4)
    rng = np.random.default_rng(cov)
    age = float(rng.uniform(*age_range))
    sex = "M" if rng.random() < 0.5 else "F"
    if isinstance(diagnosis, dict):
        names = list(diagnosis)
        diagnosis = names[int(rng.choice(len(names), p=list(diagnosis.values())))]
    scan_rng = np.random.default_rng(scan)
    if site is None:
        site = ("synth", sample_site(cfg, cfg.contrast, scan_rng))
    return SubjectPlan(
        subject_id=subject_id,
        index=index,
        seed=seed,
        age=age,
        sex=sex,
        diagnosis=diagnosis,
        site=site[0],
        effects=sample_effects(cfg.atrophy, age, diagnosis, np.random.default_rng(eff)),
        scanner=jitter_for_subject(site[1], cfg, scan_rng),
        volume_seed=vol,
    )


def twin(cfg: SynthConfig, plan: SubjectPlan, diagnosis: str) -> SubjectPlan:
    """The same subject (pose, shape, scanner, noise, individual effect factors) with another diagnosis: a
    counterfactual that isolates a disease's effect from between-subject variation."""
    eff = np.random.SeedSequence(plan.seed, spawn_key=(SUBJECT_KEY, plan.index)).spawn(4)[1]  # as in _plan
    effects = sample_effects(cfg.atrophy, plan.age, diagnosis, np.random.default_rng(eff))
    return replace(plan, diagnosis=diagnosis, effects=effects)


def rendering(cfg: SynthConfig, plan: SubjectPlan, r: int) -> SubjectPlan:
    """Scan ``r`` of ``plan``'s subject: the same anatomy (pose, random deformation, atrophy: the volume seed's
    draws) on a scanner of its own (site ``synth``: drawn from ``(seed, index, r)``, jittered for the subject),
    with its own noise, residual registration pose and bias field, as when one person is scanned twice and each
    scan is registered on its own. ``r = 0`` is ``plan`` itself, voxel for voxel; ``plan`` must be rendering 0."""
    if r < 0 or plan.rendering != 0:
        raise ValueError(f"rendering() takes a rendering-0 plan and r >= 0, got rendering {plan.rendering}, r {r}")
    if r == 0:
        return plan
    scan, acquisition = np.random.SeedSequence(plan.seed, spawn_key=(RENDERING_KEY, plan.index, r)).spawn(2)
    scan_rng = np.random.default_rng(scan)
    scanner = jitter_for_subject(sample_site(cfg, cfg.contrast, scan_rng), cfg, scan_rng)
    return replace(plan, site="synth", scanner=scanner, rendering=r, acquisition_seed=acquisition)


def corpus_plan(cfg: SynthConfig, seed: int, index: int) -> SubjectPlan:
    """A pre-training subject: age over the corpus range, mostly CN with some AD and PD, its own scanner."""
    c = cfg.cohort
    mix = {
        "CN": 1.0 - c.corpus_ad_fraction - c.corpus_pd_fraction,
        "AD": c.corpus_ad_fraction,
        "PD": c.corpus_pd_fraction,
    }
    return _plan(
        cfg,
        seed,
        index,
        key=(SUBJECT_KEY, index),
        subject_id=f"sub-{index:06d}",
        age_range=c.corpus_age,
        diagnosis=mix,
        site=None,
    )


def cohort_plan(cfg: SynthConfig, task: str, seed: int, index: int, n_sites: int) -> SubjectPlan:
    """Subject ``index`` of a labelled cohort.

    Diagnosis alternates with the index (50/50 for ad and pd) and sites take pairs of indices in turn
    (``site = (index // 2) % n_sites``), so every site holds both classes once the cohort has 2 * K subjects,
    and subject ``index`` is the same whatever the cohort's size.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if n_sites < 1:
        raise ConfigError(f"a cohort needs at least one site, got {n_sites}")
    classes = DIAGNOSES[task]
    site_index = (index // len(classes)) % n_sites
    site = (f"site{site_index}", site_profile(cfg, seed, site_index))
    age_range = {"ad": cfg.cohort.ad_age, "pd": cfg.cohort.pd_age, "brain_age": cfg.cohort.brain_age_age}[task]
    return _plan(
        cfg,
        seed,
        index,
        key=(SUBJECT_KEY, index),
        subject_id=f"sub-{index:05d}",
        age_range=age_range,
        diagnosis=classes[index % len(classes)],
        site=site,
    )
