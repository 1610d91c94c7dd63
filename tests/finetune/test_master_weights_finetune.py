"""Full fine-tuning in bf16 on ``common.master_weights``: the trained weights are bf16 tensors stepped by
``MasterAdamW`` on their fp32 masters (clipping inside, the lr schedule driving its groups), the training tracks
fp32's, a NaN step never reaches the masters, and the model returned holds the best epoch's masters in fp32. In
fp32 the loop is torch's AdamW with ``clip_grad_norm_`` on fp32 weights, as before. LoRA's adapters take the
same path; its frozen base weights stay fp32."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from common.master_weights import KEPT_FP32, MasterAdamW
from common.models import create_backbone
from common.schedule import warmup_cosine
from finetune.config import OptimConfig, TrainConfig
from finetune.modes import full
from finetune.modes.common import FoldInputs
from finetune.modes.lora import fit_predict_lora

EPOCHS, BATCH, N_TRAIN = 4, 4, 16  # 4 steps an epoch


class Losses:
    """A TensorBoard writer that keeps the epochs' training losses."""

    def __init__(self):
        self.train_loss: list[float] = []

    def add_scalar(self, key: str, value: float, epoch: int) -> None:
        if key.endswith("train_loss"):
            self.train_loss.append(value)


def vit_fold(initial: dict | None = None, fitted: dict | None = None, tb: Losses | None = None) -> FoldInputs:
    """A two-block ViT at 16³ (LayerNorms kept fp32, layer-decayed lr groups) on a planted class difference;
    ``initial`` and ``fitted`` receive the model's state before training and the state that predicts."""
    g = torch.Generator().manual_seed(0)
    y = np.arange(32) % 2
    volumes = torch.rand(32, 1, 16, 16, 16, generator=g) + 0.5 * torch.as_tensor(y, dtype=torch.float32).reshape(
        -1, 1, 1, 1, 1
    )

    def make_backbone() -> nn.Module:
        backbone = create_backbone("vit_tiny_p16", img_size=16, patch_size=8, depth=2)
        if initial is not None:
            initial.update({f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()})
        return backbone

    keep = None if fitted is None else (lambda model: fitted.update(copy.deepcopy(model.state_dict())))
    return FoldInputs(
        volumes=volumes,
        make_backbone=make_backbone,
        train_idx=np.arange(N_TRAIN),
        val_idx=np.arange(N_TRAIN, 24),
        test_idx=np.arange(24, 32),
        y=y,
        kind="classification",
        n_classes=2,
        seed=0,
        features_key="test",
        tb=tb,
        on_fitted=keep,
    )


def config(precision: str, **optim) -> tuple[TrainConfig, OptimConfig]:
    train = TrainConfig(epochs=EPOCHS, batch_size=BATCH, patience=EPOCHS, precision=precision, device="cpu")
    return train, OptimConfig(**{"lr": 1e-3, "warmup_epochs": 1, **optim})


class Recorded(MasterAdamW):
    """``MasterAdamW`` that keeps the instances made and each group's lr at every step."""

    made: list[Recorded] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs: list[list[float]] = []
        Recorded.made.append(self)

    def step(self, closure=None) -> None:
        self.lrs.append([g["lr"] for g in self.param_groups])
        super().step(closure)


def test_bf16_fine_tuning_tracks_fp32():
    """Same fold, seed and batches in bf16 and fp32, at an lr (1e-4) whose updates are below bf16's resolution of
    most weights. bf16 rounds activations and gradients to 8 significant bits (~0.4 %), so the epochs' losses
    agree within 1 % (measured: 0.3 %) and the trained weights' update differs from fp32's by at most 25 % of its
    size (measured: 9 %; bf16 autocast on fp32 weights, the path before: 11 %). Adam normalises each coordinate's
    step, so coordinates with a near-zero gradient take bf16's rounding at full size: this part, not the masters,
    sets the 9 %. bf16 weights stepped without fp32 masters lose the updates below their rounding: 96 % off."""
    runs = {}
    for precision in ("fp32", "bf16"):
        initial, fitted, tb = {}, {}, Losses()
        _, _, info = full.fit_predict_full(vit_fold(initial, fitted, tb), *config(precision, lr=1e-4))
        assert info["precision"] == precision and info["best_epoch"] == EPOCHS - 1  # the last epoch is returned
        runs[precision] = initial, fitted, tb.train_loss
    (initial, fp32, fp32_losses), (_, bf16, bf16_losses) = runs["fp32"], runs["bf16"]
    assert len(bf16_losses) == EPOCHS
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0.01)
    weights = [k for k, v in fp32.items() if k in initial and v.is_floating_point() and "running" not in k]
    assert all(bf16[k].dtype == torch.float32 for k in weights)
    update = torch.cat([(fp32[k] - initial[k]).flatten() for k in weights])
    off = torch.cat([(bf16[k] - fp32[k]).flatten() for k in weights])
    assert off.norm() <= 0.25 * update.norm(), float(off.norm() / update.norm())


def test_bf16_trains_bf16_weights_through_master_adamw_and_returns_the_best_epochs_masters(monkeypatch):
    """Epoch 1 validates best: the model that predicts holds epoch 1's masters exactly, in fp32, not the bf16
    weights nor the masters of the epochs after. While training, the trained weights are bf16 tensors (the
    LayerNorms fp32), all of them stepped by ``MasterAdamW``, which clips (no ``clip_grad_norm_``) and whose
    groups follow the warm-up + cosine schedule at their layer-decayed lr."""
    Recorded.made = []
    monkeypatch.setattr(full, "MasterAdamW", Recorded)
    clipped = []
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", lambda *args, **kwargs: clipped.append(args))
    masters, dtypes = [], []

    def validate(model, *args):  # epoch e scores [0.5, 0.9, 0.6, 0.7][e]
        optimizer = Recorded.made[-1]
        master_of = {id(p): m for m, p in optimizer.model_param.items()}
        masters.append({n: master_of[id(p)].clone() for n, p in model.named_parameters() if id(p) in master_of})
        kept_fp32 = {
            f"{m}.{n}"
            for m, module in model.named_modules()
            if isinstance(module, KEPT_FP32)
            for n, _ in module.named_parameters(recurse=False)
        }
        dtypes.append({n: (p.dtype, n in kept_fp32) for n, p in model.named_parameters() if p.requires_grad})
        return [0.5, 0.9, 0.6, 0.7][len(masters) - 1], 0.0

    monkeypatch.setattr(full, "_validate", validate)
    fitted = {}
    train, optim = config("bf16", grad_clip=0.5)
    _, _, info = full.fit_predict_full(vit_fold(fitted=fitted), train, optim)
    assert (info["precision"], info["best_epoch"], info["epochs_run"]) == ("bf16", 1, EPOCHS)

    (optimizer,) = Recorded.made
    assert optimizer.max_grad_norm == 0.5 and not clipped
    trained = list(dtypes[0])
    kept_fp32 = {n for n in trained if dtypes[0][n][1]}  # the LayerNorms (and a conv the check moved to fp32)
    assert {"backbone.norm.weight", "backbone.blocks.0.norm1.weight"} <= kept_fp32
    assert all(dtypes[-1][n][0] == (torch.float32 if n in kept_fp32 else torch.bfloat16) for n in trained)
    assert dtypes[-1]["backbone.blocks.1.attn.qkv.weight"][0] == torch.bfloat16
    assert set(masters[0]) == set(trained) and all(m.dtype == torch.float32 for m in masters[0].values())

    steps = EPOCHS * (N_TRAIN // BATCH)
    factor = warmup_cosine(N_TRAIN // BATCH, steps, optim.min_lr_ratio)
    assert len(optimizer.lrs) == steps and len({g["lr_scale"] for g in optimizer.param_groups}) > 1
    for step, lrs in enumerate(optimizer.lrs):
        expected = [optim.lr * g["lr_scale"] * factor(step) for g in optimizer.param_groups]
        np.testing.assert_allclose(lrs, expected, rtol=1e-12)

    assert all(v.dtype == torch.float32 for v in fitted.values() if v.is_floating_point())
    for n, master in masters[1].items():
        torch.testing.assert_close(fitted[n], master, rtol=0, atol=0, msg=n)
    assert any(not torch.equal(masters[1][n], masters[3][n]) for n in trained)  # restoring epoch 1 mattered


def test_fp32_fine_tuning_is_torch_adamw_with_clip_grad_norm_on_fp32_weights(monkeypatch):
    """fp32 keeps the loop from before master weights (its outputs were checked bit-identical to it): fused
    ``torch.optim.AdamW``, ``clip_grad_norm_`` every step, fp32 weights throughout."""
    made, clipped, dtypes = [], [], set()
    adamw, clip = full.adamw, nn.utils.clip_grad_norm_
    monkeypatch.setattr(full, "adamw", lambda *args, **kwargs: made.append(adamw(*args, **kwargs)) or made[-1])
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", lambda *args, **kwargs: clipped.append(1) or clip(*args, **kwargs))
    validate = full._validate

    def validate_recording(model, *args):
        dtypes.update(p.dtype for p in model.parameters())
        return validate(model, *args)

    monkeypatch.setattr(full, "_validate", validate_recording)
    _, _, info = full.fit_predict_full(vit_fold(), *config("fp32"))
    assert info["precision"] == "fp32"
    (optimizer,) = made
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    assert len(clipped) == EPOCHS * (N_TRAIN // BATCH) and dtypes == {torch.float32}


def test_a_nan_step_in_bf16_never_reaches_the_masters():
    """One training volume is NaN: the step of its batch is skipped every epoch (before the backward, so the
    masters and the head's BatchNorm statistics stay finite) and the other steps train."""
    fitted, initial = {}, {}
    inputs = vit_fold(initial, fitted)
    inputs.volumes[N_TRAIN - 1] = float("nan")  # not among the rows the bf16 check runs on
    val_out, test_out, info = full.fit_predict_full(inputs, *config("bf16"))
    assert info["precision"] == "bf16" and info["nonfinite_skipped"] == EPOCHS
    assert np.isfinite(val_out).all() and np.isfinite(test_out).all()
    assert all(torch.isfinite(v).all() for v in fitted.values() if v.is_floating_point())
    assert not torch.equal(fitted["backbone.blocks.0.attn.qkv.weight"], initial["backbone.blocks.0.attn.qkv.weight"])


def test_lora_in_bf16_steps_its_adapters_through_master_adamw_and_keeps_its_frozen_base_fp32(monkeypatch):
    """LoRA's trainable adapters, norms and head take full fine-tuning's bf16 path; the frozen weights they
    adapt stay fp32 (autocast casts them), so that merging the fp32 adapters into them loses nothing."""
    Recorded.made = []
    monkeypatch.setattr(full, "MasterAdamW", Recorded)
    seen = {}

    def validate(model, *args):
        seen.update({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()})
        return 0.5, 0.0

    monkeypatch.setattr(full, "_validate", validate)
    fitted = {}
    train, optim = config("bf16")
    train.epochs = 1
    _, _, info = fit_predict_lora(vit_fold(fitted=fitted), train, optim)
    assert info["precision"] == "bf16" and len(Recorded.made) == 1
    adapters = [n for n in seen if "lora_" in n]
    assert adapters and all(seen[n] == (torch.bfloat16, True) for n in adapters)
    frozen = [n for n, (_, trains) in seen.items() if not trains]
    assert frozen and all(seen[n][0] == torch.float32 for n in frozen)
    assert all(v.dtype == torch.float32 for v in fitted.values() if v.is_floating_point())  # merged, in fp32
