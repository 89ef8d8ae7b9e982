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
`set_sdpa_kernels` restricts the sdpa back end to some of PyTorch's kernels (flash, efficient, cudnn, math).

Packing (`forward_features_list(..., packed=True)`): the crops of all sizes become one (1, T, D) sequence
and attention is block-diagonal, so each image attends only to itself. With xformers the mask is implicit
(fast); with sdpa / math it is an explicit (T, T) boolean mask (quadratic in T: for tests and small batches).

Stochastic depth (`ViTArgs.drop_path_mode`), per image, also inside a packed sequence:
  mask      compute the residual branch for every image, zero it for the dropped ones (timm's drop_path)
  subset    compute it only for round((1 - rate) * B) random images and add it back scaled by B / kept
            (DINOv2's trick): the same expectation, and a block at rate r costs (1 - r) of its FLOPs
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# name -> (embed_dim, depth, num_heads, ffn)
ARCHS = {
    "vit_tiny": (192, 12, 3, "mlp"),  # smoke runs and tests
    "vit_tiny_d6": (192, 6, 3, "mlp"),  # half a ViT-Ti (6 blocks): the student of the CPU distillation benchmark
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
    drop_path_mode: str = "mask"  # mask | subset (compute the residual branch only for the kept images)
    drop_path_schedule: str = "linear"  # linear (0 at block 0 to drop_path at the last, DINO / timm) | uniform (DINOv2)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture '{self.arch}'; expected one of {', '.join(ARCHS)}")
        if self.patch_size not in (8, 14, 16):
            raise ValueError(f"patch_size {self.patch_size} not supported; expected 8, 14 or 16")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.drop_path_mode not in ("mask", "subset"):
            raise ValueError(f"drop_path_mode '{self.drop_path_mode}' not supported; expected mask or subset")
        if self.drop_path_schedule not in ("linear", "uniform"):
            raise ValueError(f"drop_path_schedule '{self.drop_path_schedule}' not supported; expected linear or uniform")


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


# PyTorch's SDPA kernels by the names the config uses (model.sdpa_kernels)
SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _sdpa_attention(q, k, v, mask, kernels: list):
    # q, k, v: (B, heads, N, head_dim); mask: None or (N, N) bool, True = may attend
    if not kernels:  # PyTorch picks the fastest kernel that supports these inputs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(kernels):  # fails loudly when none of the listed kernels supports the inputs
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _math_attention(q, k, v, mask=None):
    # q, k, v: (B, heads, N, head_dim)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf"))
    return attn.softmax(dim=-1) @ v


# ---------------------------------------------------------------------------------------------
# packing crops of several sizes into one sequence


@dataclass
class Packing:
    """Where the images sit in a packed (1, T, D) sequence: group g holds B_g images of N_g tokens each,
    image after image, T = sum_g B_g * N_g."""

    groups: list  # [(B_g, N_g), ...]
    bias: object  # keeps images apart in attention: xformers BlockDiagonalMask, or (T, T) bool (True = may attend)
    image_of_token: torch.Tensor  # (T,) long: index of each token's image, 0 .. sum B_g - 1

    @property
    def num_images(self) -> int:
        return sum(b for b, _ in self.groups)


def make_packing(groups: list, xformers: bool, device) -> Packing:
    """Packing for groups [(B_g, N_g), ...]; the block-diagonal mask as xformers' or as an explicit bool matrix."""
    ids, first = [], 0
    for b, n in groups:  # per group, so every shape is known without reading the device (works on meta, no sync)
        ids.append(torch.arange(first, first + b, device=device).repeat_interleave(n))  # (B_g * N_g,)
        first += b
    image_of_token = torch.cat(ids)  # (T,)
    if xformers:
        from xformers.ops import fmha

        bias = fmha.BlockDiagonalMask.from_seqlens([n for b, n in groups for _ in range(b)])
    else:
        bias = image_of_token[:, None] == image_of_token[None, :]  # (T, T)
    return Packing(list(groups), bias, image_of_token)


def pack(tokens: list, xformers: bool) -> tuple[torch.Tensor, Packing]:
    """[(B_g, N_g, D), ...] -> (1, T, D) and its Packing."""
    groups = [tuple(t.shape[:2]) for t in tokens]
    x = torch.cat([t.reshape(1, -1, t.shape[-1]) for t in tokens], dim=1)  # (1, T, D)
    return x, make_packing(groups, xformers, x.device)


def unpack(x: torch.Tensor, packing: Packing) -> list:
    """(1, T, D) -> [(B_g, N_g, D), ...]."""
    parts = x.split([b * n for b, n in packing.groups], dim=1)
    return [p.view(b, n, -1) for p, (b, n) in zip(parts, packing.groups)]


# ---------------------------------------------------------------------------------------------
# stochastic depth, per image


def kept_count(n: int, rate: float) -> int:
    """Images whose residual branch a subset-mode block computes, out of n (at least one)."""
    return max(round((1.0 - rate) * n), 1)


def drop_path(x, rate: float, training: bool):
    """Stochastic depth (mask mode): zero a residual branch for a random subset of samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


def packed_keep_mask(packing: Packing, rate: float, dtype) -> torch.Tensor:
    """Mask mode in a packed sequence: one draw per image, spread over its tokens -> (1, T, 1), already rescaled."""
    keep = torch.rand(packing.num_images, device=packing.image_of_token.device) >= rate  # (images,)
    return (keep.to(dtype) / (1.0 - rate))[packing.image_of_token].view(1, -1, 1)


def add_on_subset(x: torch.Tensor, branch, idx: torch.Tensor) -> torch.Tensor:
    """x + B/k * branch(x) on the k images in idx, x unchanged elsewhere: (B, N, D) -> (B, N, D).

    Every image is in a uniformly drawn idx with probability k/B, so the expectation is x + branch(x).
    """
    out = branch(x[idx], None)  # (k, N, D): the branch runs on the kept images only
    return x.index_add(0, idx, out.to(x.dtype), alpha=x.shape[0] / idx.shape[0])


def packed_subset(packing: Packing, rate: float, xformers: bool) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """Subset mode in a packed sequence: kept_count(B_g) random images of each group.

    Returns the kept tokens' positions (T_k,), their scales B_g / k_g (T_k,), and the Packing of the kept
    images (the branch's attention needs its own block-diagonal mask).
    """
    device = packing.image_of_token.device
    positions, scales, kept, start = [], [], [], 0
    for b, n in packing.groups:
        k = kept_count(b, rate)
        idx = torch.randperm(b, device=device)[:k]  # (k,)
        positions.append((start + idx[:, None] * n + torch.arange(n, device=device)).flatten())  # (k * N_g,)
        scales.append(torch.full((k * n,), b / k, device=device))
        kept.append((k, n))
        start += b * n
    return torch.cat(positions), torch.cat(scales), make_packing(kept, xformers, device)


def resample_pos_grid(patch_pos: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """(1, g*g, D) patch position embeddings on a square grid -> (1, h*w, D), bicubic.

    antialias=True is how weights move between resolutions in timm (resample_abs_pos_embed) and in DINOv2's
    register models and OpenMidnight (interpolate_antialias=True, interpolate_offset=0: the output size given,
    not a scale factor). Shrinking (518 px ViT-g/14 -> 224 px: 37 -> 16) then averages over each output cell's
    footprint, as PIL's bicubic resize does, instead of sampling 16 points of the 37-grid.
    """
    g = math.isqrt(patch_pos.shape[1])
    if g * g != patch_pos.shape[1]:
        raise ValueError(f"position embeddings of {patch_pos.shape[1]} patches are not a square grid")
    if (g, g) == tuple(size):
        return patch_pos
    grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=tuple(size), mode="bicubic", align_corners=False, antialias=antialias)
    return grid.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1).to(patch_pos.dtype)


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
        self.sdpa_kernels = []  # SDPBackend list, set by VisionTransformer.set_sdpa_kernels; [] = PyTorch's choice

    def forward(self, x, attn_bias=None):
        # attn_bias: None, an xformers bias, or a (N, N) bool mask for sdpa / math (a packed sequence)
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, heads, head_dim)
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim): xformers' layout
            x = xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
            if self.backend == "sdpa":
                x = _sdpa_attention(q, k, v, attn_bias, self.sdpa_kernels)
            else:
                x = _math_attention(q, k, v, attn_bias)
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


class Block(nn.Module):
    def __init__(self, dim, num_heads, ffn: str, layerscale: float, drop_path: float, drop_path_mode: str = "mask"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # DINOv2's SwiGLU width: 2/3 of 4x, rounded up to a multiple of 8 (4096 for ViT-g's 1536)
        self.mlp = SwiGLU(dim, (int(4 * dim * 2 / 3) + 7) // 8 * 8) if ffn == "swiglu" else Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim, layerscale) if layerscale > 0 else nn.Identity()
        self.drop_path = drop_path
        self.drop_path_mode = drop_path_mode

    def forward(self, x, packing: Packing | None = None):
        """x: (B, N, D) tokens, a packed (1, T, D) sequence with its Packing, or a list of (B_g, N_g, D).

        A list runs through this block in one call, so FSDP gathers the block's weights once per step,
        not once per crop size.
        """
        if isinstance(x, (list, tuple)):
            return [self._forward(t, None) for t in x]
        return self._forward(x, packing)

    def _attn_branch(self, x, bias):
        return self.ls1(self.attn(self.norm1(x), bias))

    def _mlp_branch(self, x, bias):
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x, packing):
        x = self._residual(x, self._attn_branch, packing)
        return self._residual(x, self._mlp_branch, packing)

    def _residual(self, x, branch, packing):
        """x + branch(x), with stochastic depth over images when training."""
        rate = self.drop_path if self.training else 0.0
        bias = packing.bias if packing is not None else None
        if rate == 0.0:
            return x + branch(x, bias)
        if self.drop_path_mode == "mask":
            if packing is None:
                return x + drop_path(branch(x, None), rate, True)
            return x + branch(x, bias) * packed_keep_mask(packing, rate, x.dtype)
        if packing is None:  # subset
            return add_on_subset(x, branch, torch.randperm(x.shape[0], device=x.device)[: kept_count(x.shape[0], rate)])
        positions, scales, kept = packed_subset(packing, rate, self.attn.backend == "xformers")
        out = branch(x[:, positions], kept.bias) * scales.view(1, -1, 1)  # (1, T_k, D)
        return x.index_add(1, positions, out.to(x.dtype))


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
        if args.drop_path_schedule == "uniform":  # DINOv2's drop_path_uniform
            rates = [args.drop_path] * depth
        else:
            rates = [args.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, args.ffn, args.layerscale, r, args.drop_path_mode) for r in rates)
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

    def set_sdpa_kernels(self, names: list[str]):
        """Restrict the sdpa back end to these PyTorch kernels (flash, efficient, cudnn, math); [] = PyTorch's choice."""
        bad = [n for n in names if n not in SDPA_KERNELS]
        if bad:
            raise ValueError(f"unknown SDPA kernel(s) {bad} in model.sdpa_kernels; expected some of {', '.join(SDPA_KERNELS)}")
        for blk in self.blocks:
            blk.attn.sdpa_kernels = [SDPA_KERNELS[n] for n in names]

    # ------------------------------------------------------------------------------------------

    def pos_embed_for(self, h: int, w: int):
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
        cls_pos, patch_pos = self.pos_embed_for(h, w)
        cls = self.cls_token.expand(B, -1, -1)
        if cls_pos is not None:
            cls = cls + cls_pos
        parts = [cls] + ([self.reg_token.expand(B, -1, -1)] if self.reg_token is not None else []) + [x + patch_pos]
        return torch.cat(parts, dim=1)

    def _run_blocks(self, x, packing=None):
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and i % self.grad_checkpointing == 0:
                # the recompute replays the RNG state, so stochastic depth drops the same images again
                x = checkpoint(blk, x, packing, use_reentrant=False)
            else:
                x = blk(x, packing)
        return x

    def forward_features(self, x, masks=None):
        """(B, 3, H, W) -> normalised tokens (B, 1 + registers + N, D), as timm's forward_features."""
        return self.norm(self._run_blocks(self.prepare_tokens(x, masks)))

    def forward_features_list(self, xs: list, masks: list | None = None, packed: bool | None = None) -> list:
        """Crops of different sizes (2 global + N local) in one call, without padding.

        xs[i]: (B_i, 3, H_i, W_i) -> [(B_i, prefix + N_i, D), ...]. packed=True: all tokens go through the
        blocks as one (1, T, D) sequence with block-diagonal attention (one image attends only to itself);
        False: each size group runs in turn. None: pack when the back end is xformers (whose implicit
        mask makes packing fast); sdpa and math pack with an explicit (T, T) mask, for tests.
        """
        masks = masks if masks is not None else [None] * len(xs)
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        xformers = getattr(self, "attn_backend", "sdpa") == "xformers"
        if packed is None:
            packed = xformers and len(tokens) > 1
        if not packed:
            return [self.norm(t) for t in self._run_blocks(tokens)]
        x, packing = pack(tokens, xformers)  # (1, T, D)
        return unpack(self.norm(self._run_blocks(x, packing)), packing)

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
