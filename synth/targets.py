"""The real-world effect sizes the synthetic bed is calibrated to, with their published sources: the one place
they live (``python -m synth calibrate`` checks the generator against them; docs/synth.md shows them).

Volumes are fractions of intracranial volume (ICV = every label but background), measured on label maps; ``old``
is > 75 y and ``young`` < 35 y in the brain-age cohort; AD effects compare the AD cohort's two groups (ratios of
means, and Cohen's d over the pooled sd, which also checks how much subjects vary); PD's d compares each PD subject
with itself as HC (a twin), over the HC group's sd.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str
    quantity: str  # what is measured, in words
    low: float | None  # pass when low <= measured <= high (None: unbounded)
    high: float | None
    source: str

    def passes(self, value: float) -> bool:
        return value == value and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    @property
    def range(self) -> str:
        if self.low is None:
            return f"<= {self.high:g}"
        if self.high is None:
            return f">= {self.low:g}"
        return f"{self.low:g} – {self.high:g}"


BETHLEHEM = "Bethlehem et al., Brain charts for the human lifespan, Nature 2022"
TARGETS = (
    Target(
        "ventricle_ratio_age",
        "lateral ventricles / ICV, old / young (mean ratio)",
        2.0,
        3.5,
        f"{BETHLEHEM} (ventricles rise slowly, then fast after ~60); Walhovd et al., Neurobiol Aging 2005",
    ),
    Target(
        "gm_decline_age",
        "grey matter / ICV, decline old vs young (%)",
        12.0,
        25.0,
        f"{BETHLEHEM}; Good et al., NeuroImage 2001 (linear GM decline over adulthood)",
    ),
    Target(
        "gm_age_rho",
        "grey matter / ICV vs age, Spearman rho",
        None,
        -0.7,
        "Good et al., NeuroImage 2001; Franke et al., NeuroImage 2010 (GM maps give brain age r ~ 0.9)",
    ),
    Target(
        "hippocampus_decline_age",
        "hippocampi / ICV, decline old vs young (%)",
        8.0,
        25.0,
        "Raz et al., Cereb Cortex 2005 (faster shrinkage after ~60); Nobis et al., NeuroImage Clin 2019 (UK Biobank)",
    ),
    Target(
        "ad_hippocampus_ratio",
        "hippocampi / ICV, AD / CN (mean ratio)",
        0.72,
        0.85,
        "Shi et al., Hippocampus 2009 (meta-analysis: AD ~24 % smaller); ADNI volumetry",
    ),
    Target(
        "ad_ventricle_ratio",
        "lateral ventricles / ICV, AD / CN (mean ratio)",
        1.15,
        1.5,
        "Nestor et al., Brain 2008 (ADNI ventricular enlargement); Apostolova et al., Alz Dis Assoc Disord 2012",
    ),
    Target(
        "ad_hippocampus_d",
        "hippocampi / ICV, AD vs CN Cohen's d (cohort: between-subject spread)",
        -1.5,
        -1.0,
        "issue #28's range for real cohorts (hippocampal volume alone: ROC-AUC ~0.76-0.86 for equal-variance "
        "normals); Cuingnet et al., NeuroImage 2011 (ADNI: hippocampus-based classifiers below the whole-brain ones' "
        "81 % sensitivity / 95 % specificity); manual volumetry of small samples separates better (Laakso et al., "
        "Neurobiol Aging 1998: 92 % correct); our reading, not a published d",
    ),
    Target(
        "pd_max_abs_d",
        "largest |Cohen's d| PD vs HC over regions (twins; small)",
        None,
        0.6,
        "Laansma et al., Mov Disord 2021 (ENIGMA-PD: subcortical d ~ 0.1–0.3); Dhinagar et al., ISBI 2023 "
        "(T1-only PD classifiers ROC-AUC 0.59–0.65)",
    ),
    Target(
        "pd_effect_present",
        "|Cohen's d| PD vs HC, mean of midbrain and putamen (twins; present)",
        0.2,
        None,
        "Laansma et al., Mov Disord 2021; the bed needs a PD signal to find",
    ),
    Target(
        "sex_icv_ratio",
        "native ICV, male / female (mean ratio)",
        1.08,
        1.16,
        "Ruigrok et al., Neurosci Biobehav Rev 2014 (meta-analysis: male ICV ~12 % larger)",
    ),
)
PD_REGIONS = ("midbrain", "putamen", "caudate", "hippocampus", "ventricle", "gm", "wm")

# The scanner side, measured on a cohort's images as the models see them (``python -m synth.realism``).
SCANNER_TARGETS = (
    Target(
        "site_balanced_accuracy",
        "site predicted from the brain-intensity histogram, balanced accuracy (5-fold CV)",
        0.9,
        None,
        "Glocker et al., arXiv 1910.04597, 2019 (a classifier tells Cam-CAN from UK Biobank T1 scans with very high "
        "accuracy after careful preprocessing; the harmonisation methods tried did not remove the scanner bias); "
        "the 0.9 is our reading of 'very high' for three sites, not a published figure",
    ),
    Target(
        "site_variance_share",
        "between-site share of voxel variance (eta squared, mean over brain voxels)",
        0.01,
        0.3,
        "our choice, not from a publication: sites must differ (> 1 %) while anatomy and covariates carry most "
        "of the variance between subjects, as registration and intensity normalisation leave it",
    ),
)
