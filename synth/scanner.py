"""Scanner (site) profiles: contrast, bias, noise and resolution of one scanner, and a subject's jitter of it.

A cohort's K sites are K profiles drawn from ``ScannerConfig`` ranges with seeds of their own, so a site held
out of training is a scanner the model has never seen (a real out-of-distribution test).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from synth.config import SynthConfig
from synth.contrast import sample_means


@dataclass(frozen=True)
class ScannerProfile:
    contrast: str  # "t1" or "random"
    means: tuple[float, float, float]  # CSF, GM, WM intensity on [0, 1]
    bias_sd: float  # sd of the log bias field
    noise_sd: float  # noise sd on [0, 1]
    rician: bool  # Rician (magnitude) noise, else Gaussian
    resolution_mm: tuple[float, float, float]  # acquired voxel size (the slice axis is the coarse one)
    gamma: float  # contrast curve I ** gamma

    def as_dict(self) -> dict[str, object]:
        return {
            "contrast": self.contrast,
            "mean_csf": round(self.means[0], 4),
            "mean_gm": round(self.means[1], 4),
            "mean_wm": round(self.means[2], 4),
            "bias_sd": round(self.bias_sd, 4),
            "noise_sd": round(self.noise_sd, 5),
            "noise": "rician" if self.rician else "gaussian",
            "resolution_mm": "x".join(f"{r:.2f}" for r in self.resolution_mm),
            "gamma": round(self.gamma, 4),
        }


def sample_site(cfg: SynthConfig, contrast: str, rng: np.random.Generator) -> ScannerProfile:
    """A new scanner drawn from the config's ranges."""
    s = cfg.scanner
    resolution = [rng.uniform(*s.inplane_mm)] * 3
    resolution[int(rng.integers(3))] = rng.uniform(*s.slice_mm)
    return ScannerProfile(
        contrast=contrast,
        means=tuple(float(m) for m in sample_means(cfg.intensity, contrast, rng)),
        bias_sd=float(rng.uniform(*s.bias_sd)),
        noise_sd=float(rng.uniform(*s.noise_sd)),
        rician=bool(rng.random() < s.rician_probability),
        resolution_mm=tuple(float(r) for r in resolution),
        gamma=float(np.exp(rng.normal(0.0, cfg.intensity.gamma_log_sd))),
    )


def jitter_for_subject(site: ScannerProfile, cfg: SynthConfig, rng: np.random.Generator) -> ScannerProfile:
    """The site's scanner on one subject's day: tissue means, noise and contrast curve vary a little."""
    means = sample_means(cfg.intensity, site.contrast, rng, sd=cfg.intensity.t1_subject_sd, around=np.array(site.means))
    return replace(
        site,
        means=tuple(float(m) for m in means),
        noise_sd=float(site.noise_sd * np.exp(rng.normal(0.0, cfg.scanner.subject_noise_log_sd))),
        gamma=float(site.gamma * np.exp(rng.normal(0.0, cfg.intensity.gamma_log_sd / 4))),
    )
