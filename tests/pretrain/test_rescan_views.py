"""Rescan views: a contrastive pair's views are two renderings of one subject (two scanners), each augmented."""

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import ConfigError
from common.models import create_backbone
from pretrain.config import PretrainConfig, validate
from pretrain.corpora import CorpusStream, build_source
from pretrain.objectives import YAwareContrastive
from pretrain.views import TwoViews
from synth.cohort import Job, generate
from synth.config import SynthConfig
from synth.dataset import SyntheticMRIStream
from synth.generator import Generator
from synth.subject import corpus_plan, rendering

SHAPE = [40, 48, 40]  # synth's field of view at 4 mm: the fit to the input size is the identity
FLIPS_ONLY = {
    "objective.contrastive.crop_scale": "[1.0,1.0]",
    "objective.contrastive.affine_prob": 0,
    "objective.contrastive.intensity_prob": 0,
    "objective.contrastive.noise_prob": 0,
    "objective.contrastive.blur_prob": 0,
    "objective.contrastive.bias_field_prob": 0,
}


def _folder(tmp_path_factory, renderings: int):
    out = tmp_path_factory.mktemp(f"synth_k{renderings}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(out, SynthConfig(spacing=4.0), Job(seed=3, renderings=renderings), 3, show_progress=False)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def rescanned(tmp_path_factory):
    """Three subjects, two renderings each, at 4 mm."""
    return _folder(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def scanned_once(tmp_path_factory):
    return _folder(tmp_path_factory, 1)


def config(objective="simclr", **overrides) -> PretrainConfig:
    settings = {"objective.name": objective, "data.shape": str(SHAPE).replace(" ", ""), "data.spacing": "[4,4,4]"}
    settings.update(overrides)
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in settings.items()])


def _whose(view: torch.Tensor, files) -> tuple[str, int]:
    """(subject, rendering) of the file ``view`` is, as it is or flipped left-right."""
    for row in range(len(files)):
        image = files[row]
        if torch.equal(view, image) or torch.equal(view, image.flip(1)):
            return files.table["subject_id"].iloc[row], int(files.table["rendering"].iloc[row])
    raise AssertionError("the view is none of the folder's renderings")


def test_a_rescan_pair_is_two_renderings_of_one_subject_each_augmented(rescanned):
    cfg = config(**{"objective.contrastive.views": "rescan", "data.synthmri.directory": str(rescanned)}, **FLIPS_ONLY)
    validate(cfg)
    source = build_source(cfg)
    views = TwoViews(cfg.objective.contrastive, SHAPE)
    stream = CorpusStream(source, cfg.train.seed, views=views, batch_size=6, covariates=("age",))
    batch = next(iter(stream))  # two epochs of the three subjects
    files = source.files
    for i in range(6):
        (subject1, r1), (subject2, r2) = (_whose(batch[key][i], files) for key in ("view1", "view2"))
        assert subject1 == subject2 and r1 != r2  # one anatomy, two scanners
        view1, view2 = batch["view1"][i], batch["view2"][i]
        assert not torch.equal(view1, view2) and not torch.equal(view1, view2.flip(1))  # more apart than a flip
        age = files.table.loc[files.table["subject_id"] == subject1, "age"].iloc[0]
        assert batch["age"][i].item() == pytest.approx(age, abs=1e-3)  # the covariates still come with the item
    assert views.rescan and not TwoViews(config().objective.contrastive, SHAPE).rescan  # augment: the default


def test_yaware_takes_rescan_views_with_their_ages(rescanned):
    cfg = config("yaware", **{"objective.contrastive.views": "rescan", "data.synthmri.directory": str(rescanned)})
    validate(cfg)
    stream = CorpusStream(
        build_source(cfg), 0, views=TwoViews(cfg.objective.contrastive, SHAPE), batch_size=2, covariates=("age",)
    )
    batch = next(iter(stream))
    encoder = create_backbone("vit_base_p16", img_size=tuple(SHAPE), patch_size=8, embed_dim=32, depth=1, num_heads=4)
    loss = YAwareContrastive(encoder, proj_hidden=32, proj_dim=8, sigma=5.0)(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_on_the_fly_a_pair_is_renderings_0_and_1_of_the_position(tmp_path):
    cfg = config(**{"objective.contrastive.views": "rescan", "data.spacing": "[6,6,6]", "data.shape": "[16,16,16]"})
    source = build_source(cfg)
    first, second = source.pair(5, np.random.default_rng(0))
    stream = SyntheticMRIStream(source.synth_cfg, cfg.train.seed)
    plan = corpus_plan(source.synth_cfg, cfg.train.seed, 5)
    whole = (
        Generator(source.synth_cfg)(plan).image,
        Generator(source.synth_cfg)(rendering(source.synth_cfg, plan, 1)).image,
    )
    assert torch.equal(stream.volume(5), whole[0]) and torch.equal(stream.volume(5, 1), whole[1])
    # one crop for both: the same window of each rendering
    seed = int(np.random.default_rng(0).integers(2**31))
    assert torch.equal(first, source._fit(whole[0], seed)) and torch.equal(second, source._fit(whole[1], seed))


def test_rescan_views_from_a_folder_of_one_rendering_are_refused(scanned_once, tmp_path):
    cfg = config(**{"objective.contrastive.views": "rescan", "data.synthmri.directory": str(scanned_once)})
    with pytest.raises(ConfigError, match=rf"{scanned_once} holds 1 per subject; make it with .*--renderings 2"):
        build_source(cfg)
    # MAE takes no views: the setting does not concern it
    build_source(
        config("mae", **{"objective.contrastive.views": "rescan", "data.synthmri.directory": str(scanned_once)})
    )
    with pytest.raises(ConfigError, match="corpus medical has not"):
        validate(
            config(
                corpus="medical", **{"objective.contrastive.views": "rescan", "data.medical.directory": str(tmp_path)}
            )
        )
    with pytest.raises(ConfigError, match="objective.contrastive.views must be one of"):
        validate(config(**{"objective.contrastive.views": "rescans"}))


def test_mae_sees_every_rendering_one_per_subject_and_item(rescanned):
    source = build_source(config("mae", **{"data.synthmri.directory": str(rescanned)}))
    files = source.files
    seen = {_whose(source.item(p, np.random.default_rng([0, p])), files) for p in range(12)}  # four epochs
    assert {r for _, r in seen} == {0, 1} and len({s for s, _ in seen}) == 3
