"""The experiment's config: wrong values and fields the experiment owns are errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
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
    cfg.pretrain[0].corpus = "medical"
    with pytest.raises(ConfigError, match="corpus must be one of"):
        validate(cfg)
    with pytest.raises(ConfigError, match="needs synth.ldm_model"):
        load_experiment_config(SMOKE, ["synth.corpus_backend=ldm"])
    with pytest.raises(ConfigError, match="synth.corpus_backend must be one of"):
        load_experiment_config(SMOKE, ["synth.corpus_backend=gan"])
    with pytest.raises(ConfigError, match="synth.cohorts"):
        load_experiment_config(SMOKE, ["synth.cohorts.ms.n=3"])
    cfg = load_experiment_config(SMOKE)
    cfg.synth.cohorts = {}
    with pytest.raises(ConfigError, match="synth.cohorts is empty"):
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
    with pytest.raises(SystemExit) as stop:
        finetune_main(["experiment", "--config", str(SMOKE)])
    assert stop.value.code == 2 and "invalid choice: 'experiment'" in capsys.readouterr().err
