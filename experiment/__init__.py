"""The experiment above the three packages: synthetic data (synth) → pre-training per source (pretrain) →
fine-tuning grids (finetune) → one report."""

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
