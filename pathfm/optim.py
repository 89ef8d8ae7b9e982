"""Optimiser parameter groups (layer-wise lr decay, no decay on norms/biases/LayerScale) and schedules.

Groups carry multipliers (lr_mult, wd_mult) rather than values; `set_hparams` writes
the values of the current step into them, so schedules stay plain arrays indexed by step.
"""

import math

import numpy as np
import torch
import torch.nn as nn

# timm ViT parameters that sit before the first block: they get layer id 0. DINO and DINOv2 decay
# them like any weight (only biases, norms and LayerScale gammas are exempt); decay_tokens=False exempts them.
_TOKENS = ("cls_token", "pos_embed", "reg_token", "mask_token")


def _layer_id(name: str, num_layers: int) -> int:
    """0 for tokens and patch embedding, i + 1 for blocks.i, num_layers + 1 for the rest (final norm, heads)."""
    if name.startswith(_TOKENS) or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        block = int(name.split(".")[1])
        if block >= num_layers:
            raise ValueError(f"parameter '{name}' is in block {block} but num_layers={num_layers}; "
                             f"pass the model's depth")
        return block + 1
    return num_layers + 1


def param_groups(model: nn.Module, *, weight_decay: float, layer_decay: float, patch_embed_lr_mult: float,
                 num_layers: int, decay_tokens: bool = True) -> list[dict]:
    """AdamW parameter groups for a ViT (names `backbone.<timm name>` or plain timm names) plus heads.

    lr_mult = layer_decay ** (num_layers + 1 - layer_id): the last block trains at
    layer_decay x the head lr, the patch embedding at layer_decay ** (num_layers + 1),
    and lower, times patch_embed_lr_mult (a pretrained stem is the first thing to
    break). wd_mult = 0 for biases, norms, LayerScale (ndim <= 1), and for the tokens unless decay_tokens.
    The prototype layers (`*.last_layer.weight`) form their own groups so they can be
    frozen. The backbone's parameters (`backbone.*`) never share a group with the heads', so their lr can be scaled
    on its own (the ramp after a head warm-up). Parameters with equal (lr_mult, wd_mult, is_last_layer, is_backbone)
    share one group.
    """
    groups: dict[tuple, dict] = {}
    for full_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the timm name inside the backbone; torch.compile wrappers add `_orig_mod.`
        name = full_name.replace("_orig_mod.", "").removeprefix("backbone.")
        layer_id = _layer_id(name, num_layers)
        lr_mult = layer_decay ** (num_layers + 1 - layer_id)
        if name.startswith("patch_embed."):
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if p.ndim <= 1 or (not decay_tokens and name.startswith(_TOKENS)) else 1.0
        is_last_layer = "last_layer" in name.split(".")
        is_backbone = full_name.replace("_orig_mod.", "").startswith("backbone.")
        key = (lr_mult, wd_mult, is_last_layer, is_backbone)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                           "is_last_layer": is_last_layer, "is_backbone": is_backbone,
                           "weight_decay": weight_decay * wd_mult}
        groups[key]["params"].append(p)
        groups[key]["names"].append(full_name)
    return list(groups.values())


def set_hparams(optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, freeze_last_layer: bool,
                backbone_scale: float = 1.0) -> None:
    """Write this step's lr and weight decay into every group, scaled by its multipliers; the backbone's lr also by
    backbone_scale (backbone_lr_scale: 0 in a head warm-up, then a ramp).

    A frozen prototype layer gets lr 0 (as in DINOv2): AdamW then changes nothing,
    neither the Adam step (scaled by lr) nor the decoupled decay (p *= 1 - lr * wd).
    """
    for i, group in enumerate(optimizer.param_groups):
        missing = [k for k in ("lr_mult", "wd_mult", "is_last_layer") if k not in group]
        if missing:
            raise KeyError(f"optimizer param group {i} has no {missing}: build the optimizer from "
                           f"pathfm.optim.param_groups(...)")
        frozen = freeze_last_layer and group["is_last_layer"]
        group["lr"] = 0.0 if frozen else lr * group["lr_mult"] * (backbone_scale if group.get("is_backbone") else 1.0)
        group["weight_decay"] = weight_decay * group["wd_mult"]


def backbone_lr_scale(step: int, warmup: int, ramp: int) -> float:
    """The backbone's lr factor at step: 0 during a head warm-up of `warmup` steps (no gradient reaches it), then a
    linear ramp over `ramp` steps (1 / ramp at the first step after the warm-up, 1 from step warmup + ramp - 1 on).
    AdamW keeps no moments for the backbone during the warm-up: without the ramp its first update would be a
    full-lr sign step on a pretrained backbone. warmup 0 or ramp 0: always 1."""
    if not warmup:
        return 1.0
    if step < warmup:
        return 0.0
    return min(1.0, (step - warmup + 1) / ramp) if ramp > 0 else 1.0


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Value per step, shape (total_steps,): linear warmup_start -> base over warmup_steps,
    then a half cosine from base (first step after warmup) to final (last step).

    Used for the lr (warmup + cosine to min_lr), the weight decay (cosine, no warmup)
    and the teacher EMA momentum (cosine to 1).
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"cosine_schedule: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                         f"got total_steps={total_steps}, warmup_steps={warmup_steps}")
    warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps) / max(warmup_steps, 1)
    n = total_steps - warmup_steps
    progress = np.arange(n) / max(n - 1, 1)  # 0 .. 1 inclusive, so the last step is exactly `final`
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * progress))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Teacher temperature per step, shape (total_steps,): linear start -> end over warmup_steps, then end.

    A softer teacher (higher temperature) early avoids collapse onto a few prototypes.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"teacher_temp_schedule: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                         f"got total_steps={total_steps}, warmup_steps={warmup_steps}")
    warmup = start + (end - start) * np.arange(warmup_steps) / max(warmup_steps, 1)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, end)])


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int = 1024, rule: str = "sqrt") -> float:
    """lr for global_batch from base_lr tuned at ref_batch: sqrt (DINOv2, for AdamW), linear, or none."""
    ratio = global_batch / ref_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if rule == "linear":
        return base_lr * ratio
    if rule == "none":
        return base_lr
    raise ValueError(f"lr scaling rule '{rule}' is not one of sqrt, linear, none")
