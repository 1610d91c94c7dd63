"""Code shared by synth, pretrain and finetune: config, models, attention, checkpoints, data, logging.

Importing it first (every package's ``__init__`` does) sets OpenMP's wait policy before torch loads libgomp:
with spinning waits, torch's intra-op threads slow down 20x and more as soon as anything else wants the cores
(DataLoader workers, a second rank, another job); passive waits cost little when the cores are free.
Set ``OMP_WAIT_POLICY`` yourself to choose otherwise.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
