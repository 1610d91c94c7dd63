"""Synthetic brain MRI: anatomy model, deformation and atrophy, contrast and artefacts, cohorts, datasets, CLI."""

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
