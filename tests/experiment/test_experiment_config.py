"""The experiment's config: wrong values and fields the experiment owns are errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from common.errors import ConfigError
from experiment.cli import main as experiment_main
from experiment.config import OWNED, load_experiment_config, validate
from experiment.stages import Experiment
from finetune.cli import main as finetune_main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def test_the_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "experiment").glob("*.yaml")):
        load_experiment_config(path)


def test_wrong_values_name_the_problem():
    cfg = load_experiment_config(SMOKE)
    cfg.pretrain[0].backbone = "nope"
    with pytest.raises(ConfigError, match="backbone 'nope'"):
        validate(cfg)
    cfg = load_experiment_config(SMOKE)
    cfg.pretrain[0].corpus = "packed"
    with pytest.raises(ConfigError, match="corpus must be one of"):
        validate(cfg)
    cfg.pretrain[0].corpus = "medical"
    with pytest.raises(ConfigError, match="corpus medical takes its images from `manifest`"):
        validate(cfg)
    with pytest.raises(ConfigError, match="needs synth.ldm_model"):
        load_experiment_config(SMOKE, ["synth.corpus_backend=ldm"])
    with pytest.raises(ConfigError, match="synth.corpus_backend must be one of"):
        load_experiment_config(SMOKE, ["synth.corpus_backend=gan"])
    with pytest.raises(ConfigError, match="synth.cohorts"):
        load_experiment_config(SMOKE, ["synth.cohorts.ms.n=3"])
    cfg = load_experiment_config(SMOKE)
    cfg.synth.cohorts = {}
    with pytest.raises(ConfigError, match="no tasks: list generated cohorts in synth.cohorts.* or your own in cohorts"):
        validate(cfg)
    cfg.cohorts = {"brain_age": "m.csv", "classify:handedness": "n.csv", "ad_typo": "o.csv"}
    with pytest.raises(ConfigError, match="cohorts: unknown task 'ad_typo'"):
        validate(cfg)
    with pytest.raises(ConfigError, match="in_site_scheme must be one of"):
        load_experiment_config(SMOKE, ["in_site_scheme=loso"])


def test_the_in_site_scheme_reaches_the_grid_and_the_out_of_site_one_stays_ood():
    cfg = load_experiment_config(SMOKE, ["in_site_scheme=holdout"])
    experiment = Experiment(cfg)
    assert experiment.grid_config(ood=False).base.protocol.scheme == "holdout"
    assert experiment.grid_config(ood=True).base.protocol.scheme == "ood"
    assert Experiment(load_experiment_config(SMOKE)).grid_config(ood=False).base.protocol.scheme == "kfold"


@pytest.mark.parametrize("key", sorted(OWNED))
def test_a_field_the_experiment_owns_is_an_error(tmp_path, key):
    value = "{}" if key == "grid.tasks" else "[]" if key.endswith(("inits", "sites", "datasets", "manifests")) else "x"
    value = "[1.0,1.0,1.0]" if key.endswith("spacing") else value
    with pytest.raises(ConfigError, match=f"command line: {key} is set by the experiment"):
        load_experiment_config(SMOKE, [f"{key}={value}"])
    nested = value
    for part in reversed(key.split(".")):
        nested = f"{{{part}: {nested}}}"
    yaml = tmp_path / "owned.yaml"
    yaml.write_text(nested + "\n")
    with pytest.raises(ConfigError, match=f"owned.yaml: {key} is set by the experiment"):
        load_experiment_config(yaml)


def test_the_experiment_has_one_entry_point(capsys):
    assert finetune_main(["experiment", "--config", str(SMOKE)]) == 2
    assert "invalid choice: 'experiment'" in capsys.readouterr().err


def _run_cli(capsys, *argv: str) -> str:
    """``python -m experiment`` in-process: it must end with exit 2 and one ``error:`` line, which is returned."""
    assert experiment_main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_file_given_as_the_output_folder_is_one_error_line(tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("keep me\n")
    assert "results.txt: out_dir (--out) is a file" in _run_cli(capsys, "--config", str(SMOKE), "--out", str(file))
    assert "which is a file" in _run_cli(capsys, "--config", str(SMOKE), "--out", str(file / "sub"))
    assert file.read_text() == "keep me\n"


def _smoke_with(tmp_path, edit) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    edit(raw)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


STAGE_MISTAKES = {  # what the tester found running minutes into an experiment, and the error that now comes first
    "grid.base.train.mode=lnear": r"in-site cell ad/vit/scratch/.*train.mode must be one of .*'lnear'",
    "grid.fractions=[1.5]": r"grid.fractions: every fraction must lie in \(0, 1\], got \[1.5\]",
    "grid.fractions=[]": "grid.fractions is empty",
    "grid.seeds=[]": "grid.seeds is empty",
    "ood_fractions=[0.0]": r"ood_fractions: every fraction must lie in \(0, 1\]",
    "ood_sites=[site9]": r"ood_sites: \['site9'\] not among the sites of cohort ad \(\['site0', 'site1'\]",
    "ood_sites=[site0,site1]": "hold out every site of cohort ad",
    "synth.overrides=[atrophy.max_mm=9]": r"synth.overrides \['atrophy.max_mm=9'\]: .*atrophy.max_mm must lie",
}


@pytest.mark.parametrize("override", sorted(STAGE_MISTAKES))
def test_every_stage_is_checked_before_anything_is_written(tmp_path, capsys, override):
    out = tmp_path / "experiment"
    error = _run_cli(capsys, "--config", str(SMOKE), "--out", str(out), override)
    assert re.search(STAGE_MISTAKES[override], error), error
    assert not (out / "data").exists() and not out.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["pretrain"][0]["overrides"].append("objective.name=mea"), "objective.name must be one of"),
        (lambda raw: raw["pretrain"][0]["overrides"].append("optim.lr=fast"), "key 'optim.lr' expects a number"),
        (lambda raw: raw["pretrain"][1].update(config="configs/pretrain/nope.yaml"), "nope.yaml not found"),
        (lambda raw: raw["grid"]["backbones"][0].update(name="vit_huge_p99"), "names 'vit_huge_p99', not one of"),
    ],
)
def test_pretrain_entries_and_grid_backbones_are_checked_before_anything_is_written(tmp_path, capsys, edit, message):
    out = tmp_path / "experiment"
    error = _run_cli(capsys, "--config", str(_smoke_with(tmp_path, edit)), "--out", str(out))
    assert message in error and (error.startswith("error: pretrain entry") or "grid.backbones" in error), error
    assert not out.exists()


def test_an_empty_experiment_yaml_asks_for_the_cohorts_and_its_defaults_fit_together(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "no tasks: list generated cohorts" in _run_cli(capsys, "--config", str(empty), "--out", str(tmp_path / "x"))
    cfg = load_experiment_config(empty, ["synth.cohorts={ad: {n: 20, sites: 3}}", f"out_dir={tmp_path / 'x'}"])
    Experiment(cfg)  # the default pretrain entry pre-trains the default grid's backbone; every stage's config checks
    cfg.grid.backbones[0].label = "cnn"
    with pytest.raises(
        ConfigError, match=r"pretrain entry 'synthmri_mae': backbone 'vit' is not a label of .*\['cnn'\]"
    ):
        validate(cfg)


def test_spacing_has_one_key_and_flows_down_to_every_stage(tmp_path):
    """spacing decides the corpus's, the cohorts', the pre-training's and the fine-tuning's voxel size; an old
    YAML stating the same spacing twice (or under synth) still loads (warned), a different one is refused."""
    cfg = load_experiment_config(SMOKE, [f"out_dir={tmp_path / 'e'}", "spacing=6.0"])
    experiment = Experiment(cfg)
    assert experiment.synth_config(corpus=True).spacing == 6.0 == experiment.synth_config(corpus=False).spacing
    assert all(experiment.pretrain_config(spec).data.spacing == [6.0] * 3 for spec in cfg.pretrain)
    assert experiment.grid_config(ood=False).base.data.spacing == [6.0] * 3
    assert load_experiment_config(SMOKE, ["synth.spacing=6.0", "grid.base.data.spacing=[6.0,6.0,6.0]"]).spacing == 6
    with pytest.raises(ConfigError, match="grid.base.data.spacing is set by the experiment"):
        load_experiment_config(SMOKE, ["spacing=6.0", "grid.base.data.spacing=[4.0,4.0,4.0]"])
    with pytest.raises(ConfigError, match="synth.overrides sets spacing.*set spacing instead"):
        Experiment(load_experiment_config(SMOKE, [f"out_dir={tmp_path / 'f'}", "synth.overrides=[spacing=2]"]))


def test_a_pretrain_override_of_what_the_experiment_sets_is_refused(tmp_path):
    cfg = load_experiment_config(SMOKE, [f"out_dir={tmp_path / 'e'}"])
    cfg.pretrain[0].overrides = [*cfg.pretrain[0].overrides, "data.shape=[8,8,8]"]
    with pytest.raises(ConfigError, match=r"sets data.shape, which the experiment sets from grid.base.data.shape"):
        Experiment(cfg)
