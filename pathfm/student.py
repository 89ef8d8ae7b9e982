"""The student, built from the config: a ViT backbone, the DINO head (+ an iBOT head of its own), and the projections
feature distillation adds. The trainer wraps it and copies it into its EMA; the benchmark counts its parameters.

    student = build_student(cfg)          # nn.ModuleDict: backbone[, dino_head][, ibot_head][, cls_proj, patch_proj]

Only the heads a loss of the step uses are built (the step plan says which): a head no loss reaches would stay at
its random init, be checkpointed and exported as if trained, and mislead whoever continues or distils from it.
"""

from __future__ import annotations

from torch import nn

from pathfm.config import Config
from pathfm.distill import add_projections, step_plan
from pathfm.heads import DINOHead
from pathfm.vit import ViTArgs, build_vit
from pathfm.weights import load_backbone, load_heads, load_heads_into, read_heads_args, resolve_weights


def vit_args(cfg: Config) -> ViTArgs:
    """The backbone's arguments (model.*), as checkpoints record them (meta.json's vit_args)."""
    model = cfg.model
    return ViTArgs(arch=model.arch, patch_size=model.patch_size, img_size=model.img_size,
                   num_registers=model.num_registers, ffn=model.ffn, layerscale=model.layerscale,
                   drop_path=model.drop_path, drop_path_mode=model.drop_path_mode,
                   drop_path_schedule=model.drop_path_schedule)


def build_student(cfg: Config, plan=None) -> nn.ModuleDict:
    """backbone (ViT) + dino_head (heads targets: the DINO loss) + ibot_head (iBOT with a head of its own) + cls_proj /
    patch_proj (features targets, from a teacher without heads). model.init_weights: the backbone, and the heads an
    export folder holds. plan: the step plan (default: distill.step_plan(cfg))."""
    ssl, plan = cfg.ssl, plan or step_plan(cfg)
    backbone = build_vit(vit_args(cfg))
    if cfg.model.init_weights:
        load_backbone(backbone, resolve_weights(cfg.model.init_weights))
    head = lambda k: DINOHead(backbone.embed_dim, k, ssl.head_hidden, ssl.head_bottleneck, ssl.head_layers)  # noqa: E731
    model = nn.ModuleDict({"backbone": backbone})
    if plan.targets == "heads":
        model["dino_head"] = head(ssl.prototypes)
    if plan.ibot and plan.ibot_head == "ibot_head":
        model["ibot_head"] = head(ssl.ibot_prototypes)
    if init_heads_file(cfg):
        load_heads_into(model, load_heads(cfg.model.init_weights)[0], cfg.model.init_weights)
    add_projections(cfg, model, plan)
    return model


def init_heads_file(cfg: Config) -> bool:
    """model.init_weights is an export (or its weights file) with heads.safetensors beside it, and model.init_heads."""
    return bool(cfg.model.init_weights and cfg.model.init_heads and read_heads_args(cfg.model.init_weights) is not None)
