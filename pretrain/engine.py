"""DeepSpeed, in one place: launcher arguments, process group, config, the training engine, checkpoints and
full-weight access.

Everything else in ``pretrain`` sees a plain ``nn.Module`` objective and this module's ``Engine``. DeepSpeed
owns the optimizer (AdamW), the schedule (``common.schedule``, as its client scheduler), gradient accumulation
and clipping, ZeRO (stages 0–3), bf16 autocast (its ``torch_autocast`` section) and the checkpoint format; in
bf16 at ZeRO 0 the weights are bf16 and the optimizer is ``common.master_weights.MasterAdamW`` on their fp32
masters (it also clips), handed to DeepSpeed as a client optimizer;
its checkpoint files are checked before it opens them by ``common.deepspeed_checkpoint``, the one other
module that imports DeepSpeed (a fine-tune reads them too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common import bf16_check
from common.bf16_check import preserved
from common.deepspeed_checkpoint import check_tag
from common.errors import CheckpointError, ConfigError
from common.master_weights import MasterAdamW, bf16_weights, master_values, to_bf16_weights
from common.optim import adamw_kernel
from common.precision import resolve_precision, step_seconds
from common.schedule import warmup_cosine

# DeepSpeed's logger writes to stdout (from its import on: the accelerator it picked); a command's stdout
# carries its result (the run's JSON summary, --print-config's YAML), so DeepSpeed logs to stderr instead.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

log = logging.getLogger(__name__)

SCHEDULE = "neurotransfer.warmup_cosine"  # common.schedule, handed to DeepSpeed as a client scheduler
# Keys the pretrain config decides; a DeepSpeed JSON may repeat them only with the same value.
OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "torch_autocast",
)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed's own options: ``--deepspeed``, ``--deepspeed_config`` (JSON in ``configs/deepspeed/``)."""
    deepspeed.add_config_arguments(parser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group the ``deepspeed`` launcher described, or make a world of one for plain
    ``python``.

    Returns (rank, world_size). Also gives each local rank its share of the CPU threads unless
    ``OMP_NUM_THREADS`` says otherwise.
    """
    if "WORLD_SIZE" not in os.environ:  # plain `python pretrain/main.py`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    backend = get_accelerator().communication_backend_name()  # nccl on CUDA; gloo (or ccl) on CPU
    if os.environ["WORLD_SIZE"] == "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about 3 min on 2 cores, again in
        # every new environment) that a world of one never calls: marked unavailable, the backend skips it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def device_type() -> str:
    return get_accelerator().device_name()


def resolve_run_precision(precision: str) -> str:
    """``train.precision`` resolved for the accelerator DeepSpeed runs on (``common.precision``'s words)."""
    return resolve_precision(precision, device_type(), key="train.precision")


def build_ds_config(cfg, ds_json: str | Path | None, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config: the JSON file (ZeRO stage, communication) ⊕ what the pretrain ``cfg`` decides."""
    base: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    source = "default DeepSpeed config"
    if ds_json is not None:
        source = str(ds_json)
        try:
            base = json.loads(Path(ds_json).read_text())
        except OSError as e:
            raise ConfigError(f"{ds_json}: cannot read the DeepSpeed config ({e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ds_json}: not valid JSON ({e})") from None
    for section in ("fp16", "bf16"):
        if base.get(section, {}).get("enabled", False):
            raise ConfigError(
                f"{source}: '{section}' is enabled; set the precision with train.precision "
                "(bf16 runs under DeepSpeed's torch_autocast, with fp32 master weights)"
            )
    o = cfg.optim
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.accumulation_steps,
        "gradient_clipping": float(o.grad_clip),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": 1e-8,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                **adamw_kernel(device_type()),
            },
        },  # torch's AdamW, fused where the device has the kernel: no JIT-compiled op on any accelerator
        # ours, not DeepSpeed's WarmupCosineLR (which trains its first two steps at lr 0); Engine builds it
        "scheduler": {
            "type": SCHEDULE,
            "params": {
                "total_num_steps": cfg.train.steps,
                "warmup_num_steps": o.warmup_steps,
                "cos_min_ratio": o.min_lr_ratio,
            },
        },
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
    }
    for key in OWNED_KEYS:
        if key in base and base[key] != ours[key]:
            raise ConfigError(
                f"{source}: '{key}' = {base[key]!r} conflicts with the pretrain config "
                f"({ours[key]!r}); remove it from the DeepSpeed JSON and set it in the YAML recipe"
            )
    global_batch = cfg.data.batch_size * o.accumulation_steps * world_size
    if "train_batch_size" in base and base["train_batch_size"] != global_batch:
        raise ConfigError(
            f"{source}: train_batch_size {base['train_batch_size']} != data.batch_size × "
            f"optim.accumulation_steps × world size = {global_batch}; remove train_batch_size"
        )
    stage = base.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return {
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **base,
        **ours,
        "train_batch_size": global_batch,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weights; none on norms, biases, position embeddings and tokens (``no_weight_decay``)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def current_device() -> torch.device:
    """This rank's accelerator (``cuda:<local rank>``, ``cpu``)."""
    return torch.device(get_accelerator().current_device_name())


def train_precision(model: nn.Module, batch: dict[str, torch.Tensor], requested: str) -> tuple[str, str]:
    """What ``model`` (an objective) trains in for ``train.precision: requested``, and why
    (``common.bf16_check.train_precision``): where it would compute in bf16, convolutions whose bf16 kernel
    fails its check move to fp32 and the model's bf16 step on ``batch`` is checked against fp32; for ``auto``, a
    few forward + backward passes in each precision are also timed. Every rank checks and times, and all decide
    alike. The model's buffers (BatchNorm statistics), gradients and the RNG are left as they were."""
    device = current_device()
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}

    def step(precision: str) -> None:  # bf16 as the Engine runs it: bf16 weights (cast in the step, as its
        # optimizer writes them every step), autocast for the rest
        bf16 = precision == "bf16"
        with bf16_weights(model) if bf16 else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch)["loss"]
            loss.float().backward()
            model.zero_grad(set_to_none=True)

    def timings() -> dict[str, float]:
        with preserved(model):
            seconds = step_seconds(step, device)
        mean = torch.tensor([seconds["fp32"], seconds["bf16"]], device=device, dtype=torch.float64)
        if dist.get_world_size() > 1:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        return {"fp32": float(mean[0]), "bf16": float(mean[1])}

    def gather(value: object) -> list:
        if dist.get_world_size() == 1:
            return [value]
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    loss = lambda m: m(batch)["loss"]
    return bf16_check.train_precision(requested, model, loss, device, "train.precision", timings, gather)


class Engine:
    """A DeepSpeed engine around ``model`` with the few operations the trainer needs."""

    def __init__(self, model: nn.Module, ds_config: dict[str, Any]):
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if self.zero_stage == 3 and getattr(model, "updates_in_place", False):  # an Objective's declaration
            raise ConfigError(
                "this objective updates a momentum encoder in place, which ZeRO stage 3 partitions; "
                "use ZeRO stage 0-2 (configs/deepspeed/zero2.json) for moco"
            )
        self.config = ds_config
        groups = param_groups(model, ds_config["optimizer"]["params"]["weight_decay"])
        # bf16 at ZeRO 0: bf16 weights, fp32 masters in our optimizer (common.master_weights), which also clips;
        # ZeRO 1-3 partition DeepSpeed's own optimizer state, so there autocast casts fp32 weights every step
        self.masters: dict[nn.Parameter, torch.Tensor] = {}
        optimizer = None
        if ds_config.get("torch_autocast", {}).get("enabled") and self.zero_stage == 0:
            self.masters = to_bf16_weights(model.to(current_device()))  # the masters live where the weights do
            kwargs = {k: v for k, v in ds_config["optimizer"]["params"].items() if k != "torch_adam"}
            optimizer = MasterAdamW(groups, self.masters, ds_config["gradient_clipping"], **kwargs)
            ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"} | {"gradient_clipping": 0.0}
        schedule = ds_config.get("scheduler", {})
        lr_scheduler = None
        if schedule.get("type") == SCHEDULE:
            p = schedule["params"]
            factor = warmup_cosine(p["warmup_num_steps"], p["total_num_steps"], p["cos_min_ratio"])
            lr_scheduler = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            ds_config = {k: v for k, v in ds_config.items() if k != "scheduler"}
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer else groups,
            config=ds_config,
            lr_scheduler=lr_scheduler,
        )
        self.device = self.ds.device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.zero_stage == 0 and self.world_size == 1:
            # nothing to average, yet DeepSpeed would flatten every gradient into one buffer, all-reduce it
            # over the world of one and copy it back: a second copy of all gradients and two passes per step
            self.ds.enable_backward_allreduce = False

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ds(self.to_device(batch))  # autocast (bf16) is applied inside when enabled

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank, so that all ranks skip a bad step together (one sync)."""
        flag = torch.isfinite(loss.detach().float()).float()
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return float(value.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        if self.world_size == 1:
            return [obj]
        dist.all_gather_object(out, obj)
        return out

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def is_boundary(self) -> bool:
        """Whether the next ``step`` ends a gradient accumulation window (an optimizer step)."""
        return self.ds.is_gradient_accumulation_boundary()

    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping: DeepSpeed's when it tracks one, else computed from the grads
        (ZeRO 0, where gradients are whole and already averaged after ``backward`` at a boundary)."""
        norm = self.ds.get_global_grad_norm()
        if norm is not None:
            return float(norm)
        if self.zero_stage == 0:
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        return None

    def step(self) -> None:
        self.ds.step()

    @property
    def global_step(self) -> int:
        return self.ds.global_steps

    @property
    def lr(self) -> float:
        """The lr the next ``step`` applies (read it before ``step``: the schedule advances in it)."""
        return float(self.ds.get_lr()[0])

    def save(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """A DeepSpeed checkpoint ``folder/tag`` (collective: every rank calls it); ``folder/latest`` is
        rewritten only after every file of the tag is written, so a kill mid-save leaves the previous one. bf16
        weights are saved as their fp32 masters: the checkpoint has an fp32 run's weights, and a run resumed
        from it (in either precision) starts from them."""
        with master_values(self.masters, self.module):
            self.ds.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=True)

    def load(self, folder: Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
        """Restore model, optimizer, schedule from ``folder`` (``tag`` or ``latest``); returns (tag, client
        state). Every file of the tag is read with ``weights_only`` first: DeepSpeed itself unpickles in full."""
        folder = Path(folder)
        if tag is None:
            latest = folder / "latest"
            if not latest.is_file():
                raise CheckpointError(f"{folder}: no DeepSpeed checkpoint to resume (no 'latest' file)")
            tag = latest.read_text().strip()
        if not tag or Path(tag).name != tag or not (folder / tag).is_dir():
            raise CheckpointError(f"{folder}: no DeepSpeed checkpoint tag folder {tag!r} to resume")
        check_tag(folder / tag)
        with master_values(self.masters, self.module):  # the saved fp32 weights become the masters exactly
            path, client = self.ds.load_checkpoint(
                str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise CheckpointError(f"{folder}: no DeepSpeed checkpoint {tag!r} to resume")
        return tag, client or {}

    @contextlib.contextmanager
    def full_parameters(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` with whole fp32 parameters (ZeRO-3 gathers its partitions; bf16 weights show their fp32
        masters; other stages hold them already)."""
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module
        else:
            with master_values(self.masters, module):
                yield module

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def peak_memory_gb(self) -> float:
        """Peak memory of this rank: accelerator memory allocated, or on CPU the process's peak RSS (VmHWM:
        its own address space; ``ru_maxrss`` would include the launcher's, inherited across exec)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            with open("/proc/self/status") as f:
                return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20  # kB
        except (OSError, StopIteration):
            import resource  # Unix-only; the fallback where /proc is absent

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
