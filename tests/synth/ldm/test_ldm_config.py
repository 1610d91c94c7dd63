"""synth/ldm/config.py: shapes the networks cannot halve are refused."""

from __future__ import annotations

import pytest
from ldm_toys import TINY

from common.errors import ConfigError
from synth.ldm.cli import main
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


def test_a_zero_head_width_where_attention_runs_is_a_config_error(corpus, tmp_path, capsys):
    # the UNet's middle block attends with the last level's head width, whatever attention_levels says
    heads = ["unet.attention_levels=[false,false]", "unet.num_head_channels=[0,0]"]
    assert main(["ldm-train", "--manifest", str(corpus), "--out", str(tmp_path / "o"), *TINY, *heads]) == 2
    assert "unet.num_head_channels[1]=0 must be > 0" in capsys.readouterr().err
