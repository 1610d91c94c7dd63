"""Preprocessing parity: a fine-tune that feeds an export inputs unlike its pre-training's is told so."""

import logging

from common.checkpoint import export_backbone
from common.models import create_backbone
from finetune.config import DataConfig
from finetune.parity import check_parity


def export(tmp_path, spacing=(4.0, 4.0, 4.0), intensity="percentile", size=(16, 16, 16)):
    return export_backbone(
        create_backbone("resnet18", img_size=size, widen_factor=0.25),
        tmp_path / "enc.safetensors",
        {"input_size": list(size), "spacing": list(spacing), "intensity": intensity},
    )


def data(spacing=(4.0, 4.0, 4.0), intensity="percentile", shape=(16, 16, 16)) -> DataConfig:
    return DataConfig(spacing=list(spacing), intensity=intensity, shape=list(shape))


def test_matching_preprocessing_and_scratch_say_nothing(tmp_path, caplog):
    path = export(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert check_parity(str(path), data()) == []
        assert check_parity("scratch", data(spacing=(1, 1, 1), intensity="zscore")) == []
    assert not caplog.records


def test_each_mismatch_is_named_and_logged(tmp_path, caplog):
    path = export(tmp_path, spacing=(2.0, 2.0, 2.0), intensity="percentile", size=(32, 32, 32))
    with caplog.at_level(logging.WARNING):
        found = check_parity(str(path), data(intensity="zscore"))
    assert len(found) == 3, found
    spacing, intensity, size = found
    assert "[2.0, 2.0, 2.0] mm" in spacing and "[4.0, 4.0, 4.0] mm" in spacing
    assert "'percentile'" in intensity and "'zscore'" in intensity
    assert "[32, 32, 32]" in size and "[16, 16, 16]" in size
    assert len(caplog.records) == 3 and str(path) in caplog.records[0].getMessage()


def test_an_export_that_records_one_number_for_all_axes_is_compared_per_axis(tmp_path, caplog):
    """``export_backbone`` accepts a scalar spacing and an int input size: parity reads them as (D, H, W) rather
    than failing every fine-tune with the export ("'float' object is not iterable")."""
    path = export_backbone(
        create_backbone("resnet18", img_size=16, widen_factor=0.25),
        tmp_path / "scalar.safetensors",
        {"input_size": 16, "spacing": 4.0, "intensity": "percentile"},
    )
    assert check_parity(str(path), data()) == []
    found = check_parity(str(path), data(spacing=(2.0, 2.0, 2.0), shape=(32, 32, 32)))
    assert len(found) == 2 and "[4.0, 4.0, 4.0] mm" in found[0] and "[16, 16, 16]" in found[1], found
