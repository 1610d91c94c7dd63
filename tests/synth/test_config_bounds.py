"""Sizes the generator cannot work with (a voxel larger than the field of view, a sub-millimetre lattice) are
refused up front, by the config and by every synth command, in one line."""

from __future__ import annotations

import time

import pytest

from common.errors import ConfigError
from synth.cli import main
from synth.config import SynthConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing": 1000.0}, "spacing must lie in [0.5, 20] mm"),
        ({"spacing": 0.1}, "spacing must lie in [0.5, 20] mm"),
        ({"spacing": float("inf")}, "spacing must lie in"),
        ({"spacing": 0.0}, "spacing must be > 0"),
        ({"spacing": 4.0, "shape_1mm": (8, 8, 8)}, "spacing must lie in [0.5, 1] mm"),
        ({"shape_1mm": (100000, 192, 160)}, "shape_1mm must be three sizes in [8, 512]"),
    ],
)
def test_sizes_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SynthConfig(**kwargs)


def test_coarsest_spacing_keeps_eight_voxels_per_axis():
    assert SynthConfig(spacing=20.0).shape == (8, 10, 8)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--n", "2", "--spacing", "1000"], "spacing must lie in [0.5, 20] mm (--spacing"),
        (["calibrate", "--n", "2", "--spacing", "500"], "spacing must lie in [0.5, 20] mm (--spacing"),
        (["generate", "--n", "2", "nonlinear.lattice_mm=0.01"], "nonlinear.lattice_mm must lie in [1, 512] mm"),
        (["generate", "--n", "2", "scanner.bias_control_spacing_mm=0"], "scanner.bias_control_spacing_mm must lie"),
        (["generate", "--n", "2", "--spacing", "8", "scanner.slice_mm=[1,300]"], "scanner.slice_mm up to 300.0 mm"),
    ],
)
def test_commands_refuse_them_at_once_in_one_line(tmp_path, capsys, argv, message):
    start = time.perf_counter()
    code = main([*argv, "--no-progress"] + ([] if argv[0] == "calibrate" else ["--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert time.perf_counter() - start < 5 and not (tmp_path / "out").exists()  # before any template work
