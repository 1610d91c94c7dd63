"""SimCLR's NT-Xent and MoCo v3's loss against hand-computed values; MoCo's momentum encoder."""

import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from common.models import create_backbone
from pretrain.engine import param_groups
from pretrain.objectives.moco import MoCoV3, moco_contrastive
from pretrain.objectives.simclr import SimCLR, nt_xent


def test_nt_xent_matches_a_hand_computed_value():
    # unit vectors at angles: a1=0°, a2=90° (view 1), b1=0°, b2=180° (view 2): cosines are exact
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [-3.0, 0.0]])  # norms do not matter
    T = 0.5
    # anchor a1: positive b1 (cos 1), negatives a2 (0), b2 (-1)
    l_a1 = -math.log(math.exp(1 / T) / (math.exp(1 / T) + math.exp(0) + math.exp(-1 / T)))
    # anchor a2: positive b2 (cos 0), negatives a1 (0), b1 (0)
    l_a2 = -math.log(1 / 3)
    # anchor b1: positive a1 (1), negatives a2 (0), b2 (-1)
    l_b1 = l_a1
    # anchor b2: positive a2 (0), negatives a1 (-1), b1 (-1)
    l_b2 = -math.log(1 / (1 + 2 * math.exp(-1 / T)))
    expected = (l_a1 + l_a2 + l_b1 + l_b2) / 4
    assert nt_xent(z1, z2, T).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_agrees_with_monai_contrastive_loss():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(ContrastiveLoss(temperature=0.2)(z1, z2).item(), rel=1e-5)


def test_moco_loss_matches_a_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    T = 0.2
    l0 = -math.log(math.exp(1 / T) / (2 * math.exp(1 / T)))  # both keys equal q0
    l1 = -math.log(1 / 2)  # q1 is orthogonal to both keys
    assert moco_contrastive(q, k, T).item() == pytest.approx((l0 + l1) / 2 * 2 * T, rel=1e-6)


def tiny_vit():
    return create_backbone("vit_base_p16", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=4)


def test_moco_momentum_encoder_is_an_ema_outside_the_optimizer():
    moco = MoCoV3(tiny_vit(), proj_hidden=32, proj_dim=8, momentum=0.9)
    trainable = {id(p) for g in param_groups(moco, 0.05) for p in g["params"]}
    assert not any(id(p) in trainable for p in moco.momentum_encoder.parameters())
    w_online = moco.encoder.blocks[0].mlp.fc1.weight
    w_mom = moco.momentum_encoder.blocks[0].mlp.fc1.weight
    before = w_mom.detach().clone()
    with torch.no_grad():
        w_online.add_(1.0)
    moco.after_step(0, 10)  # m = 0.9 at the start of the cosine schedule
    assert torch.allclose(w_mom, 0.9 * before + 0.1 * w_online.detach(), atol=1e-6)
    assert moco.momentum_at(10, 10) == pytest.approx(1.0)
    x = {"view1": torch.rand(4, 1, 16, 16, 16), "view2": torch.rand(4, 1, 16, 16, 16)}
    moco(x)["loss"].backward()
    assert w_mom.grad is None and w_online.grad is not None


def test_simclr_runs_on_a_cnn_backbone_and_trains():
    torch.manual_seed(0)
    model = SimCLR(create_backbone("resnet18", img_size=16), proj_hidden=32, proj_dim=8, temperature=0.5)
    loss = model({"view1": torch.rand(4, 1, 16, 16, 16), "view2": torch.rand(4, 1, 16, 16, 16)})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.net.conv1.weight.grad.abs().sum() > 0
