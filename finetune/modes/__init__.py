"""Training modes: ``linear`` (frozen backbone, cached features, scikit-learn probe), ``full`` fine-tuning and
``lora`` (peft adapters on the frozen backbone, full fine-tuning's loop).

Both take the same ``FoldInputs`` and return ``(val_output, test_output)``: class probabilities (n, C) for
classification, predictions (n,) for regression.
"""

from finetune.modes.common import FoldInputs
from finetune.modes.full import fit_predict_full
from finetune.modes.linear_probe import fit_predict_linear
from finetune.modes.lora import fit_predict_lora

MODES = {"linear": fit_predict_linear, "full": fit_predict_full, "lora": fit_predict_lora}  # config.TRAIN_MODES

__all__ = ["MODES", "FoldInputs"]
