"""The fast step (fused AdamW through DeepSpeed, visible-only matmul patch embedding, no gradient all-reduce in a
world of one) trains like the reference step (torch's per-parameter AdamW loop, the strided conv over every
patch, DeepSpeed's all-reduce)."""

import copy
import types

import torch

from common.config import load_config
from common.models import create_backbone
from pretrain.config import PretrainConfig
from pretrain.engine import Engine, build_ds_config, init_distributed
from pretrain.objectives import build_objective
from tests.pretrain.conftest import TINY_VIT, tiny_config, write_yaml


def conv_tokens(self, x, ids_keep=None):
    """The reference patch embedding: the Conv3d over every patch, then the kept tokens gathered."""
    tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)
    if ids_keep is None:
        return tokens
    return torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def test_fast_step_matches_the_reference_step(tmp_path):
    init_distributed()
    cfg = load_config(PretrainConfig, write_yaml(tmp_path / "c.yaml", tiny_config(optim={"lr": 1e-3})))
    torch.manual_seed(0)
    fast = build_objective(cfg.objective, create_backbone("vit_base_p16", img_size=16, **TINY_VIT))
    reference = copy.deepcopy(fast)
    initial = [(n, p.detach().clone()) for n, p in fast.named_parameters()]
    reference.encoder.patch_embed.tokens = types.MethodType(conv_tokens, reference.encoder.patch_embed)

    fast_config = build_ds_config(cfg, None, 1, "fp32")
    reference_config = copy.deepcopy(fast_config)
    params = reference_config["optimizer"]["params"]
    params.pop("fused", None)
    params["foreach"] = False  # torch's per-parameter loop
    engines = {"fast": Engine(fast, fast_config), "reference": Engine(reference, reference_config)}
    engines["reference"].ds.enable_backward_allreduce = True  # DeepSpeed's own path, even in a world of one
    assert engines["fast"].optimizer.defaults["fused"] is True
    assert not engines["reference"].optimizer.defaults["fused"]

    batches = [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(4)]
    losses = {name: [] for name in engines}
    for name, engine in engines.items():
        for i, batch in enumerate(batches):
            torch.manual_seed(i)  # the same masks on both paths
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fast"], losses["reference"], rtol=1e-5, atol=1e-6)
    assert losses["fast"][-1] < losses["fast"][0]  # it trains
    for (name, a), (_, b), (_, start) in zip(fast.named_parameters(), reference.named_parameters(), initial):
        if name.endswith("attn.qkv.bias"):  # the key bias shifts each query's logits alike: its gradient is
            dim = a.shape[0] // 3  # rounding noise, which Adam scales up to ±lr steps on either path
            a, b, start = (torch.cat([t[:dim], t[2 * dim :]]) for t in (a, b, start))
        # Adam divides by sqrt(v): the rare elements whose gradient is mostly rounding noise move a little
        # differently on the two paths; all else agrees to float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)
        assert ((a - b).abs() > 1e-5).float().mean() < 1e-3, name
        if a.requires_grad:
            assert not torch.equal(a, start), f"{name} did not train"


def test_auto_precision_checks_and_times_the_model_where_bf16_is_native_and_leaves_it_as_it_was(monkeypatch):
    """On a CPU without native bf16, pretend it is native so the check and timing run (a ResNet: BatchNorm
    statistics)."""
    from common import precision as precision_module
    from pretrain.engine import train_precision

    init_distributed()
    monkeypatch.setattr(precision_module, "bf16_native", lambda device: True)
    cfg = load_config(PretrainConfig, overrides=["objective.name=simclr", "objective.contrastive.proj_hidden=16"])
    torch.manual_seed(0)
    objective = build_objective(cfg.objective, create_backbone("resnet18", img_size=8))
    before = copy.deepcopy(objective.state_dict())
    batch = {k: torch.rand(2, 1, 8, 8, 8) for k in ("view1", "view2")}
    rng = torch.get_rng_state()
    chosen, why = train_precision(objective, batch, "auto")
    assert chosen in ("fp32", "bf16") and "s in bf16 vs" in why and f"bf16 is {'not ' * (chosen == 'bf16')}" in why
    assert "the check against fp32" in why
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())  # BN statistics too
    assert all(p.grad is None for p in objective.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
