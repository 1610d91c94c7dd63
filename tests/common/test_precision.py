import pytest
import torch

from common.precision import bf16_native


@pytest.mark.parametrize(
    "avx512_bf16,amx,native", [(False, False, False), (True, False, True), (False, True, True), (True, True, True)]
)
def test_cpu_bf16_follows_the_cpu_flags(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_native("cpu") is native and bf16_native(torch.device("cpu")) is native


def test_unknown_device_has_no_native_bf16():
    assert bf16_native("meta") is False
