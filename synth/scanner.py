"""Scanner (site) profiles: contrast, bias, noise and resolution of one scanner, and a subject's jitter of it.

A cohort's K sites are K profiles drawn from ``ScannerConfig`` ranges with seeds of their own, so a site held
out of training is a scanner the model has never seen (a real out-of-distribution test). The k-space artefacts
(a site's Gibbs ringing, a subject's motion ghosts) are drawn from a child of the rng (``Generator.spawn``),
which advances no stream: with them off, every other draw, and so every existing volume, stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from synth.config import SynthConfig
from synth.contrast import sample_means

# Where periodic motion puts its ghosts, as a share of the field of view along phase encoding: a period of a few
# TRs to a few tens of lines (breathing, swallowing, tremor) puts the first ghost this far from the object.
GHOST_SHIFT = (0.1, 0.4)


@dataclass(frozen=True)
class ScannerProfile:
    contrast: str  # "t1" or "random"
    means: tuple[float, float, float]  # CSF, GM, WM intensity on [0, 1]
    bias_sd: float  # sd of the log bias field
    noise_sd: float  # noise sd on [0, 1]
    rician: bool  # Rician (magnitude) noise, else Gaussian
    resolution_mm: tuple[float, float, float]  # acquired voxel size (the slice axis is the coarse one)
    gamma: float  # contrast curve I ** gamma
    phase_axis: int = 1  # the phase-encoding axis (not the slice axis): ringing and ghosts run along it
    ringing_mm: float = 0.0  # resolution k-space is truncated to along phase_axis (Gibbs ringing); 0: none
    ghost_amplitude: float = 0.0  # motion ghosts' intensity relative to the image; 0: the subject kept still
    ghost_shift: float = 0.0  # their distance along phase_axis, as a share of the field of view

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
            "phase_axis": self.phase_axis,
            "ringing_mm": round(self.ringing_mm, 3),
            "ghost_amplitude": round(self.ghost_amplitude, 4),
            "ghost_shift": round(self.ghost_shift, 4),
        }


def sample_site(cfg: SynthConfig, contrast: str, rng: np.random.Generator) -> ScannerProfile:
    """A new scanner drawn from the config's ranges."""
    s = cfg.scanner
    resolution = [rng.uniform(*s.inplane_mm)] * 3
    thickness = rng.uniform(*s.slice_mm)  # drawn before the axis, as it always was
    slice_axis = int(rng.integers(3))
    resolution[slice_axis] = thickness
    own = rng.spawn(1)[0]  # the k-space draws: no stream of rng advances
    phase_axis = [a for a in range(3) if a != slice_axis][int(own.integers(2))]
    ringing = float(own.uniform(*s.ringing_mm)) if own.random() < s.ringing_probability else 0.0
    return ScannerProfile(
        contrast=contrast,
        means=tuple(float(m) for m in sample_means(cfg.intensity, contrast, rng)),
        bias_sd=float(rng.uniform(*s.bias_sd)),
        noise_sd=float(rng.uniform(*s.noise_sd)),
        rician=bool(rng.random() < s.rician_probability),
        resolution_mm=tuple(float(r) for r in resolution),
        gamma=float(np.exp(rng.normal(0.0, cfg.intensity.gamma_log_sd))),
        phase_axis=phase_axis,
        ringing_mm=ringing,
    )


def jitter_for_subject(site: ScannerProfile, cfg: SynthConfig, rng: np.random.Generator) -> ScannerProfile:
    """The site's scanner on one subject's day: tissue means, noise and contrast curve vary a little; a subject
    who moves (``ghost_probability``) gets motion ghosts."""
    means = sample_means(cfg.intensity, site.contrast, rng, sd=cfg.intensity.t1_subject_sd, around=np.array(site.means))
    own = rng.spawn(1)[0]  # the motion draws: no stream of rng advances
    moved = own.random() < cfg.scanner.ghost_probability
    return replace(
        site,
        means=tuple(float(m) for m in means),
        noise_sd=float(site.noise_sd * np.exp(rng.normal(0.0, cfg.scanner.subject_noise_log_sd))),
        gamma=float(site.gamma * np.exp(rng.normal(0.0, cfg.intensity.gamma_log_sd / 4))),
        ghost_amplitude=float(own.uniform(*cfg.scanner.ghost_amplitude)) if moved else 0.0,
        ghost_shift=float(own.uniform(*GHOST_SHIFT)) if moved else 0.0,
    )
