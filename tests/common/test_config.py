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


@dataclass
class Paths:
    manifest: str = "m.csv"
    init: str = "scratch"
    steps: int = 10
    kwargs: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_user_paths_are_never_interpolated(tmp_path):
    literal = {"manifest": "/data/${HOME}/m.csv", "init": r"C:\${oops}\w.pth"}
    f = tmp_path / "c.yaml"
    f.write_text("manifest: /data/${HOME}/m.csv\nkwargs: {root: '${oops}'}\nfiles: ['${a}.nii', b.nii]\n")
    cfg = load_config(Paths, f, [r"init=C:\${oops}\w.pth"])
    assert cfg.manifest == literal["manifest"] and cfg.init == literal["init"]
    assert cfg.kwargs.root == "${oops}" and list(cfg.files) == ["${a}.nii", "b.nii"]
    run = to_object(cfg)
    assert (run.manifest, run.init, run.kwargs, run.files) == (
        *literal.values(),
        {"root": "${oops}"},
        ["${a}.nii", "b.nii"],
    )
    for saved in (save_config(cfg, tmp_path / "a.yaml"), save_config(run, tmp_path / "b.yaml")):
        assert to_object(load_config(Paths, saved)) == run  # the saved run reads back the same, literally
    assert to_object(load_config(run)) == run  # a dataclass instance as the defaults: its paths stay literal too


@pytest.mark.parametrize(
    "override,message",
    [
        ("steps=many", "command line: key 'steps' expects an integer, got 'many'"),
        ("steps=[1", "override 'steps=[1': the value is not valid YAML"),
        ("optim=3", "command line: key 'optim' expects a mapping of lr, betas, got 3"),
        ("optim.lr.x=1", "command line: key 'optim.lr' expects a number, got {'x': 1}"),
        ("files=3", "command line: key 'files' expects a list of str, got 3"),
        ("kwargs=3", "command line: key 'kwargs' expects a mapping, got 3"),
        ("optim.lrr=1", "command line: unknown key 'optim.lrr'; did you mean 'lr'?"),
        ("stepz=1", "command line: unknown key 'stepz'; did you mean 'steps'?"),
    ],
)
def test_omegaconf_errors_are_one_line_naming_the_key_and_what_it_takes(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Paths, None, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_string_field_takes_the_text_as_typed_and_a_yaml_misfit_is_one_line(tmp_path):
    cfg = load_config(Paths, None, ["init=monai:", "manifest=[a", "steps=3"])  # YAML would read a mapping, an error
    assert (cfg.init, cfg.manifest, cfg.steps) == ("monai:", "[a", 3)
    f = tmp_path / "c.yaml"
    f.write_text("init: {monai: x}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'init' expects a string, got \{'monai': 'x'\}; quote"):
        load_config(Paths, f)
