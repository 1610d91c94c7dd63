"""The generator: determinism, shapes, intensity range, label values, tissue contrast, geometry."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from synth.anatomy import anatomy_at, load_templates, output_affine
from synth.atrophy import atrophy_basis
from synth.config import SynthConfig
from synth.generator import Generator, warm_up
from synth.regions import LABELS, REGION_LABELS
from synth.subject import cohort_plan, corpus_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def test_templates_read_from_nilearn_package_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("synth tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    load_templates.cache_clear()
    anatomy_at.cache_clear()
    t = load_templates()
    assert t.csf.shape == t.gm.shape == t.wm.shape
    # tissue probabilities partition the brain; every region label exists, left and right distinct
    assert np.allclose(t.csf + t.gm + t.wm, t.brain, atol=1e-4)
    present = set(np.unique(t.regions).tolist())
    assert set(REGION_LABELS.values()) <= present


def test_warm_up_builds_every_cache_a_generator_reads(cfg4):
    anatomy_at.cache_clear()
    atrophy_basis.cache_clear()
    warm_up(cfg4)  # before forking workers: they then build nothing
    built = anatomy_at.cache_info().misses, atrophy_basis.cache_info().misses
    Generator(cfg4)
    assert (anatomy_at.cache_info().misses, atrophy_basis.cache_info().misses) == built


@pytest.mark.parametrize("spacing, shape", [(2.0, (80, 96, 80)), (4.0, (40, 48, 40)), (1.0, (160, 192, 160))])
def test_shape_and_affine_follow_spacing(spacing, shape):
    cfg = SynthConfig(spacing=spacing)
    assert cfg.shape == shape
    affine = output_affine(spacing, shape)
    assert np.allclose(np.diag(affine)[:3], spacing)
    centre = affine @ np.array([*(np.array(shape) - 1) / 2, 1.0])
    assert np.allclose(centre[:3], [0.0, -17.0, 5.0])  # centred on the brain in MNI mm


def test_same_plan_gives_same_volume_and_other_index_differs(cfg4):
    gen = Generator(cfg4)
    a = gen(corpus_plan(cfg4, 7, 0), with_labels=True)
    b = gen(corpus_plan(cfg4, 7, 0), with_labels=True)
    c = gen(corpus_plan(cfg4, 7, 1))
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (1, 40, 48, 40) and a.image.dtype == torch.float32
    assert float(a.image.min()) >= 0.0 and float(a.image.max()) <= 1.0


def test_labels_are_tissues_and_regions():
    cfg = SynthConfig(spacing=2.0)
    vol = Generator(cfg)(cohort_plan(cfg, "ad", 0, 0, 1), with_labels=True)
    values = set(torch.unique(vol.labels).tolist())
    assert vol.labels.dtype == torch.uint8 and vol.labels.shape == cfg.shape
    assert values <= set(LABELS.values())
    assert values == set(LABELS.values())  # at 2 mm every tissue and region is visible


@pytest.mark.parametrize("index", [0, 1, 2])
def test_t1_contrast_orders_wm_gm_csf(cfg4, index):
    vol = Generator(cfg4)(cohort_plan(cfg4, "brain_age", 0, index, 1), with_labels=True)
    mean = {k: float(vol.image[0][vol.labels == v].mean()) for k, v in (("csf", 1), ("gm", 2), ("wm", 3))}
    assert mean["wm"] > mean["gm"] > mean["csf"]


def test_random_contrast_breaks_t1_order_somewhere():
    cfg = SynthConfig(spacing=4.0, contrast="random")
    orders = {tuple(np.argsort(corpus_plan(cfg, 0, i).scanner.means)) for i in range(12)}
    assert any(order != (0, 1, 2) for order in orders)  # not always CSF < GM < WM
    plan = corpus_plan(cfg, 0, 0)
    assert plan.scanner.contrast == "random"
