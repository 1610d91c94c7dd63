"""``monai:PATH``: MONAI ``ViT`` / ``MaskedAutoEncoderViT`` state dicts (BrainIAC and friends) onto ``ViT3D``.

MONAI's layout is ``create_backbone(name, img_size=..., class_token=False, global_pool="avg", fc_norm=False,
pos_embed="learn", norm_eps=1e-5)``: no cls token in the position table, LayerNorm before mean pooling,
LayerNorm eps 1e-5 and (by default) no qkv bias. Built that way and imported, ``forward_features`` is the mean
of MONAI's output tokens. Keys are renamed by one table; the patch embedding of MONAI's ``perceptron``
projection (``Rearrange`` + ``Linear``) is reshaped to our Conv3d kernel here, everything else that needs a
shape change (position grid, patch size) goes through ``common.weights.fit`` like any other source.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from common.errors import CheckpointError
from common.weights.files import read_tensor_file
from common.weights.fit import PATCH_KERNEL, SourceLayout

State = dict[str, torch.Tensor]
MONAI_NORM_EPS = 1e-5  # torch's LayerNorm default, which MONAI's TransformerBlock keeps

_POS = "patch_embedding.position_embeddings"
_CONV = "patch_embedding.patch_embeddings.weight"  # proj_type="conv": (C, c, p1, p2, p3)
_LINEAR = "patch_embedding.patch_embeddings.1.weight"  # proj_type="perceptron": (C, p1*p2*p3*c)

# MONAI names -> ViT3D names. MAE keeps its final norm as the last entry of ``blocks`` (``blocks.L.weight``);
# a plain ViT calls it ``norm``. ``norm_cross_attn`` (unused without cross-attention) and the MAE decoder keep
# their names and are reported unexpected.
_RENAMES = [
    (r"^patch_embedding\.patch_embeddings\.(1\.)?(weight|bias)$", r"patch_embed.proj.\2"),
    (r"^patch_embedding\.position_embeddings$", "pos_embed"),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.mlp\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.linear2\.", r"blocks.\1.mlp.fc2."),
]
_SPLIT_QKV = re.compile(r"blocks\.(\d+)\.attn\.to_([qkv])\.(weight|bias)")  # use_combined_linear=False
_MAE_NORM = re.compile(r"blocks\.(\d+)\.(weight|bias)")

_CONVERT = (
    "python -c \"import torch; c = torch.load('{p}', map_location='cpu', weights_only=False); "
    "torch.save(c.get('state_dict', c), '{p}.state_dict.pt')\""
)


def read_monai(path: Path, model: nn.Module, axis: int) -> tuple[State, SourceLayout]:
    """A MONAI ViT / MaskedAutoEncoderViT state dict, plain or wrapped (Lightning ``state_dict`` with a
    ``model.`` / ``backbone.`` ... prefix), renamed to ViT3D's keys."""
    if PATCH_KERNEL not in model.state_dict():
        raise CheckpointError(f"{path}: monai: holds MONAI ViT weights and initialises only a ViT backbone")
    state = _read(path)
    prefix = _find_prefix(path, state)
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    notes = [f"MONAI prefix {prefix!r} stripped"] if prefix else []
    state = _rename(state)
    state[PATCH_KERNEL] = _patch_kernel(path, state, model)
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.attn\.", k))})
    notes += _qkv_bias(state, model, depth)
    num_prefix = 0
    if "cls_token" in state and "pos_embed" in state and getattr(model, "cls_token", None) is not None:
        # MONAI adds no position to its cls token; a zero row keeps that in ViT3D (which adds pos_embed[:, :1])
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        num_prefix = 1
    eps = getattr(model, "norm_eps", None)
    if eps is not None and eps != MONAI_NORM_EPS:
        notes.append(
            f"LayerNorm eps: MONAI {MONAI_NORM_EPS:g}, this model {eps:g} (build with norm_eps={MONAI_NORM_EPS:g} "
            "to reproduce MONAI's features)"
        )
    if getattr(model, "global_pool", "avg") != "avg" or "fc_norm.weight" in model.state_dict():
        notes.append(
            "MONAI's layout is norm then mean of tokens: build with class_token=False, global_pool='avg', "
            "fc_norm=False to reproduce its features"
        )
    return state, SourceLayout(num_prefix=num_prefix, axis=axis, notes=notes)


def _read(path: Path) -> State:
    """Tensors of the file, never by full unpickling; a pickle that needs code gets the conversion command."""
    try:
        return read_tensor_file(path)
    except CheckpointError as e:
        if not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        raise CheckpointError(
            f"{e} Only if you trust the file, convert it once with: {_CONVERT.format(p=path)} "
            "and import the .state_dict.pt with monai:"
        ) from e


def _find_prefix(path: Path, state: State) -> str:
    """What precedes MONAI's patch embedding in the key names ('' for a plain state dict)."""
    found = sorted({k[: -len(name)] for k in state for name in (_POS, _CONV, _LINEAR) if k.endswith(name)})
    if not found:
        raise CheckpointError(
            f"{path}: not a MONAI ViT checkpoint — no key ends with {_CONV} or {_POS} "
            f"(first keys: {', '.join(list(state)[:8])}); monai: expects monai.networks.nets.ViT or "
            "MaskedAutoEncoderViT weights"
        )
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds several MONAI ViTs (key prefixes {found}); save the one to import on its own "
            "(its state_dict with the prefix removed)"
        )
    return found[0]


def _rename(state: State) -> State:
    out: State = {}
    split: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    mae_norms = [int(m.group(1)) for k in state if (m := _MAE_NORM.fullmatch(k))]
    for key, value in state.items():
        m = _SPLIT_QKV.fullmatch(key)
        if m:
            split.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        m = _MAE_NORM.fullmatch(key)
        if m and int(m.group(1)) == max(mae_norms):  # MAE: Sequential(*blocks, LayerNorm)
            out[f"norm.{m.group(2)}"] = value
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for (block, kind), parts in split.items():
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _patch_kernel(path: Path, state: State, model: nn.Module) -> torch.Tensor:
    """(C, c, p1, p2, p3) from either projection. The perceptron's Rearrange is
    ``b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)``: its Linear is a Conv3d kernel with c last."""
    if PATCH_KERNEL not in state:
        raise CheckpointError(f"{path}: MONAI ViT without a patch embedding weight ({_CONV} or {_LINEAR})")
    w = state[PATCH_KERNEL]
    if w.ndim == 5:
        return w
    if w.ndim != 2:
        raise CheckpointError(f"{path}: MONAI patch embedding of shape {tuple(w.shape)} is neither conv nor linear")
    patch = tuple(model.patch_size)
    n = w.shape[1]
    if n % math.prod(patch) == 0:
        c = n // math.prod(patch)
    else:  # another patch size than the model's: a cube with the model's channels (fit resamples it)
        c = model.in_chans
        side = round((n / c) ** (1 / 3))
        if side**3 * c != n:
            raise CheckpointError(
                f"{path}: cannot tell the patch size of the MONAI perceptron embedding {tuple(w.shape)} "
                f"(not {patch} nor a cube with {c} channel(s)); build the ViT with the checkpoint's patch_size"
            )
        patch = (side,) * 3
    return w.reshape(w.shape[0], *patch, c).permute(0, 4, 1, 2, 3).contiguous()  # (C, p1, p2, p3, c) -> (C, c, ...)


def _qkv_bias(state: State, model: nn.Module, depth: int) -> list[str]:
    """MONAI's default qkv has no bias (qkv_bias=False): a model with one gets zeros, which is the same map."""
    own = model.state_dict()
    zeroed = 0
    for i in range(depth):
        key = f"blocks.{i}.attn.qkv.bias"
        if key in own and key not in state and f"blocks.{i}.attn.qkv.weight" in state:
            state[key] = torch.zeros_like(own[key])
            zeroed += 1
    return [f"qkv bias set to zero in {zeroed} blocks (MONAI's qkv has none)"] if zeroed else []


# ---------------------------------------------------------------------------------------- our export -> MONAI
# The way back, for a reader with MONAI but without this package: the model card of a ViT export carries this
# code (common.export), and tests/common/test_export_card.py runs it against ViT3D. MONAI's ViT cannot prepend a
# cls token without its classification head, nor norm after pooling, so the features are computed from its
# modules in ViT3D's order.
_MONAI_SNIPPET = """import json

import torch
from monai.networks.nets import ViT
from safetensors.torch import load_file

folder = "FOLDER"
kw = json.load(open(f"{folder}/config.json"))["arch"]["kwargs"]
vit = ViT(
    in_channels=kw["in_chans"], img_size=kw["img_size"], patch_size=kw["patch_size"], hidden_size=kw["embed_dim"],
    mlp_dim=int(kw["embed_dim"] * kw["mlp_ratio"]), num_layers=kw["depth"], num_heads=kw["num_heads"],
    qkv_bias=kw["qkv_bias"], pos_embed_type="learnable",
)
renames = {"patch_embed.proj.": "patch_embedding.patch_embeddings.", ".attn.proj.": ".attn.out_proj.",
           ".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}
state = {}
for key, value in load_file(f"{folder}/model.safetensors").items():
    for ours, theirs in renames.items():
        key = key.replace(ours, theirs)
    state[key] = value
prefix = int(kw["class_token"])  # pos_embed row 0 is the cls token's position
pos = state.pop("pos_embed")  # (1, prefix + N, C)
cls = state.pop("cls_token") + pos[:, :1] if prefix else None
state["patch_embedding.position_embeddings"] = pos[:, prefix:]
fc_norm = [state.pop(f"fc_norm.{p}", None) for p in ("weight", "bias")]  # LayerNorm after pooling, if any
if "norm.weight" not in state:  # norm after pooling instead of before it
    vit.norm = torch.nn.Identity()
missing, unexpected = vit.load_state_dict(state, strict=False)
assert not unexpected and all(".norm_cross_attn." in k for k in missing), (missing, unexpected)
for module in vit.modules():  # LayerNorm eps as trained (MONAI's own is 1e-5)
    if isinstance(module, torch.nn.LayerNorm):
        module.eps = kw["norm_eps"]
vit.eval()


@torch.no_grad()
def features(volume):  # (B, in_chans, D, H, W) -> (B, embed_dim): the export's forward_features
    x = vit.patch_embedding(volume)  # (B, N, C), positions added
    if cls is not None:
        x = torch.cat([cls.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + N, C)
    for block in vit.blocks:
        x = block(x)
    x = vit.norm(x)
    x = x[:, 0] if kw["global_pool"] == "token" else x[:, prefix:].mean(1)
    if fc_norm[0] is not None:
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], *fc_norm, eps=kw["norm_eps"])
    return x
"""


def monai_load_snippet(folder: str) -> str:
    """Python that loads the ViT export in ``folder`` into MONAI's ``ViT`` (``monai.networks.nets``) and defines
    ``features(volume)``, equal to the export's ``forward_features``: needs torch, safetensors and MONAI only."""
    return _MONAI_SNIPPET.replace("FOLDER", folder)
