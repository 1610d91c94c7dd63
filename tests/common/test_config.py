from dataclasses import dataclass, field

import pytest

from common.config import load_config, save_config, to_object
from common.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\noptim:\n  lr: 0.1\n")
    cfg = load_config(Run, f, ["optim.lr=0.5", "name=x"])
    assert cfg.steps == 20 and cfg.optim.lr == 0.5 and cfg.name == "x"
    assert isinstance(to_object(cfg), Run)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(Run, None, ["optim.lrr=1"])
    f = tmp_path / "bad.yaml"
    f.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(Run, f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="steps"):
        load_config(Run, None, ["steps=many"])


def test_bad_override_form_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Run, None, ["steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "nope.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(Run, None, ["steps=7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Run, out).steps == 7
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]


@dataclass
class Model:
    name: str = "vit"
    kwargs: dict = field(default_factory=dict)
    optim: Optim = field(default_factory=Optim)


def test_free_form_mapping_takes_new_keys_but_typed_nodes_stay_closed():
    cfg = load_config(Model, None, ["kwargs.depth=2", "kwargs.patch_size=[2,16,16]"])
    assert cfg.kwargs.depth == 2 and list(cfg.kwargs.patch_size) == [2, 16, 16]
    with pytest.raises(ConfigError, match="optim.momentum"):
        load_config(Model, None, ["optim.momentum=0.9"])
