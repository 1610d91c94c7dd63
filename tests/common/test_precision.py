import pytest
import torch

from common import precision
from common.precision import bf16_native, choose_precision, step_seconds


def test_cpu_bf16_follows_the_cpu_flags():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_native("cpu") is expected


def test_unknown_device_has_no_native_bf16():
    assert bf16_native("meta") is False


def test_auto_never_times_or_picks_bf16_where_it_is_emulated(monkeypatch):
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)

    def timings():
        raise AssertionError("no timing where bf16 is not native")

    chosen, why = choose_precision("cpu", timings)
    assert chosen == "fp32" and "no native bf16" in why


@pytest.mark.parametrize(
    "seconds, expected", [({"fp32": 1.0, "bf16": 0.4}, "bf16"), ({"fp32": 1.0, "bf16": 1.3}, "fp32")]
)
def test_auto_picks_bf16_only_where_native_and_not_slower(monkeypatch, seconds, expected):
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    chosen, why = choose_precision("cuda", lambda: seconds)
    assert chosen == expected
    assert f"{seconds['bf16']:.3g} s in bf16" in why and ("slower" in why)
    assert choose_precision("cuda") == ("bf16", "cuda computes bf16 natively (not timed)")


def test_step_seconds_warms_up_then_alternates_the_precisions():
    calls = []
    seconds = step_seconds(calls.append, "cpu", rounds=2)
    assert calls == ["fp32", "bf16", "fp32", "bf16", "fp32", "bf16"]
    assert set(seconds) == {"fp32", "bf16"} and all(0 <= s < 1 for s in seconds.values())
