"""3D Vision Transformer with timm's parameter names, so 2D ImageNet and VideoMAE weights map key-for-key.

Conventions taken from timm's ``VisionTransformer``: class token, qkv bias, pre-norm blocks, LayerNorm eps
1e-6, exact GELU, ``norm`` before token pooling or ``fc_norm`` after average pooling. Attention goes through
``common.attention.scaled_dot_product``, so the backend (sdpa / xformers / math) is a switch, not a code path.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from functools import partial

import torch
import torch.nn as nn
from monai.networks.layers import DropPath
from torch.utils.checkpoint import checkpoint

from common.attention import BACKENDS, scaled_dot_product
from common.errors import ConfigError
from common.models.pos_embed import axis_channels, sincos_3d
from common.models.registry import check_kwargs, register_backbone

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # timm's eps; ViT3D(norm_eps=...) overrides it


def to_3tuple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """An int or a 3-sequence as a (D, H, W) tuple of positive ints."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(f"{name} must be a positive int or three positive ints (D, H, W), got {value!r}")
    return values  # type: ignore[return-value]


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``blocks`` applied in turn to ``x``. With ``checkpointed`` (and autograd recording) each block keeps only its
    input for the backward and recomputes its activations there: one block's activations held instead of all of
    them, for one more forward of each block. The encoder's and MAE's decoder's blocks both run through here."""
    recompute = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


class PatchEmbed3D(nn.Module):
    """A Conv3d whose kernel = stride = patch size, computed as one matmul over the unfolded patches.

    The weight stays the conv's ``proj.weight`` (embed_dim, in_chans, pd, ph, pw), timm's layout, so 2D and video
    imports and I3D inflation apply unchanged; ``forward`` is the conv itself (the reference path).
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, C, gd, gh, gw)."""
        return self.proj(x)

    def tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, N, C) in raster order, or (B, n_keep, C) for the patches ``ids_keep``
        names: the same numbers as ``forward`` (flattened), but only the kept patches are embedded (MAE's
        visible quarter) and the weight gradient is one GEMM instead of a conv3d backward."""
        B, C_in, D, H, W = x.shape
        pd, ph, pw = self.proj.kernel_size
        gd, gh, gw = D // pd, H // ph, W // pw
        x = x.reshape(B, C_in, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(B, gd * gh * gw, C_in * pd * ph * pw)  # (B, N, C_in·pd·ph·pw): the kernel's order
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, n_keep, ·)
        return nn.functional.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention; ``backend`` picks the kernel (see ``common.attention``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop  # a probability: the kernels apply it, and only in training
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 x (B, heads, N, head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        x = scaled_dot_product(q, k, v, backend=self.backend, dropout_p=dropout_p)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact erf GELU, as the public ViT weights were trained with
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each residual drop-pathed."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: str = "auto",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViT3D(nn.Module):
    """Vision Transformer on (B, in_chans, D, H, W) volumes with a Conv3d patch embedding.

    Build it through ``common.models.create_backbone`` (which also sets ``arch``); every keyword here can be
    passed there. Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.{i}.attn.qkv`` ...), so 2D and video checkpoints map after inflating the patch kernel.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        global_pool: str = "token",
        fc_norm: bool | None = None,
        pos_embed: str = "sincos",
        drop_path_rate: float = 0.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_backend: str = "auto",
        grad_checkpointing: bool = False,
        norm_eps: float = 1e-6,
    ):
        """
        Args:
            img_size: input volume size, int or (D, H, W); each axis a multiple of the patch size.
            patch_size: Conv3d kernel = stride, int (cubes) or (pd, ph, pw), e.g. (2, 16, 16) tubelets.
            in_chans: input channels (1 for MRI).
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer's width, blocks, heads, MLP
                width ratio and whether qkv has a bias (timm: True).
            class_token: prepend a learnable cls token (timm / ViT); VideoMAE-style models use False + "avg".
            global_pool: "token" (cls token output) or "avg" (mean of patch tokens).
            fc_norm: LayerNorm after pooling instead of before it; None means timm's default (True for "avg").
            pos_embed: "sincos" (fixed 3D sin-cos, not trained) or "learn" (trained, initialised N(0, 0.02)).
            drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
            attn_drop, proj_drop: dropout on attention weights / after projections, active only in training.
            attn_backend: "auto", "sdpa", "math" or "xformers" (see ``common.attention``).
            grad_checkpointing: recompute each block in backward to save activation memory; MAE's decoder
                follows this switch too (``run_blocks``).
            norm_eps: every LayerNorm's eps (timm 1e-6; MONAI's ViT uses 1e-5, so its imports reproduce
                MONAI's features with 1e-5).
        """
        super().__init__()
        self.img_size = to_3tuple(img_size, "img_size")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ConfigError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size} on every axis; "
                "pick an img_size that is a multiple of the patch size (crop or pad the volumes to it)"
            )
        if in_chans < 1 or depth < 1 or num_heads < 1:
            raise ConfigError(f"in_chans, depth and num_heads must be >= 1 (got {in_chans}, {depth}, {num_heads})")
        if embed_dim % num_heads:
            raise ConfigError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; choose a head count that divides it"
            )
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ConfigError("global_pool='token' needs class_token=True; use global_pool='avg' without a cls token")
        if pos_embed not in ("sincos", "learn"):
            raise ConfigError(f"pos_embed must be 'sincos' or 'learn', got {pos_embed!r}")
        if pos_embed == "sincos":
            axis_channels(embed_dim)  # raises if the width cannot hold a 3D sin-cos embedding
        drops = dict(drop_path_rate=drop_path_rate, attn_drop=attn_drop, proj_drop=proj_drop)
        if not all(0.0 <= p < 1.0 for p in drops.values()):
            raise ConfigError(f"drop rates must lie in [0, 1), got {drops}")
        if attn_backend not in BACKENDS:
            raise ConfigError(f"attn_backend must be one of {BACKENDS}, got {attn_backend!r}")
        if not 0.0 < norm_eps < 1.0:
            raise ConfigError(f"norm_eps must lie in (0, 1), got {norm_eps}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.in_chans = in_chans
        self.embed_dim = self.feature_dim = embed_dim
        self.depth = self.num_layers = depth
        self.num_heads = num_heads
        self.num_prefix_tokens = 1 if class_token else 0
        self.norm_eps = norm_eps
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = grad_checkpointing
        # set by create_backbone: the registry name and kwargs that rebuild this model
        self.arch: dict | None = None

        self.patch_embed = PatchEmbed3D(self.patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.num_patches, embed_dim),
            requires_grad=pos_embed == "learn",
        )
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_drop, proj_drop, rate, attn_backend, norm_eps)
            for rate in rates
        )
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self._attn_backend = attn_backend
        self.init_weights()

    def init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch kernel, N(0, 0.02) tokens, fixed sin-cos."""
        if self.pos_embed_type == "sincos":
            emb = sincos_3d(self.embed_dim, self.grid_size, cls_token=self.cls_token is not None)
            self.pos_embed.data.copy_(emb.unsqueeze(0))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- switches ----------------------------------------------------------------------------------------
    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
        self._attn_backend = backend
        for block in self.blocks:
            block.attn.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ---- token path (MAE runs the encoder on visible tokens through this) ---------------------------------
    def patch_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, N, C): patch embedding plus position embedding, no prefix token;
        with ``ids_keep`` (B, n_keep) only those patches, (B, n_keep, C), embedded alone."""
        expected = (self.in_chans, *self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ViT3D expects input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                "resize/crop the volume to img_size or build the model with this img_size"
            )
        pos = self.pos_embed[:, self.num_prefix_tokens :]  # (1, N, C)
        if ids_keep is None:
            return self.patch_embed.tokens(x) + pos
        if ids_keep.ndim != 2 or ids_keep.shape[0] != x.shape[0] or ids_keep.dtype != torch.long:
            raise ValueError(
                f"ids_keep must be a (B={x.shape[0]}, n_keep) long tensor, got {tuple(ids_keep.shape)} {ids_keep.dtype}"
            )
        pos = torch.gather(pos.expand(x.shape[0], -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        return self.patch_embed.tokens(x, ids_keep) + pos  # (B, n_keep, C)

    def forward_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, P + n_keep, C) after blocks and final norm.

        ``ids_keep`` (B, n_keep) long: indices into the N patch tokens to keep (MAE's visible set), in the
        order given; None keeps all N.
        """
        x = self.patch_tokens(x, ids_keep)  # (B, N or n_keep, C): only the kept patches are embedded
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, C)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + n_keep, C)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P + N, C) -> (B, C): cls token or mean of patch tokens, then fc_norm."""
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.fc_norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, D, H, W) -> (B, embed_dim)."""
        return self.pool(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    # ---- optimiser helpers -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (timm: position embedding and cls token)."""
        return {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())

    def layer_id(self, name: str) -> int:
        """Depth of ``name`` for layer-wise lr decay: 0 embeddings, i + 1 block i, depth + 1 the rest."""
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1


VIT_ARGS = frozenset(inspect.signature(ViT3D.__init__).parameters) - {"self"}

# name -> (embed_dim, depth, num_heads): the ViT-Ti/S/B/L widths of Dosovitskiy et al. / DeiT, patch 16
VARIANTS = {
    "vit_tiny_p16": (192, 12, 3),
    "vit_small_p16": (384, 12, 6),
    "vit_base_p16": (768, 12, 12),
    "vit_large_p16": (1024, 24, 16),
}


def _register_variant(name: str, embed_dim: int, depth: int, num_heads: int) -> None:
    signature = inspect.signature(ViT3D.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k not in ("self", "img_size", "in_chans")}
    defaults.update(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads)

    @register_backbone(name, defaults)
    def factory(img_size: int | Sequence[int] = 96, in_chans: int = 1, **kwargs) -> ViT3D:
        check_kwargs(name, kwargs, VIT_ARGS - {"img_size", "in_chans"})
        return ViT3D(img_size=img_size, in_chans=in_chans, **{**defaults, **kwargs})


for _name, _dims in VARIANTS.items():
    _register_variant(_name, *_dims)
