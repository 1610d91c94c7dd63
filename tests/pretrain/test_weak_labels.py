"""Weak labels: one fixed noisy label per subject, only a share of subjects labelled, the y-aware loss reading a
missing label as SimCLR's term, the config's checks and the export's record."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config
from common.errors import ConfigError
from common.export import export_folder
from common.models import create_backbone
from pretrain.config import PretrainConfig, validate
from pretrain.corpora import CorpusStream, build_source
from pretrain.corpora.weak_labels import WeakLabels
from pretrain.objectives.simclr import nt_xent
from pretrain.objectives.yaware import yaware_nce
from pretrain.provenance import export_metadata
from synth.subject import corpus_plan

SUBJECTS = [f"sub-{i:06d}" for i in range(4000)]


def labels_of(weak: WeakLabels, ages: np.ndarray) -> np.ndarray:
    return np.array([weak.value("age", s, a) for s, a in zip(SUBJECTS, ages)])


def test_noisy_ages_differ_from_the_exact_ones_by_about_the_sd_and_are_fixed_per_subject():
    ages = np.linspace(20, 90, len(SUBJECTS))
    noisy = labels_of(WeakLabels(noise_sd=5.0, seed=3), ages)
    error = noisy - ages
    assert np.std(error) == pytest.approx(5.0, rel=0.05) and abs(np.mean(error)) < 0.25  # 4 000 draws
    assert np.array_equal(noisy, labels_of(WeakLabels(noise_sd=5.0, seed=3), ages))  # drawn again: the same
    other_run = labels_of(WeakLabels(noise_sd=5.0, seed=4), ages)
    assert not np.allclose(other_run, noisy)  # another run's seed, other errors
    assert np.array_equal(labels_of(WeakLabels(seed=3), ages), ages)  # no noise, every subject: exact


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_the_labelled_share_is_the_fraction_and_a_smaller_share_is_a_subset(fraction):
    ages = np.full(len(SUBJECTS), 50.0)
    labelled = ~np.isnan(labels_of(WeakLabels(fraction=fraction, seed=1), ages))
    sd = math.sqrt(fraction * (1 - fraction) / len(SUBJECTS))
    assert labelled.mean() == pytest.approx(fraction, abs=4 * sd + 1e-12)
    more = ~np.isnan(labels_of(WeakLabels(fraction=min(1.0, fraction + 0.25), seed=1), ages))
    assert not (labelled & ~more).any()  # the subjects labelled at a fraction are labelled at a higher one


class FourSubjects:
    """A corpus of 4 files (subjects a-d, ages 20-80) that a stream visits in a new order every epoch."""

    name = "four"
    ages = {"a": 20.0, "b": 40.0, "c": 60.0, "d": 80.0}

    def _subject(self, position: int) -> str:
        return "abcd"[(position * 3 + position // 4) % 4]  # every subject once per 4 positions, in changing order

    def item(self, position, rng):
        return torch.zeros(1, 2, 2, 2)

    def covariate(self, position, name):
        return self.ages[self._subject(position)]

    def subject(self, position):
        return self._subject(position)


def test_the_stream_gives_a_subject_the_same_weak_label_every_time_it_is_drawn():
    weak, source = WeakLabels(noise_sd=5.0, fraction=0.5, seed=7), FourSubjects()
    stream = CorpusStream(source, seed=7, batch_size=4, covariates=("age",), labels=weak)
    drawn: dict[str, list[float]] = {}
    for j, batch in zip(range(6), stream):  # 24 draws: every subject 6 times, in changing order
        for i, age in enumerate(batch["age"].tolist()):
            drawn.setdefault(source.subject(4 * j + i), []).append(age)
    for subject, ages in drawn.items():
        expected = weak.value("age", subject, FourSubjects.ages[subject])
        assert len(ages) == 6 and np.allclose(ages, expected, equal_nan=True), (subject, ages)
    labels = [ages[0] for ages in drawn.values()]
    assert any(math.isnan(a) for a in labels) and not any(a in FourSubjects.ages.values() for a in labels)
    exact = CorpusStream(source, seed=7, batch_size=4, covariates=("age",))  # the default: exact labels
    assert sorted(next(iter(exact))["age"].tolist()) == [20.0, 40.0, 60.0, 80.0]


def test_the_corpora_name_the_subject_an_item_is_of(nifti_dir, tmp_path):
    cfg = load_config(PretrainConfig, None, ["data.spacing=[6.0,6.0,6.0]", "data.shape=[16,16,16]"])
    source = build_source(cfg)
    assert [source.subject(p) for p in (0, 1)] == [corpus_plan(source.synth_cfg, 0, p).subject_id for p in (0, 1)]
    files = [nifti_dir / "s1.nii.gz", nifti_dir / "s2.nii.gz"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(f) for f in files], "subject_id": ["x", None], "age": [30, 50]}).to_csv(manifest)
    settings = [f"data.medical.manifest={manifest}", "data.shape=[16,16,16]", "data.spacing=[4,4,4]"]
    medical = build_source(load_config(PretrainConfig, None, ["corpus=medical", *settings]))
    # a subject's sessions share one label; a row without a subject id is its own subject, named by its file
    assert {medical.subject(p) for p in range(4)} == {"x", str(files[1])}


def reference_yaware(z1, z2, y, T, sigma):
    """The y-aware loss written out anchor by anchor, an unlabelled anchor or partner weighing 0 but the anchor's
    own other view always 1."""
    views = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    ages = torch.cat([y, y]).tolist()
    n, B = len(ages), len(y)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        s = {j: float(views[i] @ views[j]) / T for j in others}
        log_norm = math.log(sum(math.exp(v) for v in s.values()))
        w = {j: 0.0 if math.isnan(ages[i] - ages[j]) else math.exp(-((ages[i] - ages[j]) ** 2) / (2 * sigma**2))
             for j in others}  # fmt: skip
        w[(i + B) % n] = 1.0  # the other view of the same subject
        total += -sum(w[j] / sum(w.values()) * (s[j] - log_norm) for j in others)
    return total / n


def test_the_yaware_loss_is_nt_xent_without_labels_and_unchanged_with_exact_ones():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    y = torch.tensor([20.0, 31.0, 45.0, 47.0, 66.0, 80.0])
    nobody = torch.full((6,), float("nan"))
    assert yaware_nce(z1, z2, nobody, 0.2, 5.0).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-6)
    assert yaware_nce(z1, z2, y, 0.2, 10.0).item() == pytest.approx(reference_yaware(z1, z2, y, 0.2, 10.0), rel=1e-5)
    partly = y.clone()
    partly[[1, 4]] = float("nan")
    loss = yaware_nce(z1, z2, partly, 0.2, 10.0).item()
    assert loss == pytest.approx(reference_yaware(z1, z2, partly, 0.2, 10.0), rel=1e-5)
    assert math.isfinite(loss) and loss != pytest.approx(yaware_nce(z1, z2, y, 0.2, 10.0).item(), rel=1e-3)


def config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.contrastive.label_noise_sd=-1"], "label_noise_sd must be >= 0 and label_fraction in"),
        (["objective.contrastive.label_fraction=1.5"], "label_noise_sd must be >= 0 and label_fraction in"),
        (["objective.name=simclr", "objective.contrastive.label_fraction=0.5"], "objective simclr uses none"),
    ],
)
def test_weak_label_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config("objective.name=yaware", *overrides))


def test_the_export_records_and_the_card_states_how_weakly_the_encoder_was_supervised(tmp_path):
    weak = config(
        "objective.name=yaware",
        "objective.contrastive.label_noise_sd=5",
        "objective.contrastive.label_fraction=0.5",
        "data.shape=[16,16,16]",
    )
    exact = config("objective.name=yaware")
    assert export_metadata(weak)["training_data"]["synthmri"]["labels"] == (
        "age with a Gaussian error of SD 5 (fixed per subject), for 50% of subjects (the others unlabelled)"
    )
    assert export_metadata(exact)["training_data"]["synthmri"]["labels"] == "age exact, for every subject"
    assert "labels" not in export_metadata(config())["training_data"]["synthmri"]  # MAE learns from no label
    vit = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=1, embed_dim=24, num_heads=2)
    card = (export_folder(vit, tmp_path / "export", {**export_metadata(weak), "step": 1}) / "README.md").read_text()
    assert (
        "labels age with a Gaussian error of SD 5 (fixed per subject), for 50% of subjects (the others unlabelled)"
        in card
    )
