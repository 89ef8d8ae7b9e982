"""The DINOv2 vision transformer, with timm's parameter names.

The state dict matches timm's `VisionTransformer` for the same architecture (`cls_token`, `reg_token`,
`pos_embed`, `patch_embed.proj`, `blocks.N.norm1`, `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`,
`blocks.N.mlp.fc1`, ..., `norm`), plus a `mask_token` for iBOT that exports drop. As in timm:
models without registers give the class token a position embedding (DINO v1, timm's classic ViT);
models with registers do not (`no_embed_class`, timm's `*_reg4_dinov2` layout).

Attention back ends, chosen at run time by `resolve_attn_backend`:
  sdpa      torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math kernels)
  xformers  xformers.ops.memory_efficient_attention; used only when xformers imports and runs on the device,
            and then also packs crops of different sizes into one sequence with a block-diagonal mask
  math      softmax(q k^T / sqrt(d)) v written out: the reference the others are tested against
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (embed_dim, depth, num_heads, ffn)
ARCHS = {
    "vit_tiny": (192, 12, 3, "mlp"),  # smoke runs and tests
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


@dataclass
class ViTArgs:
    """Everything needed to rebuild a backbone; stored in checkpoints and export sidecars."""

    arch: str = "vit_small"
    patch_size: int = 16
    img_size: int = 224
    num_registers: int = 0
    ffn: str = "mlp"
    layerscale: float = 1e-5  # 0 = no LayerScale
    drop_path: float = 0.0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture '{self.arch}'; expected one of {', '.join(ARCHS)}")
        if self.patch_size not in (8, 14, 16):
            raise ValueError(f"patch_size {self.patch_size} not supported; expected 8, 14 or 16")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


# ---------------------------------------------------------------------------------------------
# attention back ends


@lru_cache(maxsize=None)
def xformers_works(device_type: str) -> bool:
    """True when xformers imports and its memory-efficient kernel runs on this device type."""
    try:
        import xformers.ops as xops

        q = torch.randn(1, 8, 2, 64, device=device_type, dtype=torch.float16 if device_type == "cuda" else torch.float32)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:
        return False


def resolve_attn_backend(requested: str, device: torch.device | str) -> str:
    device_type = torch.device(device).type
    if requested == "auto":
        return "xformers" if xformers_works(device_type) else "sdpa"
    if requested == "xformers" and not xformers_works(device_type):
        raise RuntimeError(f"attention back end 'xformers' was asked for, but xformers does not run on {device_type} here; use 'sdpa' or 'auto'")
    if requested not in ("sdpa", "xformers", "math"):
        raise ValueError(f"unknown attention back end '{requested}'; expected auto, sdpa, xformers or math")
    return requested


def _math_attention(q, k, v):
    # q, k, v: (B, heads, N, head_dim)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
    return attn.softmax(dim=-1) @ v


# ---------------------------------------------------------------------------------------------
# layers (timm names)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, H, W) -> (B, H/p * W/p, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"  # set by VisionTransformer.set_attn_backend

    def forward(self, x, attn_bias=None):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, heads, head_dim)
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim): xformers' layout
            x = xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
            x = F.scaled_dot_product_attention(q, k, v) if self.backend == "sdpa" else _math_attention(q, k, v)
            x = x.transpose(1, 2)  # (B, N, heads, head_dim)
        return self.proj(x.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """timm's SwiGLUPacked / DINOv2's SwiGLUFFNFused: fc1 packs [x, gate] into one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate: float, training: bool):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn: str, layerscale: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # DINOv2's SwiGLU width: 2/3 of 4x, rounded up to a multiple of 8 (4096 for ViT-g's 1536)
        self.mlp = SwiGLU(dim, (int(4 * dim * 2 / 3) + 7) // 8 * 8) if ffn == "swiglu" else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, attn_bias=None):
        """x: (B, N, D) tokens, or a list of them (crops of several sizes).

        A list runs through this block in one call, so FSDP gathers the block's weights once per step,
        not once per crop size.
        """
        if isinstance(x, (list, tuple)):
            return [self._forward(t, None) for t in x]
        return self._forward(x, attn_bias)

    def _forward(self, x, attn_bias):
        # With a packed sequence (attn_bias given, x is (1, total tokens, D)) stochastic depth would need the
        # sample boundaries; the packed path is used for inference-speed and xformers only, so it skips it.
        rate = self.drop_path if attn_bias is None else 0.0
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), attn_bias)), rate, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), rate, self.training)
        return x


# ---------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    def __init__(self, args: ViTArgs):
        super().__init__()
        self.args = args
        dim, depth, heads, _ = ARCHS[args.arch]
        self.embed_dim, self.depth, self.num_heads = dim, depth, heads
        self.patch_size = args.patch_size
        self.num_registers = args.num_registers
        self.num_prefix_tokens = 1 + args.num_registers
        self.no_embed_class = args.num_registers > 0  # timm's layout for the DINOv2 register models
        grid = args.img_size // args.patch_size

        self.patch_embed = PatchEmbed(args.patch_size, dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.reg_token = nn.Parameter(torch.empty(1, args.num_registers, dim)) if args.num_registers else None
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid + (0 if self.no_embed_class else 1), dim))
        self.mask_token = nn.Parameter(torch.empty(1, dim))
        rates = [args.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, args.ffn, args.layerscale, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = 0
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (also after building on the meta device)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.gamma.fill_(m.init)
        w = self.patch_embed.proj.weight
        nn.init.uniform_(w.view(w.shape[0], -1), -1 / math.sqrt(w[0].numel()), 1 / math.sqrt(w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    # timm's model contract --------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "reg_token", "pos_embed", "mask_token"}

    def set_grad_checkpointing(self, enable: bool | int = True):
        """Recompute blocks in backward: True or 1 = every block, 2 = every second block, 0 = off."""
        self.grad_checkpointing = int(enable)

    def set_attn_backend(self, backend: str):
        for blk in self.blocks:
            blk.attn.backend = backend
        self.attn_backend = backend

    # ------------------------------------------------------------------------------------------

    def _pos_embed_for(self, h: int, w: int):
        """Position embeddings for an (h x w) patch grid, interpolated from the stored grid when needed."""
        pos = self.pos_embed
        cls_pos, patch_pos = (None, pos) if self.no_embed_class else (pos[:, :1], pos[:, 1:])
        n = patch_pos.shape[1]
        g = int(math.sqrt(n))
        if (h, w) != (g, g):
            patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
            patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
            patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return cls_pos, patch_pos

    def prepare_tokens(self, x, masks=None):
        """(B, 3, H, W) images [+ (B, N) bool iBOT masks] -> (B, 1 + registers + N, D) tokens."""
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls_pos, patch_pos = self._pos_embed_for(h, w)
        cls = self.cls_token.expand(B, -1, -1)
        if cls_pos is not None:
            cls = cls + cls_pos
        parts = [cls] + ([self.reg_token.expand(B, -1, -1)] if self.reg_token is not None else []) + [x + patch_pos]
        return torch.cat(parts, dim=1)

    def _run_blocks(self, x, attn_bias=None):
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and i % self.grad_checkpointing == 0:
                x = checkpoint(blk, x, attn_bias, use_reentrant=False)
            else:
                x = blk(x, attn_bias)
        return x

    def forward_features(self, x, masks=None):
        """(B, 3, H, W) -> normalised tokens (B, 1 + registers + N, D), as timm's forward_features."""
        return self.norm(self._run_blocks(self.prepare_tokens(x, masks)))

    def forward_features_list(self, xs: list, masks: list | None = None) -> list:
        """Crops of different sizes (2 global + N local) in one call, without padding.

        xs[i]: (B_i, 3, H_i, W_i). With xformers, all tokens are packed into one sequence and attention
        is block-diagonal (one image attends only to itself); otherwise each size group runs in turn.
        """
        masks = masks if masks is not None else [None] * len(xs)
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        if getattr(self, "attn_backend", "sdpa") == "xformers" and len(tokens) > 1 and not self.training:
            from xformers.ops import fmha

            bias, packed = fmha.BlockDiagonalMask.from_tensor_list(tokens)  # packed: (1, sum B_i N_i, D)
            out = bias.split(self.norm(self._run_blocks(packed, bias)))
            return list(out)
        return [self.norm(t) for t in self._run_blocks(tokens)]

    def forward(self, x):
        """CLS embedding (B, D): what timm's model with num_classes=0 returns."""
        return self.forward_features(x)[:, 0]

    def get_intermediate_layers(self, x, n: int | list = 1, reshape: bool = False, return_prefix_tokens: bool = False, norm: bool = True):
        """Outputs of the last n blocks (or of the blocks listed in n), as DINOv2 and timm offer."""
        wanted = set(range(self.depth - n, self.depth)) if isinstance(n, int) else set(n)
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.prepare_tokens(x)
        result = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i not in wanted:
                continue
            o = self.norm(x) if norm else x
            prefix, patches = o[:, : self.num_prefix_tokens], o[:, self.num_prefix_tokens :]
            if reshape:
                patches = patches.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, D, h, w)
            result.append((patches, prefix) if return_prefix_tokens else patches)
        return tuple(result)


def build_vit(args: ViTArgs, device: torch.device | str | None = None) -> VisionTransformer:
    return VisionTransformer(args).to(device) if device is not None else VisionTransformer(args)
