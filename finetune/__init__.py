"""Fine-tune suite: tasks (AD, PD, brain age), leakage-safe protocol, linear probe / full fine-tuning,
metrics with bootstrap CIs, and the benchmark grid (``python -m finetune run|benchmark``)."""

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
from finetune.config import GridConfig, RunConfig
from finetune.grid import run_grid
from finetune.run import run_cell

__all__ = ["GridConfig", "RunConfig", "run_cell", "run_grid"]
