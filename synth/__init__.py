"""Synthetic brain MRI: anatomy model, deformation and atrophy, contrast and artefacts, cohorts, datasets,
CLI."""
