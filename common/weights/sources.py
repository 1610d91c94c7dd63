"""One reader per weight source format: read the file, check it is that kind, rename keys to the model's
names.

A reader is ``read(path, model, axis) -> (state, SourceLayout)``, registered in ``READERS`` under its init
spec prefix (``timm2d``, ``videomae``, ``medicalnet``, ``deepspeed``); ``export`` reads our own safetensors
exports. Shape adaptation happens afterwards, in one place (``common.weights.fit``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from common import checkpoint, deepspeed_checkpoint
from common.errors import CheckpointError
from common.weights.adapt import qkv_bias_from_qv
from common.weights.files import State, keys_of, read_tensor_file
from common.weights.fit import PATCH_KERNEL, SourceLayout, model_prefix
from common.weights.monai_vit import read_monai

Reader = Callable[[Path, nn.Module, int], tuple[State, SourceLayout]]


def strip_prefix(state: State, prefix: str) -> State:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _is_vit(model: nn.Module) -> bool:
    return PATCH_KERNEL in model.state_dict()


def _require(path: Path, state: State, keys: tuple[str, ...], kind: str, hint: str) -> None:
    absent = [k for k in keys if k not in state]
    if absent:
        raise CheckpointError(
            f"{path}: not a {kind} checkpoint — it has no {', '.join(absent)} (first keys: {keys_of(state)}). {hint}"
        )


# ---------------------------------------------------------------------------------------- timm 2D
def read_timm2d(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """ImageNet weights in timm's format: ViT (``patch_embed.proj``, ``pos_embed``) or ResNet (``conv1``)."""
    state = strip_prefix(read_tensor_file(path), "module.")
    hint = "timm2d: expects a 2D timm ViT or ResNet state dict (timm.create_model(...).state_dict())"
    if _is_vit(model):
        _require(path, state, (PATCH_KERNEL, "pos_embed"), "timm 2D ViT", hint)
        if state[PATCH_KERNEL].ndim != 4:
            raise CheckpointError(
                f"{path}: {PATCH_KERNEL} is {state[PATCH_KERNEL].ndim}D, not a 2D (image) kernel; "
                "use videomae: for video weights or a plain path for our own 3D export"
            )
        num_prefix = sum(state[k].shape[1] for k in ("cls_token", "reg_token", "dist_token") if k in state)
        n = state["pos_embed"].shape[1] - num_prefix
        side = round(n**0.5)
        if side * side != n:  # timm's no_embed_class models keep prefix tokens out of pos_embed
            num_prefix, side = 0, round(state["pos_embed"].shape[1] ** 0.5)
        return state, SourceLayout(pos_grid=(side, side), num_prefix=num_prefix, axis=axis)
    _require(path, state, ("conv1.weight", "layer1.0.conv1.weight"), "timm 2D ResNet", hint)
    if state["conv1.weight"].ndim != 4:
        raise CheckpointError(f"{path}: conv1.weight is not a 2D kernel; MedicalNet weights: medicalnet:")
    return _add_prefix(state, model), SourceLayout(axis=axis)


def _add_prefix(state: State, model: nn.Module) -> State:
    prefix = model_prefix(model)
    return {prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------------------------------- VideoMAE
_HF_VIDEOMAE = [  # transformers VideoMAE names -> timm / original VideoMAE names
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.q_bias", r"blocks.\1.attn.q_bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.v_bias", r"blocks.\1.attn.v_bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.bias", r"blocks.\1.attn.q_bias"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.bias", r"blocks.\1.attn.v_bias"),
    (r"^layernorm\.", "norm."),
]
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight")


def _videomae_file(path: Path) -> Path:
    if path.is_dir():  # a save_pretrained folder
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
    return path


def _from_hf_videomae(state: State) -> State:
    state = strip_prefix(state, "videomae.")
    out: State = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _HF_QKV.fullmatch(key)
        if m:
            qkv.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        new = key
        for pattern, repl in _HF_VIDEOMAE:
            new = re.sub(pattern, repl, new)
        out[new] = value
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def read_videomae(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """VideoMAE weights: the original repository's format (``blocks.N.attn.qkv`` + ``q_bias``/``v_bias``,
    maybe under ``encoder.`` with a decoder) or Hugging Face transformers' (``encoder.layer.N...``)."""
    path = _videomae_file(path)
    state = strip_prefix(read_tensor_file(path), "module.")
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in state):
        state = _from_hf_videomae(state)
    elif any(k.startswith("encoder.patch_embed") for k in state):  # pre-training checkpoint: the encoder
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    _require(path, state, (PATCH_KERNEL,), "VideoMAE", "videomae: expects VideoMAE weights")
    if state[PATCH_KERNEL].ndim != 5:
        raise CheckpointError(f"{path}: {PATCH_KERNEL} is not a 3D tubelet kernel; for images use timm2d:")
    for i in sorted({int(k.split(".")[1]) for k in state if k.endswith(".attn.q_bias")}):
        q, v = state.pop(f"blocks.{i}.attn.q_bias"), state.pop(f"blocks.{i}.attn.v_bias")
        state[f"blocks.{i}.attn.qkv.bias"] = qkv_bias_from_qv(q, v)
    if axis:  # the tubelet's time axis goes to the named spatial axis
        state[PATCH_KERNEL] = state[PATCH_KERNEL].movedim(2, 2 + axis)
    return state, SourceLayout(axis=axis)  # VideoMAE's sin-cos table is not in its state dict


# ---------------------------------------------------------------------------------------- MedicalNet
def read_medicalnet(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """MedicalNet 3D ResNets (``{"state_dict": {"module.conv1.weight": ...}}``) into MONAI's ResNet names."""
    state = strip_prefix(read_tensor_file(path), "module.")
    _require(
        path,
        state,
        ("conv1.weight", "layer1.0.conv1.weight"),
        "MedicalNet ResNet",
        "medicalnet: expects a MedicalNet 3D ResNet (resnet_10/18/34/50 .pth)",
    )
    if state["conv1.weight"].ndim != 5:
        raise CheckpointError(f"{path}: conv1.weight is 2D, not MedicalNet's 3D ResNet; ImageNet: timm2d:")
    if _is_vit(model):
        raise CheckpointError(f"{path}: MedicalNet weights are a ResNet and cannot initialise a ViT")
    return _add_prefix(state, model), SourceLayout(axis=axis)


# ---------------------------------------------------------------------------------------- our own
def _export_layout(meta: Mapping) -> SourceLayout:
    kwargs = meta.get("arch", {}).get("kwargs", {})
    if "img_size" not in kwargs:
        return SourceLayout()
    img = kwargs["img_size"]
    patch = kwargs.get("patch_size", 16)
    img = (img,) * 3 if isinstance(img, int) else tuple(img)
    patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    grid = tuple(i // p for i, p in zip(img, patch))
    return SourceLayout(pos_grid=grid, num_prefix=1 if kwargs.get("class_token", True) else 0)


def read_own_export(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """Our safetensors export (``common.checkpoint.export_backbone``)."""
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: an init path without a prefix must be our .safetensors export; name foreign weights "
            "with timm2d:, videomae:, medicalnet: or deepspeed:"
        )
    state, meta = checkpoint.read_export(path)
    own = getattr(model, "arch", None) or {}
    src_name = meta["arch"]["name"]
    if own.get("name") and _family(own["name"]) != _family(src_name):
        raise CheckpointError(f"{path}: export is a {src_name}, the model a {own['name']}: different kinds")
    return state, _export_layout(meta)


def _family(name: str) -> str:
    return re.sub(r"[_\d].*$", "", name)  # vit_small_p16 -> vit, resnet18 -> resnet


def read_deepspeed(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """A DeepSpeed checkpoint folder (``OUT/checkpoints`` with ``latest``, or one tag folder inside it), read
    by ``common.deepspeed_checkpoint`` (every file checked with ``weights_only`` first, ZeRO shards
    consolidated). The objective's prefix (``encoder.``, ``backbone.`` ...) is found by matching the model's
    key names."""
    state = strip_prefix(deepspeed_checkpoint.read_module_state(path), "module.")
    return _strip_objective_prefix(path, state, model), SourceLayout()


# Preferred when several prefixes match equally well (MoCo keeps a base and a momentum encoder).
_OBJECTIVE_PREFIXES = ("encoder.", "backbone.", "base_encoder.", "student.", "online.", "model.")


def _strip_objective_prefix(path: Path, state: State, model: nn.Module) -> State:
    own = set(model.state_dict())
    candidates = {""} | {k[: i + 1] for k in state for i in [m.start() for m in re.finditer(r"\.", k)][:2]}

    def score(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix) :] in own)

    best = max(score(p) for p in candidates)
    if best == 0:
        raise CheckpointError(
            f"{path}: no parameter of the DeepSpeed checkpoint matches the model under any prefix "
            f"(first keys: {keys_of(state)}); is it a checkpoint of this backbone?"
        )
    ranked = sorted(
        (p for p in candidates if score(p) == best),
        key=lambda p: (_OBJECTIVE_PREFIXES.index(p) if p in _OBJECTIVE_PREFIXES else 99, p),
    )
    prefix = ranked[0]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


READERS: dict[str, Reader] = {
    "timm2d": read_timm2d,
    "videomae": read_videomae,
    "medicalnet": read_medicalnet,
    "deepspeed": read_deepspeed,
    "monai": read_monai,
}
