"""bf16 through the engine as it trains: bf16 weights with fp32 masters (``common.master_weights``). A few bf16
steps stay close to fp32's from the same start, in the loss and in the weights; a checkpoint resumes exactly and
the export holds the fp32 masters; activation checkpointing (the encoder's blocks and MAE's decoder blocks)
changes no loss or gradient of any objective, in fp32 or bf16."""

import copy

import pytest
import torch

from common.bf16_check import Fp32Conv3d
from common.config import load_config
from common.master_weights import bf16_weights
from common.models import create_backbone
from pretrain.config import PretrainConfig
from pretrain.engine import Engine, build_ds_config, init_distributed, train_precision
from pretrain.objectives import build_objective
from tests.pretrain.conftest import TINY_VIT

VIT = ("vit_base_p16", 16, TINY_VIT)
CNN = ("resnet18", 32, {"widen_factor": 0.25})  # layer4 at 1³: its convolutions move to fp32 in bf16


def config(objective: str, steps: int = 4):
    overrides = [f"objective.name={objective}", "objective.contrastive.proj_hidden=32", "objective.mae.decoder_dim=32"]
    overrides += ["objective.mae.decoder_depth=1", "objective.mae.decoder_heads=4", "data.batch_size=4"]
    overrides += ["optim.lr=1e-3", "optim.warmup_steps=1", f"train.steps={steps}"]
    return load_config(PretrainConfig, overrides=overrides)


def objective_on(cfg, backbone) -> torch.nn.Module:
    name, size, kwargs = backbone
    torch.manual_seed(0)
    return build_objective(cfg.objective, create_backbone(name, img_size=size, **kwargs))


def batches(size: int, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            **{k: torch.rand(4, 1, size, size, size, generator=g) for k in ("image", "view1", "view2")},
            "age": 20 + 60 * torch.rand(4, generator=g),
        }
        for _ in range(n)
    ]


def train(engine: Engine, data: list[dict[str, torch.Tensor]], first: int = 0) -> list[float]:
    losses = []
    for i, batch in enumerate(data, start=first):
        torch.manual_seed(i)  # the same masks and queue draws on every path
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_bf16_steps_track_fp32_in_loss_and_weights():
    """MAE: a loss well conditioned at initialisation (contrastive losses of 4 random volumes move by up to 10 %
    within 3 steps under any change of rounding, fp32 kernels included: tests/pretrain/test_bf16.py)."""
    init_distributed()
    cfg = config("mae")
    models = {"fp32": objective_on(cfg, VIT)}
    models["bf16"] = copy.deepcopy(models["fp32"])
    start = {n: p.detach().clone() for n, p in models["fp32"].named_parameters()}
    engines = {p: Engine(m, build_ds_config(cfg, None, 1, p)) for p, m in models.items()}
    weights = dict(models["bf16"].named_parameters())
    assert weights["encoder.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert weights["encoder.norm.weight"].dtype == torch.float32
    data = batches(16, 4)
    losses = {p: train(e, data) for p, e in engines.items()}
    # measured: 1e-5 to 1e-4 apart
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.01, atol=0.0, msg=str(losses))
    apart, moved = {}, {}
    with engines["bf16"].full_parameters(models["bf16"]), torch.no_grad():  # the fp32 masters
        for name, w32 in models["fp32"].named_parameters():
            assert weights[name].dtype == torch.float32, name
            apart[name], moved[name] = float((weights[name] - w32).norm()), float((w32 - start[name]).norm())
    # how far bf16's weights are from fp32's, against how far fp32's moved in 4 steps: measured 0.044 for the
    # whole model and at most 0.062 for a matrix (a bias can be further off: the attention key bias has a
    # gradient of rounding noise only, which Adam scales up to ±lr steps in either precision)
    total = lambda d: sum(v**2 for v in d.values()) ** 0.5
    assert total(apart) <= 0.1 * total(moved), total(apart) / total(moved)
    for name, w in models["fp32"].named_parameters():
        if w.ndim >= 2 and moved[name] > 0:
            assert apart[name] <= 0.15 * moved[name], (name, apart[name] / moved[name])


def test_convolutions_moved_to_fp32_keep_fp32_weights_and_train():
    init_distributed()
    cfg = config("simclr")
    model = objective_on(cfg, CNN)
    data = batches(32, 2)
    train_precision(model, data[0], "bf16")  # layer3 at 2³, layer4 at 1³: oneDNN's faulty bf16 weight gradient
    moved = {n: m.weight for n, m in model.named_modules() if isinstance(m, Fp32Conv3d)}
    assert moved and all(n.startswith(("encoder.net.layer3.", "encoder.net.layer4.")) for n in moved)
    engine = Engine(model, build_ds_config(cfg, None, 1, "bf16"))
    before = {n: w.detach().clone() for n, w in moved.items()}
    assert all(w.dtype == torch.float32 for w in moved.values())
    assert model.encoder.net.conv1.weight.dtype == torch.bfloat16
    losses = train(engine, data)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(w.dtype == torch.float32 and not torch.equal(w, before[n]) for n, w in moved.items())


def test_a_bf16_checkpoint_resumes_exactly_and_exports_the_fp32_masters(tmp_path):
    init_distributed()
    cfg = config("mae")
    data = batches(16, 4)
    engine = Engine(objective_on(cfg, VIT), build_ds_config(cfg, None, 1, "bf16"))
    train(engine, data[:2])
    engine.save(tmp_path, "step2", {})
    saved = torch.load(tmp_path / "step2" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    # the module's weights are saved as the fp32 masters: what a `deepspeed:DIR` init reads
    assert saved["encoder.blocks.0.mlp.fc1.weight"].dtype == torch.float32
    after = train(engine, data[2:], first=2)
    resumed = Engine(objective_on(config("mae"), VIT), build_ds_config(cfg, None, 1, "bf16"))
    resumed.load(tmp_path)
    assert train(resumed, data[2:], first=2) == after
    for engine_ in (engine, resumed):
        with engine_.full_parameters(engine_.module.encoder) as encoder:
            exported = {n: p.detach().clone() for n, p in encoder.state_dict(keep_vars=True).items()}
        assert exported["blocks.0.mlp.fc1.weight"].dtype == torch.float32
        masters = {n: engine_.masters[p] for n, p in engine_.module.encoder.named_parameters() if p in engine_.masters}
        assert masters and all(torch.equal(exported[n], m) for n, m in masters.items())
    assert all(torch.equal(a, b) for a, b in zip(engine.masters.values(), resumed.masters.values()))


def loss_and_grads(objective: str, backbone, checkpointing: bool, precision: str, batch) -> tuple[float, dict, dict]:
    """One forward + backward as the engine runs it (bf16: bf16 weights under autocast), and how many times the
    first encoder stage and, with a decoder (MAE), the first decoder block ran (twice with checkpointing:
    forward, then its recompute in the backward)."""
    model = objective_on(config(objective), backbone)
    if precision == "bf16":
        train_precision(model, batch, "bf16")
    model.encoder.set_grad_checkpointing(checkpointing)  # as pretrain.cli sets it: the one switch
    stages = {"encoder": model.encoder.blocks[0] if hasattr(model.encoder, "blocks") else model.encoder.net.layer1}
    if hasattr(model, "decoder_blocks"):
        stages["decoder"] = model.decoder_blocks[0]
    runs = dict.fromkeys(stages, 0)
    for name, stage in stages.items():  # the recompute stops early: no forward hook
        stage.register_forward_pre_hook(lambda *_, name=name: runs.update({name: runs[name] + 1}))
    torch.manual_seed(0)
    with bf16_weights(model) if precision == "bf16" else torch.autocast("cpu", enabled=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch)["loss"]
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, runs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "objective, backbone",
    [("mae", VIT), ("mae_contrastive", VIT), ("simclr", VIT), ("moco", VIT), ("yaware", VIT), ("simclr", CNN)],
    ids=["mae", "mae_contrastive", "simclr", "moco", "yaware", "simclr-resnet"],
)
def test_activation_checkpointing_changes_no_loss_or_gradient(objective, backbone, precision):
    """The recompute runs the same kernels on the same values (same masks, dropout, BatchNorm statistics and
    autocast state). Measured on CPU: bit-identical in both precisions; allowed: fp32 to 1e-5, bf16 to one bf16
    step (2^-8 relative), room for kernels that split their work differently between calls."""
    init_distributed()
    batch = batches(backbone[1], 1)[0]
    loss, grads, runs = loss_and_grads(objective, backbone, False, precision, batch)
    loss_ckpt, grads_ckpt, runs_ckpt = loss_and_grads(objective, backbone, True, precision, batch)
    assert ("decoder" in runs) == objective.startswith("mae")
    assert runs == dict.fromkeys(runs, 1) and runs_ckpt == dict.fromkeys(runs, 2), (runs, runs_ckpt)
    tolerance = {"fp32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=2**-8, atol=1e-5)}[precision]
    torch.testing.assert_close(loss_ckpt, loss, **tolerance)
    assert grads_ckpt.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, **tolerance, msg=name)
