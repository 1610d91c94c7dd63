"""One precision and device vocabulary for every package: what ``auto`` means, what an explicit word does, and
the error for a word outside the list."""

import pytest
import torch

from common import precision
from common.errors import ConfigError
from common.precision import (
    autocast,
    bf16_native,
    choose_precision,
    resolve_device,
    resolve_precision,
    step_seconds,
)


@pytest.mark.parametrize(
    "avx512_bf16,amx,native", [(False, False, False), (True, False, True), (False, True, True), (True, True, True)]
)
def test_cpu_bf16_follows_the_cpu_flags(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_native("cpu") is native and bf16_native(torch.device("cpu")) is native


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


def test_auto_precision_is_bf16_only_where_native_and_explicit_words_are_kept():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if bf16_native(cpu) else "fp32")
    assert resolve_precision("bf16", cpu) == "bf16"  # no silent fallback
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match=r"train.precision must be one of \('auto', 'bf16', 'fp32'\), got 'on'"):
        resolve_precision("on", cpu, key="train.precision")


def test_device_words():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="train.device must be one of"):
        resolve_device("tpu", key="train.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    cpu, x = torch.device("cpu"), torch.ones(2, 2)
    with autocast(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert (x @ x).dtype == torch.float32
