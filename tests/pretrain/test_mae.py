"""MAE: patch order, masking counts, tube masking, and the loss on masked patches only."""

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.models import create_backbone
from pretrain.objectives.mae import MaskedAutoencoder


def tiny_mae(ratio=0.75, masking="random", norm_pix=True, img=(16, 32, 32)):
    enc = create_backbone("vit_base_p16", img_size=img, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    return MaskedAutoencoder(enc, ratio, masking, norm_pix, decoder_dim=32, decoder_depth=1, decoder_heads=4)


def test_patchify_matches_the_encoders_token_order_and_round_trips():
    mae = tiny_mae()
    x = torch.rand(2, 1, 16, 32, 32)
    patches = mae.patchify(x)  # (2, 2*4*4, 512)
    assert patches.shape == (2, 32, 512)
    assert torch.equal(mae.unpatchify(patches), x)
    # token 5 of a Conv3d patch grid (gd=2, gh=4, gw=4) is (d=0, h=1, w=1)
    assert torch.equal(patches[0, 5], x[0, 0, 0:8, 8:16, 8:16].reshape(-1))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_encoder_sees_exactly_the_visible_tokens(ratio):
    mae = tiny_mae(ratio)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    out = mae({"image": torch.rand(3, 1, 16, 32, 32)})
    n = mae.encoder.num_patches
    keep = int(n * (1 - ratio))
    assert seen == [keep + 1]  # + cls token
    assert out["mask"].shape == (3, n)
    assert torch.equal(out["mask"].sum(1), torch.full((3,), float(n - keep)))


def test_tube_masking_repeats_one_spatial_mask_along_depth():
    mae = tiny_mae(0.75, "tube")
    mask = mae({"image": torch.rand(2, 1, 16, 32, 32)})["mask"].reshape(2, 2, 16)  # (B, gd, gh*gw)
    assert torch.equal(mask[:, 0], mask[:, 1])
    assert torch.equal(mask.sum(-1), torch.full((2, 2), 12.0))  # 16 - int(16 * 0.25)
    assert not torch.equal(mask[0], mask[1])  # each volume draws its own mask


def test_perfect_reconstruction_gives_zero_loss_and_visible_patches_do_not_count():
    mae = tiny_mae(norm_pix=True)
    x = torch.rand(2, 1, 16, 32, 32)
    _, mask, _ = mae.forward_encoder(x)
    target = mae.target(x)
    assert mae.forward_loss(x, target, mask).item() == pytest.approx(0.0, abs=1e-10)
    wrong_visible = target + (1 - mask)[..., None] * 5.0  # errors on visible patches only
    assert mae.forward_loss(x, wrong_visible, mask).item() == pytest.approx(0.0, abs=1e-10)
    wrong_masked = target + mask[..., None] * 2.0
    assert mae.forward_loss(x, wrong_masked, mask).item() == pytest.approx(4.0)


def test_norm_pix_target_is_per_patch_standardised_and_raw_target_is_voxels():
    x = torch.rand(1, 1, 16, 32, 32)
    t = tiny_mae(norm_pix=True).target(x)
    assert torch.allclose(t.mean(-1), torch.zeros(1, 32), atol=1e-5)
    assert torch.allclose(t.std(-1), torch.ones(1, 32), atol=1e-3)
    assert torch.equal(tiny_mae(norm_pix=False).target(x), tiny_mae().patchify(x))


def test_images_are_middle_slices_and_a_perfect_prediction_reconstructs_the_input():
    mae = tiny_mae()
    x = 1 + torch.rand(2, 1, 16, 32, 32)  # no zero voxel: the masked image's zeros are the mask's
    _, mask, _ = mae.forward_encoder(x)
    images = mae.images({"image": x}, {"mask": mask, "pred": mae.target(x)})  # the normalised target, undone
    assert set(images) == {"input", "masked", "reconstruction"}
    lo, hi = x[0].min(), x[0].max()
    assert torch.allclose(images["input"], (x[0, :, 8] - lo) / (hi - lo), atol=1e-6)  # the middle D slice
    torch.testing.assert_close(images["reconstruction"], images["input"], atol=1e-4, rtol=0)
    hidden = mae.unpatchify(mask[:1, :, None].expand(-1, -1, 512))[0, :, 8].bool()  # masked voxels of the slice
    assert hidden.any() and (images["masked"][hidden] == 0).all()
    assert torch.equal(images["masked"][~hidden], images["input"][~hidden])


def test_bad_arguments_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="^mask_ratio must lie in"):
        tiny_mae(1.0)
    with pytest.raises(ValueError, match="^masking must be one of"):
        tiny_mae(0.75, "block")
    cnn = create_backbone("resnet18", img_size=32)
    with pytest.raises(ConfigError, match="ViT"):
        MaskedAutoencoder(cnn)


def _reference_masking(noise: torch.Tensor, n_keep: int):
    """facebookresearch/mae ``random_masking`` on a given noise: the tokens with the smallest noise are kept."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones_like(noise)
    mask[:, :n_keep] = 0
    return ids_keep, torch.gather(mask, 1, torch.argsort(ids_shuffle, dim=1))


@pytest.mark.parametrize("masking", ["random", "tube"])
def test_mask_is_zero_exactly_at_the_kept_tokens(masking):
    mae = tiny_mae(0.75, masking)
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = mae.random_masking(3, torch.device("cpu"))
    expected = torch.ones_like(mask).scatter_(1, ids_keep, 0.0)
    assert torch.equal(mask, expected) and ids_keep.shape == (3, mae.num_keep)
    # ids_restore puts [kept, masked] back in raster order: kept ids come first in the shuffled order
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, : mae.num_keep], ids_keep)
    if masking == "random":  # the same draw as the reference implementation
        torch.manual_seed(0)
        ref_keep, ref_mask = _reference_masking(torch.rand(3, mae.encoder.num_patches), mae.num_keep)
        assert torch.equal(ids_keep, ref_keep) and torch.equal(mask, ref_mask)


def test_decoder_puts_each_visible_token_back_at_its_raster_position():
    """With the decoder reduced to the un-shuffle (no blocks, identity layers, no position embedding), the
    token at raster position n must be the encoder's output for patch n, and the mask token elsewhere."""
    mae = tiny_mae(0.75)
    mae.decoder_embed, mae.decoder_norm, mae.decoder_pred = nn.Identity(), nn.Identity(), nn.Identity()
    mae.decoder_blocks = nn.ModuleList()
    mae.decoder_pos_embed.data.zero_()
    mae.mask_token.data.fill_(-1.0)
    torch.manual_seed(1)
    ids_keep, mask, ids_restore = mae.random_masking(2, torch.device("cpu"))
    latent = ids_keep.float()[..., None].expand(-1, -1, 32)  # each visible token carries its patch id
    latent = torch.cat([torch.full((2, 1, 32), -5.0), latent], dim=1)  # + cls token
    out = mae.forward_decoder(latent, ids_restore)[..., 0]  # (B, N)
    raster = torch.arange(mae.encoder.num_patches).float().expand(2, -1)
    assert torch.equal(out, torch.where(mask.bool(), torch.tensor(-1.0), raster))
