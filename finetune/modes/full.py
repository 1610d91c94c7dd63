"""Full fine-tuning: AdamW with layer-wise lr decay (ViTs), linear warm-up + cosine, class-weighted loss,
early stopping on the validation metric, bf16 where the hardware has it. In bf16 the trained weights are stored in
bf16 and stepped through their fp32 masters (``common.master_weights``: no per-step cast of every weight, fused
AdamW on the masters, clipping folded in); the best epoch's masters are the fp32 model returned. A step whose loss
is NaN/Inf is skipped and counted; ``MAX_NONFINITE_STREAK`` of them in a row stop the fold with advice.

The head starts random, as the linear probe (LP-FT), or as whichever of the two validates better
(``train.head_init=choose``: the fold is trained from both starts and the better best-epoch validation score is
kept; the test rows are predicted by the kept model only)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.bf16_check import train_precision
from common.distributed import seed_everything
from common.errors import TrainingDiverged
from common.master_weights import MasterAdamW, master_values, restore, to_bf16_weights
from common.optim import adamw, adamw_kernel
from common.precision import autocast, resolve_device
from common.schedule import warmup_cosine
from common.tb import progress
from finetune.data import VolumeDataset
from finetune.heads import FineTuneModel
from finetune.linear import fit_head
from finetune.metrics import classification_metrics, regression_metrics
from finetune.modes.common import FoldInputs
from finetune.modes.linear_probe import extract_features

log = logging.getLogger(__name__)

MAX_NONFINITE_STREAK = 10  # NaN/Inf training losses in a row that stop the fold (as pre-training's default)
ADVICE = "use train.precision=fp32 or a lower optim.lr"
HEAD_STARTS = ("random", "probe")  # what train.head_init=choose trains from, in this order (a tie keeps the first)


def param_groups(model: FineTuneModel, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-D tensors and the backbone's ``no_weight_decay()`` names; for backbones
    with
    ``blocks`` (ViTs) lr scaled by ``layer_decay ** (num_layers + 1 - layer_id)`` (BEiT / MAE fine-tuning)."""
    backbone = model.backbone
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    use_ld = layer_decay < 1.0 and hasattr(backbone, "blocks") and hasattr(backbone, "layer_id")
    top = getattr(backbone, "num_layers", 0) + 1
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name.removeprefix("backbone.")
        decay = 0.0 if p.ndim <= 1 or inner in skip else weight_decay
        scale = layer_decay ** (top - backbone.layer_id(inner)) if use_ld and name.startswith("backbone.") else 1.0
        groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr": lr * s, "lr_scale": s, "weight_decay": d} for (s, d), ps in groups.items()]


class EpochSelector:
    """Early stopping on the validation score: keeps the best epoch from ``first`` on (epochs of the lr warm-up
    are not candidates: a lucky score of a barely trained model on a small validation set would otherwise be kept,
    and stop the run ``patience`` epochs later, before the model has learnt the task) and says when to stop."""

    def __init__(self, first: int, patience: int):
        self.first, self.patience = first, patience
        self.best_score: tuple[float, float] = (-np.inf, -np.inf)
        self.best_epoch, self.since_best = -1, 0

    def update(self, epoch: int, score: tuple[float, float]) -> tuple[bool, bool]:
        """(this epoch is the new best, stop now)."""
        if epoch < self.first:
            return False, False
        if score > self.best_score:
            self.best_score, self.best_epoch, self.since_best = score, epoch, 0
            return True, False
        self.since_best += 1
        return False, self.since_best >= self.patience


@torch.no_grad()
def predict(
    model: nn.Module,
    volumes: torch.Tensor,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """(len(idx), out_dim) float32 outputs in eval mode."""
    model.eval()
    outs = []
    for start in range(0, len(idx), batch_size):
        x = volumes[idx[start : start + batch_size]].to(device)
        with autocast(device, precision):
            outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 1)


@dataclass
class Fitted:
    """A fold's model trained from one head start, its best validation epoch restored."""

    model: FineTuneModel
    decode: Callable[[torch.Tensor], np.ndarray]  # model outputs -> probabilities or predictions in target units
    score: tuple[float, float]  # its best validation score (``_validate``: larger is better)
    info: dict  # what metrics.json records for the fold


def fit_predict_full(inputs: FoldInputs, cfg, optim) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train backbone + head on the training rows, keep the best validation epoch, predict val and test.

    ``cfg.head_init`` names the head's start, or ``choose``: the fold is trained from each of ``HEAD_STARTS`` with
    the same seed, rows and batch order, and the model whose best validation score is higher is kept (ties broken
    by the validation loss, as early stopping breaks them; a full tie keeps ``random``). Its info says which
    (``head_init``) and both scores (``head_val_scores``); only the kept model sees the test rows."""
    if cfg.head_init == "choose":
        fitted = {start: _fit(_for_start(inputs, start), cfg, optim, start) for start in HEAD_STARTS}
        start = max(HEAD_STARTS, key=lambda s: fitted[s].score)
        scores = {s: fitted[s].info["val_score"] for s in HEAD_STARTS}
        log.info("fold %d: head_init choose -> %s (validation scores %s)", inputs.fold, start, scores)
        kept = fitted[start]
        kept.info["head_val_scores"] = scores
        del fitted  # the other start's model leaves (device) memory before the predictions
    else:
        kept = _fit(inputs, cfg, optim, cfg.head_init)
    if inputs.on_fitted is not None:
        inputs.on_fitted(kept.model)
    device, precision = resolve_device(cfg.device, key="train.device"), kept.info["precision"]
    val_out, test_out = (
        kept.decode(predict(kept.model, inputs.volumes, rows, cfg.batch_size, device, precision))
        for rows in (inputs.val_idx, inputs.test_idx)
    )
    return val_out, test_out, kept.info


def _for_start(inputs: FoldInputs, start: str) -> FoldInputs:
    """The fold's inputs for one of ``choose``'s runs: its TensorBoard curves under a prefix of their own."""
    return dataclasses.replace(inputs, tb_prefix=f"{inputs.tb_prefix}head_{start}/")


def _fit(inputs: FoldInputs, cfg, optim, head_init: str) -> Fitted:
    """Train from the head start ``head_init`` (``random`` or ``probe``) until early stopping and restore the best
    validation epoch; nothing is predicted on the test rows."""
    seed_everything(inputs.seed)
    device = resolve_device(cfg.device, key="train.device")
    classification = inputs.kind == "classification"
    y = inputs.y
    tr, va = inputs.train_idx, inputs.val_idx

    if classification:
        targets = torch.as_tensor(y, dtype=torch.long)
        counts = np.bincount(y[tr], minlength=inputs.n_classes).astype(np.float64)
        weights = len(tr) / (inputs.n_classes * np.maximum(counts, 1)) if cfg.class_weights else None
        loss_fn = nn.CrossEntropyLoss(
            weight=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        )
        out_dim = inputs.n_classes
        decode = lambda out: torch.softmax(out, dim=1).numpy()
    else:  # regress a standardised target; the head predicts z-scores
        mean, std = float(y[tr].mean()), float(y[tr].std() or 1.0)
        targets = torch.as_tensor((y - mean) / std, dtype=torch.float32)
        loss_fn = nn.MSELoss()
        out_dim = 1
        decode = lambda out: out[:, 0].numpy() * std + mean

    model = FineTuneModel(inputs.make_backbone(), out_dim, cfg.head_dropout, cfg.head_norm).to(device)
    precision = _train_precision(model, loss_fn, inputs, targets, cfg, device, classification)
    head_probe = None
    if head_init == "probe":
        head_probe = init_head_from_probe(
            model, inputs, targets.numpy(), cfg.batch_size, device, precision, cfg.probe_l2
        )
    train_set = VolumeDataset(inputs.volumes[tr], targets[tr].numpy(), augment=inputs.augment, seed=inputs.seed)
    generator = torch.Generator().manual_seed(inputs.seed)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(tr) > cfg.batch_size,
        generator=generator,
    )
    groups = param_groups(model, optim.lr, optim.weight_decay, optim.layer_decay)
    # bf16: bf16 weights, their fp32 masters in the optimizer, which also clips (after the probe, fitted in fp32)
    masters = to_bf16_weights(model) if precision == "bf16" else {}
    if masters:
        optimizer = MasterAdamW(groups, masters, optim.grad_clip, lr=optim.lr, **adamw_kernel(device))
    else:
        optimizer = adamw(groups, device, lr=optim.lr)  # fused
    steps_per_epoch = max(1, len(loader))
    total = steps_per_epoch * cfg.epochs
    warmup = min(total, max(1, round(optim.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, optim.min_lr_ratio))

    selector = EpochSelector(min(math.ceil(warmup / steps_per_epoch), cfg.epochs - 1), cfg.patience)
    best_state = None
    skipped = streak = 0  # non-finite losses: in the fold, in a row
    # a training forward updates BatchNorm's running statistics before its loss is known: kept from before each
    # step, so that a skipped step leaves none of its NaNs in the model
    stats = [b for b in model.buffers() if b.is_floating_point()]
    kept = [b.clone() for b in stats]
    desc = f"fold {inputs.fold}, {head_init} head"
    bar = progress(total=cfg.epochs, desc=desc, unit="epoch", leave=False, disable=None)
    for epoch in range(cfg.epochs):
        model.train()
        running = torch.zeros((), device=device)
        taken = 0
        for x, target in loader:
            x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
            for k, b in zip(kept, stats):
                k.copy_(b)
            with autocast(device, precision):
                out = model(x)
            loss = loss_fn(out.float() if classification else out.float()[:, 0], target)
            if not torch.isfinite(loss.detach()):  # one host sync per step: a NaN step must not reach the weights
                for k, b in zip(kept, stats):
                    b.copy_(k)
                skipped, streak = skipped + 1, streak + 1
                log.warning(
                    "fold %d, epoch %d: non-finite training loss, step skipped (%d in a row, %d in the fold)",
                    inputs.fold,
                    epoch,
                    streak,
                    skipped,
                )
                if streak >= MAX_NONFINITE_STREAK:
                    raise TrainingDiverged(
                        f"fold {inputs.fold}: the training loss was NaN/Inf for {streak} steps in a row (epoch "
                        f"{epoch}, precision {precision}); training diverged: {ADVICE}"
                    )
                continue
            streak, taken = 0, taken + 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.grad_clip > 0 and not masters:
                nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            optimizer.step()
            scheduler.step()
            running += loss.detach()  # summed on device
        if not taken:  # every step skipped: the model is the one already validated
            continue
        train_loss = float(running) / taken
        score = _validate(model, inputs, va, decode, cfg, device, precision) if len(va) else (-train_loss, 0.0)
        if inputs.tb is not None:
            inputs.tb.add_scalar(f"{inputs.tb_prefix}train_loss", train_loss, epoch)
            inputs.tb.add_scalar(f"{inputs.tb_prefix}val_score", score[0], epoch)
            inputs.tb.add_scalar(f"{inputs.tb_prefix}lr", optimizer.param_groups[0]["lr"], epoch)
        is_best, stop = selector.update(epoch, score)
        # the score early stopping follows: validation AUC, or MAE in the target's units
        shown = f"{'AUC' if classification else 'MAE'} {abs(score[0]):.3f}" if len(va) else "none"
        bar.set_postfix_str(f"loss {train_loss:.3f}, val {shown}", refresh=False)
        bar.update()
        if is_best:
            with master_values(masters, model):  # the fp32 weights
                best_state = copy.deepcopy(model.state_dict())
        if stop:
            break
    bar.close()
    if best_state is None:  # only when no epoch took a step: the selector keeps the first candidate epoch otherwise
        raise TrainingDiverged(
            f"fold {inputs.fold}: the training loss was NaN/Inf at every step ({skipped}); nothing trained: {ADVICE}"
        )
    restore(masters)  # fp32 weights again, for the predictions, the model folder and the exports
    model.load_state_dict(best_state)
    info = {
        "best_epoch": selector.best_epoch,
        "epochs_run": epoch + 1,
        "val_score": float(selector.best_score[0]),
        "precision": precision,
        "nonfinite_skipped": skipped,
        "head_init": head_init,
        **({"head_probe_l2": head_probe} if head_probe is not None else {}),
        **({} if classification else {"target_mean": mean, "target_std": std}),  # the head predicts z-scores
    }
    return Fitted(model, decode, selector.best_score, info)


def _train_precision(model, loss_fn, inputs: FoldInputs, targets, cfg, device, classification: bool) -> str:
    """``train.precision`` for this fold's model (``common.bf16_check.train_precision``): where it would
    compute in bf16, checked on a batch of its training volumes first."""
    rows = inputs.train_idx[: max(2, cfg.batch_size)]  # BatchNorm needs two
    x, target = inputs.volumes[rows].to(device), targets[rows].to(device)
    if not classification:
        target = target.float()

    def loss(model: nn.Module) -> torch.Tensor:
        model.train()
        out = model(x).float()
        return loss_fn(out if classification else out[:, 0], target)

    precision, why = train_precision(cfg.precision, model, loss, device)
    log.info("fold %d: train.precision %s -> %s: %s", inputs.fold, cfg.precision, precision, why)
    return precision


@torch.no_grad()
def init_head_from_probe(
    model: FineTuneModel,
    inputs: FoldInputs,
    targets: np.ndarray,
    batch_size: int,
    device,
    precision: str,
    l2: Sequence[float],
) -> float:
    """LP-FT: set ``model.head`` to the linear probe of the backbone's frozen features on the training rows
    (``finetune.linear.fit_head``, its L2 penalty chosen from ``l2``, the linear probe's ``train.probe_l2``, on the
    validation rows) and return that penalty. The probe's standardisation becomes the head's BatchNorm statistics
    (``head_norm=batch``) or is folded into its weights."""
    rows = np.concatenate([inputs.train_idx, inputs.val_idx])
    x = extract_features(model.backbone, inputs.volumes[rows], batch_size, device, precision).double().numpy()
    bad = int((~np.isfinite(x).all(axis=1)).sum())
    if bad:
        raise TrainingDiverged(
            f"fold {inputs.fold}: LP-FT (train.head_init=probe): the initial backbone's features are NaN/Inf for "
            f"{bad} of {len(rows)} training and validation volumes (precision {precision}); use "
            "train.precision=fp32, check the init's weights, or use train.head_init=random"
        )
    n_train = len(inputs.train_idx)
    kind = "classification" if inputs.kind == "classification" else "regression"
    fit = fit_head(x, targets[rows], kind, np.arange(n_train), np.arange(n_train, len(rows)), l2)
    weight, bias = fit["weight"], fit["bias"]
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise TrainingDiverged(
            f"fold {inputs.fold}: LP-FT (train.head_init=probe): the probe fitted to the frozen features has "
            f"NaN/Inf weights (features of magnitude up to {np.abs(x).max():.3g}); use train.precision=fp32, check "
            "the init's weights, or use train.head_init=random"
        )
    if kind == "classification" and weight.shape[0] == 1:  # binary: logit w·x + b as the two classes' logits
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    head = model.head
    if isinstance(head.norm, nn.BatchNorm1d):
        head.norm.running_mean.copy_(torch.as_tensor(fit["mean"]))
        head.norm.running_var.copy_(torch.as_tensor(fit["scale"] ** 2))
        # the norm divides by sqrt(var + eps): with features as tightly spread as registered brains give, eps is
        # not negligible, so the weights undo it
        weight = weight * np.sqrt(fit["scale"] ** 2 + head.norm.eps) / fit["scale"]
    else:  # no normalisation layer: standardise inside the weights
        bias = bias - weight @ (fit["mean"] / fit["scale"])
        weight = weight / fit["scale"]
    head.fc.weight.copy_(torch.as_tensor(weight, dtype=head.fc.weight.dtype))
    head.fc.bias.copy_(torch.as_tensor(bias, dtype=head.fc.bias.dtype))
    return fit["l2"]


def _validate(model, inputs: FoldInputs, va, decode, cfg, device, precision) -> tuple[float, float]:
    """Larger is better: (validation AUC, minus cross-entropy) — the loss breaks ties of a saturated AUC on a
    small validation set — or (minus the MAE, 0)."""
    out = decode(predict(model, inputs.volumes, va, cfg.batch_size, device, precision))
    if not np.isfinite(out).all():
        raise TrainingDiverged(
            f"fold {inputs.fold}: the model's validation outputs are NaN/Inf although its training loss was finite "
            f"(precision {precision}); {ADVICE}"
        )
    if inputs.kind == "classification":
        m = classification_metrics(inputs.y[va], out)
        ce = -float(np.mean(np.log(np.clip(out[np.arange(len(va)), inputs.y[va]], 1e-7, 1))))
        return (m["roc_auc"] if np.isfinite(m["roc_auc"]) else m["balanced_accuracy"]), -ce
    return -regression_metrics(inputs.y[va], out)["mae"], 0.0
