"""The shifted domain's knobs: each changes what it should, and at neutral values nothing else changes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config, to_object
from common.errors import ConfigError
from synth.anatomy import output_affine
from synth.artefacts import brain_mask, k_space_artefacts
from synth.atrophy import age_factor, sample_effects
from synth.config import AtrophyConfig, PipelineConfig, ScannerConfig, SynthConfig
from synth.generator import Generator
from synth.regions import CSF, GM, label_volumes, posterior_weight, temporal_weight
from synth.scanner import ScannerProfile
from synth.subject import cohort_plan, corpus_plan, twin

pytestmark = pytest.mark.usefixtures("one_thread")
SHIFTED = Path(__file__).parents[2] / "configs" / "synth" / "shifted.yaml"
NEUTRAL = ("atrophy.hippocampus_sd_mm=0", "atrophy.pattern_sd=0")  # the new knobs whose defaults are not neutral


def _cfg(*overrides: str, path: Path | None = None, spacing: float = 4.0) -> SynthConfig:
    return to_object(load_config(SynthConfig, path, [f"spacing={spacing}", *overrides]))


# Made with the generator before the shifted domain's knobs existed (commit 673f5df), at 4 mm.
BEFORE = {
    ("ad", 1): (
        15036.0180208459,
        {"ventricle_ml": 34.368, "hippocampus_ml": 4.8, "gm_ml": 1063.104, "csf_ml": 157.824, "brain_ml": 1681.216},
        {"effect_hippocampus_mm": 0.97966, "effect_ventricle_mm": 3.26719, "effect_pattern_thinning": 0.31618},
        "1.34x3.10x1.34",
    ),
    ("corpus", 2): (
        18352.372332658502,
        {"ventricle_ml": 34.176, "hippocampus_ml": 2.752, "gm_ml": 999.168, "csf_ml": 207.36, "brain_ml": 1620.224},
        {"effect_hippocampus_mm": 1.56293, "effect_ventricle_mm": 4.5, "effect_pattern_thinning": 0.36734},
        "1.09x2.37x1.09",
    ),
}


@pytest.mark.parametrize("kind, index", list(BEFORE))
def test_neutral_knobs_leave_the_default_volumes_as_they_were(kind, index):
    cfg = _cfg(*NEUTRAL)
    plan = cohort_plan(cfg, "ad", 5, index, 2) if kind == "ad" else corpus_plan(cfg, 5, index)
    total, volumes, effects, resolution = BEFORE[(kind, index)]
    vol = Generator(cfg)(plan, with_labels=True)
    assert float(vol.image.double().sum()) == pytest.approx(total, rel=1e-6)
    assert {k: v for k, v in label_volumes(vol.labels.numpy(), 4.0).items() if k in volumes} == volumes
    assert {k: v for k, v in plan.effects.as_dict().items() if k in effects} == effects
    assert plan.scanner.as_dict()["resolution_mm"] == resolution


def test_own_offsets_spread_subjects_and_keep_their_other_effects():
    fixed = AtrophyConfig(individual_sd=0.0, hippocampus_sd_mm=0.0, pattern_sd=0.0)
    spread = replace(fixed, hippocampus_sd_mm=0.5, ventricle_sd_mm=1.0, pattern_sd=0.2)
    draws = {
        name: [sample_effects(c, 70.0, "CN", np.random.default_rng(i)) for i in range(400)]
        for name, c in (("fixed", fixed), ("spread", spread))
    }
    hippocampus = {k: np.array([e.hippocampus_mm for e in v]) for k, v in draws.items()}
    assert np.ptp(hippocampus["fixed"]) == 0 and 0.45 < hippocampus["spread"].std() < 0.55
    assert np.array([e.ventricle_mm for e in draws["spread"]]).std() > 0.9
    pattern = {k: np.array([e.pattern_thinning for e in v]) for k, v in draws.items()}  # CN: no AD pattern of its own
    assert (pattern["fixed"] == 0).all() and pattern["spread"].min() >= 0 and pattern["spread"].std() > 0.1
    # the offsets are drawn after the individual factors: every other effect is the same subject's
    assert [e.cortical_thinning for e in draws["fixed"]] == [e.cortical_thinning for e in draws["spread"]]


def test_hippocampal_offset_reaches_the_label_maps():
    cfg = _cfg(*NEUTRAL)
    gen, plan = Generator(cfg), cohort_plan(cfg, "ad", 5, 0, 1)
    hippocampus = {
        mm: label_volumes(gen(replace(plan, effects=replace(plan.effects, hippocampus_mm=mm)), True).labels.numpy(), 4)[
            "hippocampus_ml"
        ]
        for mm in (-1.0, 0.0, 1.0)
    }
    assert hippocampus[-1.0] > hippocampus[0.0] > hippocampus[1.0]


def test_late_age_curve_is_flat_then_steep():
    late = AtrophyConfig(age_curve="late", age_knee=60.0, age_knee_share=0.2)
    assert [age_factor(late, a) for a in (10, 20, 40, 60, 75, 90, 95)] == pytest.approx([0, 0, 0.1, 0.2, 0.6, 1, 1])
    power = AtrophyConfig()  # the default curve is unchanged
    assert age_factor(power, 55) == pytest.approx((35 / 70) ** 1.5)
    assert age_factor(late, 55) < age_factor(power, 55)  # less change by middle age, all of it after
    slope = lambda lo, hi: (age_factor(late, hi) - age_factor(late, lo)) / (hi - lo)
    assert slope(60, 90) > 5 * slope(20, 60)


def _gm_loss_by_lobe(pattern: str) -> dict[str, float]:
    # AD's pattern thinning alone (no other AD or ageing effect), on one subject and its CN twin
    only_pattern = [
        f"atrophy.ad_pattern={pattern}",
        "atrophy.cortical_thinning_ad=0",
        "atrophy.hippocampus_ad_mm=0",
        "atrophy.ventricle_ad_mm=0",
        "atrophy.individual_sd=0",
        "atrophy.pattern_thinning_ad=0.6",
    ]
    cfg = _cfg(*NEUTRAL, *only_pattern)
    gen = Generator(cfg)
    plan = cohort_plan(cfg, "ad", 5, 1, 1)
    ad, cn = (gen(p, with_labels=True).labels.numpy() for p in (plan, twin(cfg, plan, "CN")))
    thinned = (cn == GM) & (ad == CSF)
    affine = output_affine(cfg.spacing, cfg.shape)
    axes = tuple(affine[i, 3] + cfg.spacing * np.arange(n) for i, n in enumerate(cfg.shape))  # MNI mm
    lobes = {"temporal": temporal_weight(axes) > 0.5, "posterior": posterior_weight(axes) > 0.5}
    return {name: thinned[lobe].sum() / max((cn == GM)[lobe].sum(), 1) for name, lobe in lobes.items()}


def test_ad_pattern_thins_its_own_lobes():
    temporal, posterior = _gm_loss_by_lobe("temporal"), _gm_loss_by_lobe("posterior")
    assert temporal["temporal"] > 0.05 and temporal["posterior"] < 0.2 * temporal["temporal"]
    assert posterior["posterior"] > 0.05 and posterior["temporal"] < 0.2 * posterior["posterior"]


def _box(n: int = 32) -> torch.Tensor:
    image = torch.zeros(1, 1, n, n, n)
    image[..., 8:24, 8:24, 8:24] = 0.5
    return image


def _profile(**artefacts) -> ScannerProfile:
    return ScannerProfile("t1", (0.2, 0.5, 0.8), 0.1, 0.02, True, (1.0, 1.0, 1.0), 1.0, **artefacts)


def test_ringing_overshoots_edges_along_the_phase_axis_only_when_on():
    image = _box()
    assert torch.equal(k_space_artefacts(image, _profile(phase_axis=1), 1.0), image)
    rung = k_space_artefacts(image, _profile(phase_axis=1, ringing_mm=3.0), 1.0)
    line = rung[0, 0, 16, :, 16]  # across the box along the phase axis: Gibbs overshoot inside, ripples outside
    assert line.max() > 0.52 and line[:6].max() > 0.01
    assert torch.allclose(rung[0, 0, 16, 16, :], image[0, 0, 16, 16, :], atol=0.06)  # no ringing across the others
    assert rung[0, 0, :6].abs().max() < 1e-5  # nor outside the box along them


def test_ghosts_are_shifted_copies_along_the_phase_axis():
    image = _box()
    ghosted = k_space_artefacts(image, _profile(phase_axis=2, ghost_amplitude=0.1, ghost_shift=0.25), 1.0)
    assert ghosted[0, 0, 16, 16, 0] == pytest.approx(0.05)  # the box 8 voxels along (wrapped), a tenth as bright
    assert float(ghosted.sum()) == pytest.approx(1.2 * float(image.sum()))  # two copies, nothing lost
    assert ghosted[0, 0, 0, 16, 16] == 0  # nothing along the other axes


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_artefact_probabilities_decide_which_sites_and_subjects_have_them(probability):
    cfg = _cfg(*NEUTRAL, f"scanner.ringing_probability={probability}", f"scanner.ghost_probability={probability}")
    plans = [cohort_plan(cfg, "ad", 5, i, 3) for i in range(12)]
    assert all((p.scanner.ringing_mm > 0) == bool(probability) for p in plans)
    assert all((p.scanner.ghost_amplitude > 0) == bool(probability) for p in plans)
    slice_axes = {p.site: int(np.argmax(p.scanner.resolution_mm)) for p in plans}
    assert all(p.scanner.phase_axis != slice_axes[p.site] for p in plans if max(p.scanner.resolution_mm) > 1.5)


def test_k_space_artefacts_reach_the_generated_image():
    cfg = _cfg(*NEUTRAL, "scanner.ghost_probability=1", "pipeline.name=raw")
    gen, plan = Generator(cfg), cohort_plan(cfg, "ad", 5, 0, 1)
    still = replace(plan, scanner=replace(plan.scanner, ghost_amplitude=0.0))
    ghosted, clean = gen(plan).image, gen(still).image
    assert (ghosted - clean).abs().max() > 0.02 and (ghosted - clean).mean() > 0


def test_skull_strip_error_moves_the_mask():
    image = torch.zeros(1, 1, 24, 24, 24)
    image[..., 4:20, 4:20, 4:20] = 0.5
    exact = brain_mask(image, PipelineConfig(), 1.0, 0)
    assert torch.equal(exact, image > 0)
    dilated = brain_mask(image, PipelineConfig(strip_error_mm=(3.0, 3.0)), 1.0, 0)
    eroded = brain_mask(image, PipelineConfig(strip_error_mm=(-3.0, -3.0)), 1.0, 0)
    assert (dilated >= exact).all() and (eroded <= exact).all()
    assert dilated[0, 0, 12, 12].sum() == 16 + 6 and eroded[0, 0, 12, 12].sum() == 16 - 6  # 3 mm per side


def test_skull_strip_error_reaches_the_image():
    counts = {}
    for strip in ("[0,0]", "[3,3]", "[-3,-3]"):
        cfg = _cfg(*NEUTRAL, f"pipeline.strip_error_mm={strip}", "scanner.rician_probability=1")
        counts[strip] = int((Generator(cfg)(cohort_plan(cfg, "ad", 5, 0, 1)).image > 0).sum())
    assert counts["[3,3]"] > counts["[0,0]"] > counts["[-3,-3]"]


def test_shifted_config_loads_and_differs_along_each_axis():
    shifted, default = _cfg(path=SHIFTED, spacing=2.0), SynthConfig(spacing=2.0)
    assert shifted.atrophy.ad_pattern == "posterior" and shifted.atrophy.age_curve == "late"
    assert shifted.intensity.t1_wm - shifted.intensity.t1_gm < default.intensity.t1_wm - default.intensity.t1_gm
    assert shifted.scanner.slice_mm[0] > default.scanner.slice_mm[1] / 2
    assert shifted.scanner.ringing_probability > 0 and shifted.scanner.ghost_probability > 0
    assert shifted.pipeline.rotation_deg > default.pipeline.rotation_deg and shifted.pipeline.strip_error_mm != (0, 0)
    assert shifted.nonlinear.velocity_sd_mm > default.nonlinear.velocity_sd_mm


@pytest.mark.parametrize(
    "part, key, value",
    [
        ("atrophy", "ad_pattern", "frontal"),
        ("atrophy", "age_curve", "linear"),
        ("atrophy", "hippocampus_sd_mm", -1.0),
        ("scanner", "ghost_probability", 2.0),
        ("scanner", "ringing_mm", (3.0, 2.0)),
        ("pipeline", "strip_error_mm", (-20.0, 0.0)),
    ],
)
def test_bad_knob_values_name_their_key(part, key, value):
    parts = {"atrophy": AtrophyConfig(), "scanner": ScannerConfig(), "pipeline": PipelineConfig()}
    setattr(parts[part], key, value)
    with pytest.raises(ConfigError, match=f"{part}.{key}"):
        SynthConfig(**{part: parts[part]})
