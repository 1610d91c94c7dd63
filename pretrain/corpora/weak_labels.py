"""Weak labels: a corpus's exact covariates (age) made noisy or partial on purpose, to measure how much of a
covariate-aware objective's gain (y-aware) is the label.

A collection's metadata is noisy (an age misrecorded) and partial (some subjects have none). ``WeakLabels`` turns
an exact covariate into such a label: each subject gets one fixed value, ``value + N(0, noise_sd²)``, and only a
``fraction`` of subjects have one at all; the others get NaN, which the y-aware loss reads as "no label". Both
draws come from ``numpy.random.default_rng([seed, covariate, subject])``, so a subject's label is the same every
time it is drawn, in any worker and after a resume, as a label in a real collection is; and the subjects labelled
at one fraction are a subset of those labelled at a higher one (one uniform draw decides).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _key(text: str) -> int:
    """A stable 64-bit integer for ``text`` (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class WeakLabels:
    """``(covariates, subject) -> covariates`` as a weakly labelled collection would give them."""

    noise_sd: float = 0.0  # SD of the per-subject error, in the covariate's units (years for age)
    fraction: float = 1.0  # share of subjects that have a label; the others get NaN
    seed: int = 0  # the run's seed: another run draws other errors and other labelled subjects

    @classmethod
    def from_config(cls, cfg) -> WeakLabels:
        """The run config's ``objective.contrastive.label_noise_sd`` / ``label_fraction`` with ``train.seed``."""
        c = cfg.objective.contrastive
        return cls(float(c.label_noise_sd), float(c.label_fraction), int(cfg.train.seed))

    @property
    def exact(self) -> bool:
        return self.noise_sd == 0 and self.fraction >= 1

    def value(self, name: str, subject: str, exact: float) -> float:
        """Subject ``subject``'s label for covariate ``name`` whose true value is ``exact``; NaN: unlabelled."""
        rng = np.random.default_rng([self.seed, _key(name), _key(subject)])
        labelled = rng.random() < self.fraction  # drawn first, so the labelled set does not depend on noise_sd
        error = self.noise_sd * rng.standard_normal()
        return float(exact + error) if labelled else float("nan")

    def apply(self, values: Mapping[str, float], subject: str) -> dict[str, float]:
        """Every covariate of one item, ``{name: exact value}``, as its subject's weak labels."""
        return {name: self.value(name, subject, v) for name, v in values.items()}

    def describe(self, covariates: Sequence[str]) -> str:
        """In words (ASCII: the card's YAML front matter holds them): ``age exact, for every subject``."""
        noise = f"with a Gaussian error of SD {self.noise_sd:g} (fixed per subject)" if self.noise_sd else "exact"
        share = "every subject" if self.fraction >= 1 else f"{self.fraction:.0%} of subjects (the others unlabelled)"
        return f"{', '.join(covariates)} {noise}, for {share}"
