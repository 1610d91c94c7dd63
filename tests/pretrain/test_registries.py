"""The objective and corpus registries are the one list of names: every registered name validates and builds, an
unknown one is refused with the registered ones listed, and the covariate check, the CLI's choices and the model
card's words are read off them."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config
from common.data import PreprocessConfig
from common.data.packed import pack_manifest
from common.errors import ConfigError, UsageError
from common.export import export_folder
from common.models import create_backbone
from pretrain.cli import parse_args
from pretrain.config import PretrainConfig, validate
from pretrain.corpora import CORPORA, build_source
from pretrain.objectives import OBJECTIVES, SimCLR, build_objective
from pretrain.registry import Registry
from pretrain.trainer import card_descriptions

SMALL = ["objective.mae.decoder_dim=24", "objective.mae.decoder_heads=2", "objective.contrastive.proj_hidden=32"]


def tiny_vit():
    return create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1, embed_dim=24, num_heads=2)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_registered_objective_validates_and_builds_its_class(name):
    cfg = load_config(PretrainConfig, None, [f"objective.name={name}", *SMALL])
    validate(cfg)  # the default corpus, synthmri, carries every covariate an objective needs
    objective = build_objective(cfg.objective, tiny_vit())
    assert type(objective) is OBJECTIVES[name].cls
    views = {"view1": torch.rand(2, 1, 16, 16, 16), "view2": torch.rand(2, 1, 16, 16, 16)}
    batch = views if objective.needs_views else {"image": torch.rand(2, 1, 16, 16, 16)}
    batch |= {c: torch.tensor([60.0, 70.0]) for c in objective.needs_covariates}
    assert torch.isfinite(objective(batch)["loss"])


@pytest.fixture
def corpus_overrides(tmp_path, nifti_dir, video_dir):
    """Settings under which every registered corpus builds from tiny data (16³ at 4 mm)."""
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": [str(nifti_dir / "s1.nii.gz"), str(nifti_dir / "s2.nii.gz")]}).to_csv(manifest, index=False)
    pack_manifest(manifest, tmp_path / "pack", PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=(16, 16, 16)))
    return [
        "data.shape=[16,16,16]",
        "data.spacing=[4.0,4.0,4.0]",
        f"data.medical.directory={nifti_dir}",
        f"data.video.paths=[{video_dir}]",
        f"data.packed.directory={tmp_path / 'pack'}",
    ]


def test_every_registered_corpus_validates_and_builds_its_source(corpus_overrides):
    for name in CORPORA:
        cfg = load_config(PretrainConfig, None, [f"corpus={name}", *corpus_overrides])
        validate(cfg)
        source = build_source(cfg)
        assert source.name == name
        if name != "video":  # the video folder holds a corrupt clip on purpose
            assert source.item(1, np.random.default_rng(0)).shape == (1, 16, 16, 16)
    mixed = build_source(load_config(PretrainConfig, None, ["corpus=mixed", "data.mixed.video=0", *corpus_overrides]))
    assert [s.name for s in mixed.sources] == ["synthmri", "medical"]  # MixedConfig's fields, weight 0 left out


def test_an_unknown_name_is_a_config_error_listing_the_registered_ones():
    for key, names in (("corpus", CORPORA), ("objective.name", OBJECTIVES)):
        with pytest.raises(ConfigError, match=re.escape(f"{key} must be one of {tuple(names)}, got 'nothing'")):
            validate(load_config(PretrainConfig, None, [f"{key}=nothing"]))
    cfg = load_config(PretrainConfig)
    with pytest.raises(ConfigError, match=re.escape(f"corpus must be one of {tuple(CORPORA)}, got 'books'")):
        build_source(cfg, "books")
    cfg.objective.name = "byol"
    with pytest.raises(ConfigError, match=re.escape(f"objective.name must be one of {tuple(OBJECTIVES)}, got 'byol'")):
        build_objective(cfg.objective, tiny_vit())


def test_a_name_is_registered_once():
    registry = Registry("thing", dict)
    registry.register("a")(print)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        registry.register("a")(print)


def test_the_covariate_check_pairs_what_an_objective_needs_with_what_a_corpus_registered(monkeypatch):
    def passes(objective, corpus):
        overrides = [f"objective.name={objective}", f"corpus={corpus}", "data.medical.manifest=m.csv"]
        try:
            validate(load_config(PretrainConfig, None, overrides))
        except ConfigError as e:
            assert "needs the covariate" in str(e)
            return False
        return True

    for objective in OBJECTIVES:
        for corpus in CORPORA:
            expected = set(OBJECTIVES[objective].cls.needs_covariates) <= set(CORPORA[corpus].covariates)
            assert passes(objective, corpus) == expected, (objective, corpus)
    assert not passes("yaware", "video") and passes("yaware", "synthmri")
    monkeypatch.setattr(SimCLR, "needs_covariates", ("age",))  # the class's declaration is what is checked
    assert not passes("simclr", "video") and passes("simclr", "medical")


def test_the_cli_offers_every_registered_corpus():
    assert [parse_args(["--corpus", name]).corpus for name in CORPORA] == list(CORPORA)
    with pytest.raises(UsageError, match=re.escape(f"choose from {', '.join(map(repr, CORPORA))}")):
        parse_args(["--corpus", "books"])


def test_the_model_card_words_objective_and_corpus_as_registered(tmp_path):
    def card(objective, corpus):
        cfg = load_config(PretrainConfig, None, [f"objective.name={objective}", f"corpus={corpus}"])
        meta = {"spacing": [4.0] * 3, "intensity": "zscore", "corpus": corpus, "objective": objective, "step": 1}
        folder = export_folder(tiny_vit(), tmp_path / corpus, meta, described=card_descriptions(cfg))
        return (folder / "README.md").read_text()

    assert "with **masked autoencoding (MAE)** on **synthetic brain MRI (synth/, generated on the fly)** " in card(
        "mae", "synthmri"
    )
    # packed registers no words: the card names it as the config does
    assert "with **y-aware contrastive learning (age kernel)** on **packed** (corpus `packed`)" in card(
        "yaware", "packed"
    )
