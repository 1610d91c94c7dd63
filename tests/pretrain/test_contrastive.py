"""SimCLR's NT-Xent and MoCo v3's loss against hand-computed values; MoCo's momentum encoder."""

import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from common.models import create_backbone
from pretrain.engine import param_groups
from pretrain.objectives.moco import MoCoV3, moco_contrastive
from pretrain.objectives.simclr import SimCLR, nt_xent
from pretrain.objectives.yaware import YAwareContrastive, yaware_nce


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


# Which view is whose positive, checked by hand: a backbone whose features are the input itself and identity heads,
# so each view's embedding is a hand-made unit vector, and a loss written as a loop over anchors and candidates.


class InputAsFeatures(torch.nn.Module):
    """A parameter-free backbone: (B, 1, 1, 1, 2) -> (B, 2), the voxels as the features."""

    feature_dim = 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def no_weight_decay(self) -> set[str]:
        return set()


def unit(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)  # (B, 2)


def nce_by_hand(anchor: torch.Tensor, candidates: list[torch.Tensor], weights: list[float], T: float) -> float:
    """-Σ_j w_j / Σ w · log softmax_j(cos(anchor, c_j) / T): one anchor, the candidates listed one by one."""
    s = [float(torch.nn.functional.cosine_similarity(anchor, c, dim=0)) / T for c in candidates]
    log_norm = math.log(sum(math.exp(v) for v in s))
    return -sum(w / sum(weights) * (v - log_norm) for w, v in zip(weights, s))


def view_pair_by_hand(views: list[torch.Tensor], anchors: list[int], T: float, ages: list[float] | None = None):
    """NT-Xent (ages None) or y-aware InfoNCE (σ 10) by hand over the global views ``[view1s..., view2s...]``:
    anchor a's positive is its other view, (a + N) mod 2N, or every view weighted by the age kernel."""
    n = len(views) // 2
    losses = []
    for a in anchors:
        others = [j for j in range(2 * n) if j != a]
        if ages is None:
            weights = [float(j == (a + n) % (2 * n)) for j in others]
        else:
            weights = [math.exp(-((ages[a] - ages[j]) ** 2) / (2 * 10.0**2)) for j in others]
        losses.append(nce_by_hand(views[a], [views[j] for j in others], weights, T))
    return sum(losses) / len(losses)


def moco_term_by_hand(q: torch.Tensor, keys: list[torch.Tensor], positives: list[int], T: float) -> float:
    """MoCo v3's ctr(q, k): query i's positive is keys[positives[i]], scaled by 2T."""
    hot = [[float(j == p) for j in range(len(keys))] for p in positives]
    return 2 * T * sum(nce_by_hand(q[i], keys, hot[i], T) for i in range(len(q))) / len(q)


# view 1 and view 2 of three volumes: no two pairings give the same loss
VIEW1, VIEW2, AGES = unit([0.0, 100.0, 200.0]), unit([30.0, 250.0, 140.0]), [20.0, 30.0, 45.0]


@pytest.mark.parametrize("name", ["simclr", "moco", "yaware"])
def test_each_objective_pairs_a_volumes_view1_with_its_own_view2(name):
    T = 0.5
    kwargs = {"sigma": 10.0} if name == "yaware" else {}
    model = {"simclr": SimCLR, "moco": MoCoV3, "yaware": YAwareContrastive}[name](
        InputAsFeatures(), proj_hidden=4, proj_dim=2, temperature=T, **kwargs
    )
    for head in ("projector", "predictor", "momentum_projector"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())  # the embeddings are the hand-made views themselves
    batch = {"view1": VIEW1.reshape(3, 1, 1, 1, 2), "view2": VIEW2.reshape(3, 1, 1, 1, 2), "age": torch.tensor(AGES)}
    views = [*VIEW1, *VIEW2]
    if name == "moco":  # q1 against the keys of view 2, q2 against those of view 1 (the momentum copy: same keys)
        expected = moco_term_by_hand(VIEW1, [*VIEW2], [0, 1, 2], T) + moco_term_by_hand(VIEW2, [*VIEW1], [0, 1, 2], T)
    else:
        expected = view_pair_by_hand(views, list(range(6)), T, AGES * 2 if name == "yaware" else None)
    assert model(batch)["loss"].item() == pytest.approx(expected, rel=1e-5)


def fake_rank_1_of_2(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """An all-gather as rank 1 of two would see it: rank 0's rows (antipodal embeddings, ages + 30) first."""
    other = x + 30.0 if x.shape[1] == 1 else -x
    return torch.cat([other, x]), 1


def test_on_rank_1_each_anchors_positive_is_its_own_pair_not_rank_0s(monkeypatch):
    monkeypatch.setattr("pretrain.objectives.simclr.gather_with_grad", fake_rank_1_of_2)
    monkeypatch.setattr("pretrain.objectives.yaware.gather_no_grad", fake_rank_1_of_2)
    monkeypatch.setattr("pretrain.objectives.moco.gather_no_grad", fake_rank_1_of_2)
    T, B = 0.5, 3
    # global batch: rank 0's view 1, rank 1's view 1, rank 0's view 2, rank 1's view 2; this rank's anchors
    views = [*-VIEW1, *VIEW1, *-VIEW2, *VIEW2]
    ages = [a + 30.0 for a in AGES] + AGES
    anchors = [B, B + 1, B + 2, 3 * B, 3 * B + 1, 3 * B + 2]
    assert nt_xent(VIEW1, VIEW2, T).item() == pytest.approx(view_pair_by_hand(views, anchors, T), rel=1e-5)
    got = yaware_nce(VIEW1, VIEW2, torch.tensor(AGES), T, sigma=10.0).item()
    assert got == pytest.approx(view_pair_by_hand(views, anchors, T, ages * 2), rel=1e-5)
    # MoCo: keys are rank 0's then rank 1's; query i of rank 1 has key B + i as its positive
    expected = moco_term_by_hand(VIEW1, [*-VIEW2, *VIEW2], [B, B + 1, B + 2], T)
    assert moco_contrastive(VIEW1, VIEW2, T).item() == pytest.approx(expected, rel=1e-5)
