"""Covariate effects go the right way: paired (one subject, one covariate changed) and in small cohorts."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import spearmanr

from synth.atrophy import sample_effects
from synth.config import AtrophyConfig, SynthConfig
from synth.generator import Generator
from synth.regions import label_volumes
from synth.subject import cohort_plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen2():
    return Generator(SynthConfig(spacing=2.0))


def _volumes(gen, plan):
    return label_volumes(gen(plan, with_labels=True).labels.numpy(), gen.cfg.spacing)


def _as(plan, cfg, age=None, diagnosis=None):
    # the same subject (pose, shape, scanner, noise) with other covariates
    age = plan.age if age is None else age
    diagnosis = diagnosis or plan.diagnosis
    effects = sample_effects(replace(cfg.atrophy, individual_sd=0.0), age, diagnosis, np.random.default_rng(0))
    return replace(plan, age=age, diagnosis=diagnosis, effects=effects)


def test_effect_sizes_grow_with_age_and_disease():
    cfg = AtrophyConfig(individual_sd=0.0, hippocampus_sd_mm=0.0, pattern_sd=0.0)  # covariates only, no own spread
    rng = np.random.default_rng(0)
    young, old = sample_effects(cfg, 25, "CN", rng), sample_effects(cfg, 85, "CN", rng)
    ad, pd = sample_effects(cfg, 85, "AD", rng), sample_effects(cfg, 85, "PD", rng)
    assert old.ventricle_mm > young.ventricle_mm and old.hippocampus_mm > young.hippocampus_mm
    assert old.cortical_thinning > young.cortical_thinning
    assert ad.hippocampus_mm > old.hippocampus_mm and ad.ventricle_mm > old.ventricle_mm
    assert ad.pattern_thinning > 0 and old.pattern_thinning == 0
    assert pd.midbrain_mm > 0 and pd.putamen_mm > 0 and ad.midbrain_mm == 0


def test_same_subject_older_has_larger_ventricles_less_grey_matter(gen2):
    cfg = gen2.cfg
    plan = cohort_plan(cfg, "brain_age", 5, 0, 1)
    young, old = _volumes(gen2, _as(plan, cfg, age=25)), _volumes(gen2, _as(plan, cfg, age=88))
    assert old["ventricle_ml"] > 1.3 * young["ventricle_ml"]
    assert old["hippocampus_ml"] < young["hippocampus_ml"]
    assert old["gm_ml"] < young["gm_ml"]


def test_same_subject_with_ad_has_smaller_hippocampi_larger_ventricles(gen2):
    cfg = gen2.cfg
    plan = cohort_plan(cfg, "ad", 5, 1, 1)
    cn, ad = _volumes(gen2, _as(plan, cfg, diagnosis="CN")), _volumes(gen2, _as(plan, cfg, diagnosis="AD"))
    assert ad["hippocampus_ml"] < 0.9 * cn["hippocampus_ml"]
    assert ad["ventricle_ml"] > cn["ventricle_ml"]


def test_same_subject_with_pd_has_smaller_midbrain_and_putamen(gen2):
    cfg = gen2.cfg
    plan = cohort_plan(cfg, "pd", 5, 0, 1)
    hc, pd = _volumes(gen2, _as(plan, cfg, diagnosis="HC")), _volumes(gen2, _as(plan, cfg, diagnosis="PD"))
    assert pd["midbrain_ml"] < hc["midbrain_ml"] and pd["putamen_ml"] < hc["putamen_ml"]
    assert pd["hippocampus_ml"] == pytest.approx(hc["hippocampus_ml"], rel=0.02)


def test_small_cohorts_show_the_effects(gen2):
    cfg = gen2.cfg
    ages, ventricles = [], []
    for i in range(8):
        plan = cohort_plan(cfg, "brain_age", 11, i, 1)
        ages.append(plan.age)
        ventricles.append(_volumes(gen2, plan)["ventricle_ml"])
    assert spearmanr(ages, ventricles).statistic > 0.3
    hip = {"CN": [], "AD": []}
    for i in range(6):
        plan = cohort_plan(cfg, "ad", 11, i, 2)
        hip[plan.diagnosis].append(_volumes(gen2, plan)["hippocampus_ml"])
    assert np.mean(hip["AD"]) < np.mean(hip["CN"])
