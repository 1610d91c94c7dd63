"""One cell's config is checked in ``finetune.config.validate``: each allowed-value list once, errors name the key."""

import pytest

from common.config import load_config, to_object
from common.errors import ConfigError
from finetune.config import TRAIN_MODES, RunConfig, validate
from finetune.modes import MODES


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.mode=adapter", "train.mode must be one of"),
        ("train.head_norm=layer", "train.head_norm must be one of"),
        ("train.head_init=zero", "train.head_init must be one of"),
        ("train.precision=on", "train.precision must be one of"),
        ("train.device=tpu", "train.device must be one of"),
        ("threshold=median", "threshold must be one of"),
        ("protocol.scheme=bootstrap", "protocol.scheme must be one of"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_key(override, message):
    cfg = to_object(load_config(RunConfig, None, ["manifest=m.csv", override]))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_defaults_are_valid_but_for_the_manifest_and_every_mode_is_implemented():
    validate(to_object(load_config(RunConfig, None, ["manifest=m.csv"])))
    with pytest.raises(ConfigError, match="manifest is not set"):
        validate(RunConfig())
    assert set(MODES) == set(TRAIN_MODES)
