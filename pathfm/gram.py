"""Gram anchoring (DINOv3): a frozen "Gram teacher" whose patch-to-patch similarities the student keeps.

DINOv3 found that in long runs the global (CLS) features keep improving while the dense (patch) features degrade:
patch tokens lose their locality. The remedy is a loss between the student's and an
earlier model's Gram matrices of L2-normalised patch tokens, on the global crops (gram_loss below).

    gram = build_gram_teacher(cfg, env)                   # None when gram.weight is 0; frozen, wrapped like the student
    ... at the top of each step:
    if snapshot_due(cfg.gram, step): copy_backbone(gram, ema)   # anchor=ema at start_step, then the refreshes
    weight = gram_weight(cfg.gram, step)                  # 0 before start_step, ramped after
    target = gram_patches(gram, images, grid)             # (2B, grid^2, D_t) final-norm patch tokens, no gradient
    loss = weight * gram_loss(student_patches, target, cfg.gram.remove_negatives)

The schedule is a pure function of the step, so a resumed run recomputes it (how many refreshes have happened,
whether this step takes one) and the only state is the Gram teacher itself, which the checkpoint holds
(checkpoint.save_checkpoint(gram=...)): between two snapshots it is never written, so it stays bit-identical.

  - anchor=ema: the EMA backbone as it is at the top of step gram.start_step (after start_step updates). Until then
    the Gram teacher holds NaN, so a use before its snapshot cannot go unnoticed (the loss would be NaN).
  - anchor=PATH: a fixed model loaded at start-up (a checkpoint's EMA, an export, a backbone file), e.g. the main
    run for a high-resolution adaptation; any width and patch size, as only the N x N similarities are compared.
  - refresh_every N, max_refreshes M: the EMA is copied in again at the top of steps start_step + k*N, k = 1..M
    (DINOv3's 7B recipe: every 10k iterations, at most 3 times).
  - scale 2: the Gram teacher sees each global crop's region read from the slide at twice the pixels (the loader's
    "gram_crops"); its (2g x 2g) token map is resized to the student's g x g grid, bicubic as DINOv3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pathfm.config import ConfigError


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor, remove_negatives: bool = False) -> torch.Tensor:
    """MSE between each image's patch-to-patch cosine similarities, student vs Gram teacher, in fp32 (autocast off).

    student_patches, teacher_patches (n, N, D_s) and (n, N, D_t): the final-norm patch tokens of n images on the same
    N-token grid (the widths may differ: only the N x N similarities are compared). Each token is L2-normalised, each
    image gives G = X X^T (N, N), and the loss is the mean of (G_s - G_t)^2 over the n * N * N entries.
    remove_negatives: negative similarities are set to 0 in both matrices first (DINOv3's remove_neg). The teacher
    side is a target: pass it without gradient.
    """
    if student_patches.shape[:2] != teacher_patches.shape[:2]:
        raise ValueError(f"gram_loss: student tokens {tuple(student_patches.shape)} and teacher tokens "
                         f"{tuple(teacher_patches.shape)} must have the same images and token grid")
    with torch.autocast(student_patches.device.type, enabled=False):
        s = F.normalize(student_patches.float(), dim=-1)
        t = F.normalize(teacher_patches.float(), dim=-1)
        g_s, g_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)  # (n, N, N)
        if remove_negatives:
            g_s, g_t = g_s.clamp(min=0), g_t.clamp(min=0)
        return (g_s - g_t).pow(2).mean()


def snapshot_steps(g) -> list[int]:
    """The steps at whose top the EMA backbone is copied into the Gram teacher (g: cfg.gram)."""
    first = [g.start_step] if g.anchor == "ema" else []
    refreshes = [g.start_step + k * g.refresh_every for k in range(1, g.max_refreshes + 1)] if g.refresh_every else []
    return first + refreshes


def snapshot_due(g, step: int) -> bool:
    return g.weight > 0 and step in snapshot_steps(g)


def refreshes_done(g, step: int) -> int:
    """Refreshes (snapshots after the first anchor) taken at the top of steps <= step: what a resumed run at `step`
    has behind it once that step's own snapshot, if any, is taken."""
    if not g.refresh_every or step < g.start_step:
        return 0
    return min(g.max_refreshes, (step - g.start_step) // g.refresh_every)


def gram_weight(g, step: int) -> float:
    """The Gram loss weight at `step`: 0 before start_step, then weight * (step - start_step + 1) / ramp_steps until
    it reaches weight (openpath: 3k steps; DINOv3 ramps with a cosine over 1k iterations)."""
    if g.weight == 0 or step < g.start_step:
        return 0.0
    if g.ramp_steps == 0:
        return g.weight
    return g.weight * min(1.0, (step - g.start_step + 1) / g.ramp_steps)


def check_resumable(g, step: int, restored: bool, where) -> None:
    """A checkpoint that holds no Gram teacher (written by a run without Gram anchoring) resumes only while the Gram
    teacher has taken nothing from the EMA yet: a snapshot before `step` is not in it and cannot be rebuilt."""
    taken = [s for s in snapshot_steps(g) if s < step]
    if not restored and taken:
        raise ConfigError(f"config key 'gram.start_step': the checkpoint {where} (step {step}) has no Gram teacher, whose "
                          f"anchor would be the EMA of step {taken[0]}; set gram.start_step >= {step}, or gram.anchor to the "
                          f"checkpoint of step {taken[0]}")


def fine_tiles_from(cfg) -> int | None:
    """The first step whose batch needs tiles read at twice the pixels (gram.scale 2), None when none does."""
    g = cfg.gram
    return g.start_step if g.weight > 0 and g.scale == 2 else None


# ---------------------------------------------------------------- the Gram teacher


def anchor_vit(cfg):
    """(ViT with its weights, or with NaN for anchor=ema, on the CPU; its spec or None): the Gram teacher's backbone."""
    from pathfm.vit import build_vit

    if cfg.gram.anchor == "ema":
        with torch.device("meta"):
            vit = build_vit(_student_args(cfg))
        vit = vit.to_empty(device="cpu")
        with torch.no_grad():
            for t in [*vit.parameters(), *vit.buffers()]:
                if t.is_floating_point():
                    t.fill_(float("nan"))  # filled by the snapshot at start_step; a use before it shows as NaN
        return vit, None
    from pathfm.distill import inspect_teacher
    from pathfm.weights import load_backbone, load_ema_backbone, resolve_weights

    spec = inspect_teacher(cfg.gram.anchor)
    no_hub(spec)
    if spec.kind == "checkpoint":
        vit, _ = load_ema_backbone(spec.source)
    else:
        with torch.device("meta"):
            vit = build_vit(spec.vit_args)
        vit = vit.to_empty(device="cpu")
        load_backbone(vit, resolve_weights(spec.source))
    return vit, spec


def check_anchor(cfg, vit, spec) -> None:
    """One line (ValueError) when the Gram teacher cannot anchor this student."""
    g, c = cfg.gram, cfg.crops
    size = g.scale * c.global_size
    if size % vit.patch_size:
        raise ValueError(f"its patch size {vit.patch_size} does not tile the {size} px input it would see "
                         f"(gram.scale={g.scale} x crops.global_size={c.global_size})")
    if spec is not None and spec.mean is not None and (list(spec.mean), list(spec.std)) != (list(c.mean), list(c.std)):
        raise ValueError(f"it was trained with mean {spec.mean} / std {spec.std}, the crops are normalised with "
                         f"{c.mean} / {c.std}; set crops.mean / crops.std to its values")
    if g.refresh_every and spec is not None and vars(spec.vit_args) != vars(_student_args(cfg)):
        raise ValueError(f"gram.refresh_every copies the EMA into it, but it is a {spec.describe()}, not the student's "
                         f"{cfg.model.arch}/{cfg.model.patch_size}")


def anchor_args(cfg):
    """The Gram teacher's ViTArgs, read without building it: the student's (anchor=ema) or the anchor file's."""
    if cfg.gram.anchor == "ema":
        return _student_args(cfg)
    from pathfm.distill import inspect_teacher

    spec = inspect_teacher(cfg.gram.anchor)
    try:
        no_hub(spec)
    except ValueError as e:
        raise ConfigError(f"config key 'gram.anchor' ({cfg.gram.anchor}): {e}") from None
    return spec.vit_args


def no_hub(spec) -> None:
    """A Gram anchor is a pathfm ViT (its EMA is copied in on refreshes, its tokens read by pathfm's forward): refuse a
    public model folder that timm builds, in one line."""
    if spec.vit_args is None:
        raise ValueError(f"it is a {spec.describe()}, built by timm; a Gram anchor is a pathfm ViT: a run folder, "
                         "checkpoint, export or backbone state dict")


def _student_args(cfg):
    from pathfm.vit import ViTArgs

    m = cfg.model
    return ViTArgs(arch=m.arch, patch_size=m.patch_size, img_size=m.img_size, num_registers=m.num_registers,
                   ffn=m.ffn, layerscale=m.layerscale)


def build_gram_teacher(cfg, env) -> nn.ModuleDict | None:
    """The Gram teacher, {"backbone": ViT} on env.device, frozen (no gradient, eval mode, no optimizer) and wrapped
    like the distillation teacher (FSDP2 per block on several ranks); None when gram.weight is 0."""
    if cfg.gram.weight == 0:
        return None
    from pathfm import dist as pdist
    from pathfm.vit import resolve_attn_backend

    try:
        vit, spec = anchor_vit(cfg)
        check_anchor(cfg, vit, spec)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config key 'gram.anchor' ({cfg.gram.anchor}): {str(e).splitlines()[0]}") from None
    if spec is not None:
        with torch.no_grad():
            vit.mask_token.zero_()  # never used: the Gram teacher sees no masks
    model = nn.ModuleDict({"backbone": vit})
    model.requires_grad_(False)
    model.train(False)
    model = model.to(env.device)
    vit.set_attn_backend(resolve_attn_backend(cfg.model.attn_backend, env.device))
    vit.set_sdpa_kernels(cfg.model.sdpa_kernels)
    pdist.wrap_model(model, env, fsdp=cfg.dist.fsdp, ac="none", compile=cfg.dist.compile, precision=cfg.train.precision,
                     reshard_after_forward=True)  # frozen: its parameters are needed only in its forward
    return model


@torch.no_grad()
def copy_backbone(gram: nn.ModuleDict, ema: nn.ModuleDict) -> None:
    """gram.backbone <- ema.backbone, exactly (a copy, not an EMA step). Under FSDP2 both hold shards of the same
    layout (one per block, the rest at the backbone root); an EMA wrapped with dist.reshard_after_forward=false may
    still hold unsharded parameters after its forward: reshard both first."""
    from torch.distributed.fsdp import FSDPModule

    for m in (gram, ema):
        for mod in m.modules():
            if isinstance(mod, FSDPModule):
                mod.reshard()
    src, dst = ema.backbone.state_dict(), gram.backbone.state_dict()
    if src.keys() != dst.keys():
        raise ValueError("copy_backbone: the Gram teacher and the EMA are different architectures")
    for name, t in dst.items():
        t.copy_(src[name])


def resize_grid(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, h*h, D) patch tokens on an h x h grid -> (n, grid*grid, D), resampled bicubic (DINOv3's Gram teacher
    resize: no antialiasing, corners not aligned); unchanged when h == grid."""
    n, tokens, dim = patches.shape
    h = round(tokens**0.5)
    if h * h != tokens:
        raise ValueError(f"resize_grid: {tokens} tokens are not a square grid")
    if h == grid:
        return patches
    maps = patches.transpose(1, 2).reshape(n, dim, h, h)  # (n, D, h, h)
    maps = F.interpolate(maps.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return maps.flatten(2).transpose(1, 2)  # (n, grid*grid, D)


@torch.no_grad()
def gram_patches(gram: nn.ModuleDict, images: torch.Tensor, grid: int) -> torch.Tensor:
    """The Gram teacher's final-norm patch tokens of images (n, 3, S, S), on the student's grid x grid: (n, grid^2, D_t)."""
    vit = gram.backbone
    tokens = vit.forward_features(images)  # (n, prefix + (S/p)^2, D_t)
    return resize_grid(tokens[:, vit.num_prefix_tokens:], grid)
