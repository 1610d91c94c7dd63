"""synth/ldm/config.py: shapes the networks cannot halve are refused."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from synth.ldm.config import LDMDataConfig, LDMTrainConfig


def test_config_rejects_a_shape_the_networks_cannot_halve():
    with pytest.raises(ConfigError, match="data.shape"):
        LDMTrainConfig(data=LDMDataConfig(shape=[20, 16, 16]))


def test_precision_and_device_use_the_common_words():
    with pytest.raises(ConfigError, match="precision must be one of"):
        LDMTrainConfig(precision="on")
    with pytest.raises(ConfigError, match="device must be one of"):
        LDMTrainConfig(device="tpu")
    assert LDMTrainConfig(device="cuda:1").device == "cuda:1"  # checked for availability when resolved
