import torch

from common.precision import bf16_native


def test_cpu_bf16_follows_the_cpu_flags():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bf16_native("cpu") is expected


def test_unknown_device_has_no_native_bf16():
    assert bf16_native("meta") is False
