"""Fine-tuning a BatchNorm CNN in bf16 (full, and LoRA through peft; the head starting as the linear probe) is
checked before it trains (common.bf16_check): its convolutions below their kernel compute in fp32, and its
predictions stay finite. On a CPU with native bf16 these convolutions are where oneDNN's bf16 weight gradient
is garbage; without the check, 2 of 7 such runs gave NaN there."""

import numpy as np
import pytest

from finetune.config import OptimConfig, TrainConfig
from finetune.modes.full import fit_predict_full
from finetune.modes.lora import fit_predict_lora
from tests.finetune.test_head_init import inputs


@pytest.mark.parametrize("mode, fit", [("full", fit_predict_full), ("lora", fit_predict_lora)])
def test_bf16_fine_tuning_of_a_batchnorm_cnn_is_checked_and_stays_finite(mode, fit, caplog):
    caplog.set_level("INFO")
    fold = inputs("classification")  # ResNet-18 x0.25 at 16³: layer2 on sees 2³ and less
    cfg = TrainConfig(mode=mode, epochs=3, batch_size=8, head_init="probe", precision="bf16", device="cpu")
    val_out, test_out, info = fit(fold, cfg, OptimConfig())
    assert info["precision"] == "bf16"
    assert np.isfinite(val_out).all() and np.isfinite(test_out).all()
    assert "fold 0: train.precision bf16 -> bf16: bf16 as asked" in caplog.text
    moved = ".base_layer" if mode == "lora" else ""  # peft wraps the convolution
    assert f"net.layer3.0.conv2{moved} (input (8, 64, 1, 1, 1), extent below the kernel" in caplog.text
    assert "FAILS" not in caplog.text
