"""Self-supervised pre-training: corpora, objectives (MAE, SimCLR, MoCo v3) and the DeepSpeed engine."""

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
