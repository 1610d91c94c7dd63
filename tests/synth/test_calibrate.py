"""Calibration: the measurements on tiny hand-made cohorts with known answers, and the command end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from synth.calibrate import measure, table, with_icv
from synth.cli import main
from synth.targets import TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")
REGIONS = ("ventricle", "hippocampus", "putamen", "caudate", "midbrain", "gm", "wm", "csf")


def _subject(age, sex="F", diagnosis="CN", index=0, twin=False, head=1.0, **ml):
    # ICV = brain + csf + ventricles = 1000 mL unless a region says otherwise (brain holds the rest)
    vol = {f"{r}_ml": 10.0 for r in REGIONS} | {f"{k}_ml": v for k, v in ml.items()}
    vol["brain_ml"] = 1000.0 - vol["csf_ml"] - vol["ventricle_ml"]
    return {
        "index": index,
        "twin": twin,
        "age": age,
        "sex": sex,
        "diagnosis": diagnosis,
        "site": "s0",
        "head_scale": head,
        "image_scale": 1.0,
        **vol,
    }


def _cohorts() -> dict[str, pd.DataFrame]:
    brain_age = [
        _subject(25, ventricle=10, gm=500, hippocampus=8),
        _subject(30, ventricle=14, gm=520, hippocampus=8),
        _subject(50, ventricle=20, gm=470, hippocampus=7),
        _subject(80, ventricle=30, gm=420, hippocampus=7),
        _subject(85, ventricle=30, gm=390, hippocampus=6.6),
    ]
    ad = [
        _subject(70, diagnosis="CN", hippocampus=8, ventricle=20),
        _subject(72, diagnosis="CN", hippocampus=8, ventricle=20),
        _subject(71, diagnosis="AD", hippocampus=6, ventricle=26),
        _subject(73, diagnosis="AD", hippocampus=6, ventricle=24),
    ]
    pd_ = [
        _subject(60, diagnosis="HC", index=0, midbrain=10),
        _subject(60, diagnosis="HC", index=2, midbrain=12),
        _subject(60, diagnosis="PD", index=1, midbrain=9, putamen=9),
        _subject(60, diagnosis="HC", index=1, midbrain=10, twin=True),  # index 1 as HC: midbrain -1, putamen -1
        _subject(60, diagnosis="PD", index=3, midbrain=11, putamen=9),
        _subject(60, diagnosis="HC", index=3, midbrain=12, twin=True),
    ]
    males = [_subject(40, sex="M", head=1.1), _subject(40, sex="M", head=1.1)]
    frames = {"brain_age": brain_age, "ad": ad, "pd": pd_, "males": males}  # the sex ratio pools every cohort
    return {name: with_icv(pd.DataFrame(rows)) for name, rows in frames.items()}


def test_measurements_on_a_tiny_cohort_with_known_values():
    m = measure(_cohorts())
    assert m["ventricle_ratio_age"] == pytest.approx(30 / 12)  # old (> 75) 30, 30 vs young (< 35) 10, 14
    assert m["gm_decline_age"] == pytest.approx(100 * (1 - 405 / 510))
    assert m["gm_age_rho"] == pytest.approx(-0.9)  # GM ranks 4, 5, 3, 2, 1 against age ranks 1..5
    assert m["hippocampus_decline_age"] == pytest.approx(100 * (1 - 6.8 / 8))
    assert m["ad_hippocampus_ratio"] == pytest.approx(6 / 8)
    assert m["ad_ventricle_ratio"] == pytest.approx(25 / 20)
    # twins: PD minus itself as HC = -1 mL midbrain for both PD subjects; HC midbrain sd = sd(10, 12) = sqrt(2)
    assert m["pd_d_midbrain"] == pytest.approx(-1 / np.sqrt(2))
    assert np.isnan(m["pd_d_putamen"])  # the HC group's putamen does not vary: d undefined, not infinite
    # native ICV = 1000 mL * head_scale ** 3: males 1331, females 1000
    assert m["sex_icv_ratio"] == pytest.approx(1.331)


def test_pd_d_divides_the_twin_differences_by_the_hc_groups_sd():
    # HC midbrain 10, 12, 14 mL (sd 2); PD patients 9, 15 (sd 3√2) and as their own HC twins 10, 17 (sd 3.5√2):
    # PD minus twin -1, -2 (mean -1.5, sd √2/2); the pooled sd of HC and PD, √(26 / 3), differs as well
    cohorts = _cohorts()
    cohorts["pd"] = with_icv(
        pd.DataFrame(
            [
                _subject(60, diagnosis="HC", index=0, midbrain=10),
                _subject(60, diagnosis="HC", index=2, midbrain=12),
                _subject(60, diagnosis="HC", index=4, midbrain=14),
                _subject(60, diagnosis="PD", index=1, midbrain=9),
                _subject(60, diagnosis="HC", index=1, midbrain=10, twin=True),
                _subject(60, diagnosis="PD", index=3, midbrain=15),
                _subject(60, diagnosis="HC", index=3, midbrain=17, twin=True),
            ]
        )
    )
    assert measure(cohorts)["pd_d_midbrain"] == pytest.approx(-1.5 / 2)  # ICV 1000 mL for all: fractions scale alike


def test_ad_d_is_the_group_difference_over_the_pooled_sd():
    # CN hippocampus 8, 10 mL (var 2), AD 5, 9 (var 8): pooled sd sqrt((2 + 8) / 2) = sqrt(5); ICV 1000 mL for all
    cohorts = _cohorts()
    cohorts["ad"] = with_icv(
        pd.DataFrame(
            [
                _subject(70, diagnosis="CN", hippocampus=8),
                _subject(70, diagnosis="CN", hippocampus=10),
                _subject(70, diagnosis="AD", hippocampus=5),
                _subject(70, diagnosis="AD", hippocampus=9),
            ]
        )
    )
    m = measure(cohorts)
    assert m["ad_hippocampus_d"] == pytest.approx((7 - 9) / np.sqrt(5))
    assert np.isnan(m["ad_ventricle_d"])  # no spread in either group: d undefined
    assert "lateral ventricles / ICV (cohort, no target): +nan" in table(m)[0]


def test_table_marks_failures():
    m = measure(_cohorts())
    text, ok = table(m)
    assert not ok and "FAIL" in text  # e.g. the ventricle ratio 2.5 passes, the GM rho of 5 subjects too; PD NaN fails
    passing = {t.key: (t.low if t.low is not None else t.high) for t in TARGETS}
    assert table(passing | {k: v for k, v in m.items() if k.startswith("pd_d_")})[1]


def test_calibrate_command_exits_1_when_a_target_fails(capsys):
    # 8 mm and 6 subjects, and no PD effect at all: each PD subject's HC twin is itself, so PD's d is 0 (or
    # undefined), below the 0.2 the bed needs: a known failure, whatever the other (meaningless) values are
    no_pd = ["atrophy.ventricle_pd_mm=0", "atrophy.midbrain_pd_mm=0", "atrophy.putamen_pd_mm=0"]
    code = main(["calibrate", "--n", "6", "--spacing", "8", "--workers", "1", "--no-progress", *no_pd])
    out = capsys.readouterr().out
    assert code == 1 and "| quantity | measured | target | pass |" in out
    present = next(line for line in out.splitlines() if "mean of midbrain and putamen" in line)
    assert present.endswith("| FAIL |") and "calibration: FAILED" in out
    assert main(["calibrate", "--n", "1", "--spacing", "8"]) == 2


def test_calibrate_command_exits_0_when_every_target_passes(monkeypatch, capsys):
    # the cohorts and their measurements stubbed: every target measured at its bound
    passing = {t.key: (t.low if t.low is not None else t.high) for t in TARGETS}
    monkeypatch.setattr("synth.calibrate.cohort_volumes", lambda cfg, task, *args: _cohorts()[task])
    monkeypatch.setattr("synth.calibrate.measure", lambda cohorts: passing)
    code = main(["calibrate", "--n", "2", "--spacing", "8", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "calibration: all targets pass" in out and "FAIL" not in out
