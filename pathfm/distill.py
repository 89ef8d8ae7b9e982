"""Distillation from a frozen teacher: the teacher file, the pairing check, the frozen model and its input.

    spec = inspect_teacher("runs/vitg14/export")      # what the file holds: architecture, heads, normalisation
    mode = check_pairing(cfg, spec)                    # "heads" | "features", or one line saying why not
    teacher = load_teacher(cfg, env)                   # frozen, eval mode, wrapped like the student (FSDP2)

The step itself is in pathfm/train.py, beside self-distillation: the targets come from this frozen
teacher instead of the student's EMA, and the EMA is still kept (it is the model checkpointed and exported,
as in DINOv2's distillation). A teacher file is one of

  - a pathfm checkpoint (a step folder, checkpoints/last, a checkpoints or run folder): its EMA backbone and
    heads (the "ema" entry; "teacher" in older checkpoints), architecture and normalisation from meta.json;
  - a pathfm export folder (model.json + model.pth, and heads.safetensors when written with heads);
  - a timm- or DINOv2-named ViT state dict (.pth / .safetensors), backbone only: the architecture is read
    from the tensor shapes (width and depth name the arch, patch size, registers, SwiGLU, LayerScale, size);
  - a public model as the Hugging Face hub holds it (`local-dir:PATH`, a folder with config.json +
    model.safetensors, or `hf-hub:ORG/NAME` from the local cache): built by timm with its own layers, registers and
    position-embedding layout, fed with its own mean and std (pretrained_cfg; distill.teacher_mean / _std override).

A teacher is built for the size it sees: its position embeddings are resampled once as it loads (antialiased
bicubic, as timm and DINOv2's register models do), never on each step.

Teachers with heads give DINO (CLS) and iBOT (patch) targets from their own heads (`distill.loss=heads`);
backbone-only teachers give feature targets: the student's CLS and patch tokens, through learned projections
(`cls_proj`, `patch_proj`, part of the student), regress the teacher's by cosine (`distill.loss=features`).
Patch-level targets need equal token grids: the teacher sees the global crops resized to the student's grid
times its own patch size (`distill.teacher_input=match_grid`: a /16 student at 224 px gives a 14 x 14 grid, a /14
teacher then sees 196 px), or the same pixels when the grids already agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pathfm import checkpoint as ckpt
from pathfm import dist as pdist
from pathfm.heads import HEAD_KEYS, build_heads
from pathfm.plan import StepPlan, make_plan
from pathfm import vit
from pathfm.vit import ViTArgs, build_vit, resolve_attn_backend
from pathfm.weights import (HUB_PREFIXES, build_hub_model, hub_folder, hub_pretrained_cfg, hub_weights, load_backbone,
                            load_ema, load_heads, load_heads_into, read_heads_args, read_hub_config, read_state_dict,
                            resolve_weights, weight_shapes)


@dataclass(frozen=True)
class TeacherSpec:
    path: str
    kind: str  # checkpoint | export | state_dict | hub
    source: Path  # the step folder, the export or hub folder, or the weights file
    vit_args: ViTArgs | None  # pathfm's ViT; None for a hub model (timm builds it from hub_config)
    heads: dict | None  # HEAD_KEYS of the heads the file holds; None = backbone only
    mean: list | None  # the normalisation the teacher was trained with (None: unknown, the student's is used)
    std: list | None
    hub_config: dict | None = None  # a hub folder's config.json (architecture, model_args, pretrained_cfg)
    hub_shape: tuple = ()  # a hub model's (width, patch size), from its weights' patch embedding

    @property
    def patch_size(self) -> int:
        return self.vit_args.patch_size if self.vit_args else self.hub_shape[1]

    @property
    def embed_dim(self) -> int:
        return vit.ARCHS[self.vit_args.arch][0] if self.vit_args else self.hub_shape[0]

    @property
    def native_size(self) -> int:
        """The input size its position embeddings are stored for."""
        if self.vit_args:
            return self.vit_args.img_size
        return int((hub_pretrained_cfg(self.hub_config).get("input_size") or (3, 224, 224))[-1])

    def describe(self) -> str:
        name = f"{self.vit_args.arch}/{self.patch_size}" if self.vit_args else self.hub_config["architecture"]
        return f"teacher {name} ({self.embed_dim} wide, {self.kind} '{self.path}')"


def heads_mismatch(heads: dict, ssl) -> str:
    """What keeps heads with these args (HEAD_KEYS) from loading into a student built from ssl; "" when they fit."""
    keys = ["prototypes", "head_hidden", "head_bottleneck", "head_layers"]
    if ssl.objective == "dinov2" and ssl.ibot_separate_head:  # the student has an ibot_head: the file must too
        keys += ["objective", "ibot_separate_head", "ibot_prototypes"]
    return ", ".join(f"ssl.{k} {getattr(ssl, k)} vs the file's {heads[k]}" for k in keys if heads[k] != getattr(ssl, k))


def infer_vit_args(sd: dict, path) -> ViTArgs:
    """The ViTArgs of a timm- or DINOv2-named backbone state dict, from its tensor shapes alone."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise ValueError(f"weights file '{path}' has no patch_embed.proj.weight: not a ViT backbone in timm or DINOv2 names")
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()), default=-1)
    arch = next((name for name, (d, n, _, _) in vit.ARCHS.items() if (d, n) == (dim, depth)), None)
    if arch is None:
        known = ", ".join(f"{n} {d}x{L}" for n, (d, L, _, _) in vit.ARCHS.items())
        raise ValueError(f"weights file '{path}' holds a ViT {dim} wide and {depth} deep, none of pathfm's "
                         f"architectures ({known})")
    regs = sd.get("reg_token", sd.get("register_tokens"))
    n_reg = regs.shape[1] if regs is not None else 0
    fc1 = sd.get("blocks.0.mlp.fc1.weight", sd.get("blocks.0.mlp.w12.weight"))
    ffn = "swiglu" if fc1 is not None and fc1.shape[0] != 4 * dim else "mlp"
    layerscale = 1e-5 if "blocks.0.ls1.gamma" in sd else 0.0  # the value is loaded; only its presence matters
    n = sd["pos_embed"].shape[1] if "pos_embed" in sd else 0
    grid = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)
    return ViTArgs(arch=arch, patch_size=patch, img_size=grid * patch, num_registers=n_reg, ffn=ffn,
                   layerscale=layerscale)


def inspect_teacher(path: str) -> TeacherSpec:
    """What a teacher file holds, read without building the model (cheap: names, shapes, JSON)."""
    if path.startswith(HUB_PREFIXES):
        return inspect_hub(path, path)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"'{path}' does not exist")
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.json").is_file():
        return inspect_hub(path, f"local-dir:{p}")
    if (p.is_dir() and not (p / "model.json").is_file()) or (p.is_file() and p.name == "last"):
        try:
            step_dir = ckpt.resolve_checkpoint(p)
        except FileNotFoundError:
            raise ValueError(f"'{path}' is a folder but neither a pathfm checkpoint (meta.json) nor an export "
                             "(model.json)") from None
        meta = json.loads((step_dir / "meta.json").read_text())
        ssl = meta.get("config", {}).get("ssl", {})
        heads = {k: ssl[k] for k in HEAD_KEYS} if all(k in ssl for k in HEAD_KEYS) else None
        return TeacherSpec(path, "checkpoint", step_dir, ViTArgs(**meta["vit_args"]), heads, meta.get("mean"), meta.get("std"))
    folder = p if p.is_dir() else p.parent
    if (folder / "model.json").is_file() and (p.is_dir() or p.name.startswith("model.")):
        sidecar = json.loads((folder / "model.json").read_text())
        try:
            args = ViTArgs(**sidecar["pathfm_args"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / 'model.json'} is not a pathfm export sidecar ({e})") from None
        return TeacherSpec(path, "export", folder, args, read_heads_args(folder), sidecar.get("mean"), sidecar.get("std"))
    sd = read_state_dict(resolve_weights(p))
    return TeacherSpec(path, "state_dict", p, infer_vit_args(sd, path), None, None, None)


def inspect_hub(path: str, name: str) -> TeacherSpec:
    """A hub folder's teacher spec from config.json and the names and shapes in its weights (no tensor read)."""
    folder = hub_folder(name)
    cfg = read_hub_config(folder, f"'{path}' (config.json)")
    shapes = weight_shapes(hub_weights(folder))
    w = shapes.get("patch_embed.proj.weight", ())
    if len(w) != 4:
        raise ValueError(f"'{path}' holds {cfg['architecture']}, whose weights have no patch_embed.proj.weight: not a ViT")
    if "cls_token" not in shapes:
        raise ValueError(f"'{path}' holds {cfg['architecture']} without a class token; pathfm's targets are a CLS "
                         "token and patch tokens")
    pcfg = hub_pretrained_cfg(cfg)
    return TeacherSpec(path, "hub", folder, None, read_heads_args(folder), pcfg.get("mean"), pcfg.get("std"),
                       hub_config=cfg, hub_shape=(w[0], w[-1]))


def step_plan(cfg) -> StepPlan:
    """The step plan of cfg (pathfm.plan), reading distill.teacher's file when there is one (names and shapes only)."""
    return make_plan(cfg, inspect_teacher(cfg.distill.teacher) if cfg.distill.teacher else None)


def teacher_size(cfg, spec: TeacherSpec) -> int:
    """Side of the teacher's input: the student's grid times the teacher's patch (match_grid), or the crops' own."""
    if cfg.distill.teacher_input == "same":
        return cfg.crops.global_size
    return cfg.crops.global_size // cfg.model.patch_size * spec.patch_size


def check_pairing(cfg, spec: TeacherSpec) -> str:
    """The loss mode, or ValueError: one line naming both models and what differs."""
    m, s = cfg.model, cfg.ssl
    student = f"student {m.arch}/{m.patch_size} ({vit.ARCHS[m.arch][0]} wide)"
    plan, who = make_plan(cfg, spec), f"{student} and {spec.describe()}"
    if plan.targets == "heads":
        if spec.heads is None:
            raise ValueError(f"{who}: distill.loss=heads but the teacher is a backbone without heads; use "
                             "distill.loss=features (or auto), or fit its heads first (README: teachers without heads)")
        t = spec.heads
        diff = []
        if s.prototypes != t["prototypes"]:
            diff.append(f"ssl.prototypes {s.prototypes} vs the teacher's {t['prototypes']}")
        if plan.ibot:
            if t["objective"] != "dinov2":
                diff.append("iBOT targets asked for but the teacher has no iBOT head (ssl.objective=dino); set "
                            "ssl.objective=dino or distill.patch_targets=false")
            elif s.ibot_separate_head != t["ibot_separate_head"]:
                diff.append(f"ssl.ibot_separate_head {s.ibot_separate_head} vs the teacher's {t['ibot_separate_head']}")
            elif s.ibot_separate_head and s.ibot_prototypes != t["ibot_prototypes"]:
                diff.append(f"ssl.ibot_prototypes {s.ibot_prototypes} vs the teacher's {t['ibot_prototypes']}")
        if diff:
            raise ValueError(f"{who} cannot be paired: {'; '.join(diff)} (the student's head scores the teacher's prototypes)")
    if plan.patch_targets:
        g_s = cfg.crops.global_size // m.patch_size
        size = teacher_size(cfg, spec)
        g_t = size // spec.patch_size
        if size % spec.patch_size or g_t != g_s:
            raise ValueError(f"{who} cannot be paired patch by patch: the student's {cfg.crops.global_size} px global "
                             f"crops give a {g_s}x{g_s} token grid, the teacher's {size} px input a "
                             f"{size / spec.patch_size:g}x{size / spec.patch_size:g} grid; use "
                             "distill.teacher_input=match_grid, or distill.patch_targets=false (CLS targets only)")
    return plan.targets


def check_teacher(cfg) -> TeacherSpec:
    """Before any work: the file readable and the pairing possible, else SystemExit with one line."""
    try:
        spec = inspect_teacher(cfg.distill.teacher)
        check_pairing(cfg, spec)
    except (ValueError, OSError) as e:
        raise SystemExit(f"config key 'distill.teacher': {str(e).splitlines()[0]}") from None
    return spec


def teacher_modules(spec: TeacherSpec, size: int, heads: bool, load: bool = True) -> nn.ModuleDict:
    """backbone [+ dino_head, ibot_head] of the teacher file, built for size px inputs: its position embeddings are
    resampled once here, as it loads (antialiased bicubic, as timm and DINOv2's register models load them), so no
    forward resamples them again. load=False: the architecture only, on the meta device (FLOP counts)."""
    where = f"distill.teacher '{spec.path}' (config.json)"
    fixed = {"dynamic_img_size": False}  # timm: one input size, the embeddings resampled at load, not per forward
    with torch.device("meta"):
        if spec.kind == "hub":
            backbone = None if load else build_hub_model(spec.source, where, size, fixed, pretrained=False)
        else:
            backbone = build_vit(spec.vit_args if load else dataclasses.replace(spec.vit_args, img_size=size))
        head_modules = build_heads(spec.embed_dim, spec.heads) if heads else {}
    if not load:
        return nn.ModuleDict({"backbone": backbone, **head_modules})
    if spec.kind == "hub":  # timm reads the weights (strictly) and resamples the position embeddings as it builds
        backbone = build_hub_model(spec.source, where, size, fixed)
    else:
        backbone = backbone.to_empty(device="cpu")
    model = nn.ModuleDict({"backbone": backbone, **nn.ModuleDict(head_modules).to_empty(device="cpu")})
    if spec.kind == "checkpoint":
        load_ema(spec.source, model)
    elif spec.kind != "hub":
        load_backbone(model.backbone, resolve_weights(spec.source))
    if heads and spec.kind != "checkpoint":
        load_heads_into(model, load_heads(spec.source)[0], spec.source)
    if spec.kind != "hub":
        with torch.no_grad():
            model.backbone.mask_token.zero_()  # never used: the teacher sees no masks
        set_input_size(model.backbone, size)
    return model


def set_input_size(backbone: vit.VisionTransformer, size: int) -> None:
    """Resample a pathfm ViT's position embeddings to the grid of size px inputs, once (antialiased bicubic)."""
    grid = size // backbone.patch_size
    n_prefix = 0 if backbone.no_embed_class else 1  # the class token's own position, kept as it is
    pos = backbone.pos_embed.detach()
    if pos.shape[1] - n_prefix != grid * grid:
        patch_pos = vit.resample_pos_grid(pos[:, n_prefix:], (grid, grid), antialias=True)
        backbone.pos_embed = nn.Parameter(torch.cat([pos[:, :n_prefix], patch_pos], dim=1), requires_grad=False)
    backbone.args = dataclasses.replace(backbone.args, img_size=size)


def load_teacher(cfg, env, spec: TeacherSpec | None = None) -> nn.ModuleDict | None:
    """The frozen teacher (backbone [+ dino_head, ibot_head]) on env.device, wrapped like the student; None
    without distill.teacher. Its parameters never change: requires_grad False, eval mode, no optimizer.
    spec: this teacher, built without reading any weights (pathfm.memory's estimate, for a file that is elsewhere)."""
    if not cfg.distill.teacher:
        return None
    weights = spec is None
    spec = spec or inspect_teacher(cfg.distill.teacher)
    mode = check_pairing(cfg, spec)
    if weights and spec.mean is None and not (cfg.distill.teacher_mean and cfg.distill.teacher_std) and env.is_main:
        print(f"WARNING: distill.teacher '{spec.path}' records no mean / std, so it gets the student's "
              f"({list(cfg.crops.mean)}, {list(cfg.crops.std)}); set distill.teacher_mean and distill.teacher_std to "
              "those it was trained with", file=sys.stderr, flush=True)
    model = teacher_modules(spec, teacher_size(cfg, spec), heads=mode == "heads", load=weights)
    if not weights:
        model = model.to_empty(device=env.device)
    model.requires_grad_(False)
    model.train(False)
    model = model.to(env.device)
    if isinstance(model.backbone, vit.VisionTransformer):  # timm's own ViT picks its attention itself
        model.backbone.set_attn_backend(resolve_attn_backend(cfg.model.attn_backend, env.device))
        model.backbone.set_sdpa_kernels(cfg.model.sdpa_kernels)
    pdist.wrap_model(model, env, fsdp=cfg.dist.fsdp, ac="none", compile=cfg.dist.compile, precision=cfg.train.precision,
                     reshard_after_forward=True)  # frozen: its parameters are needed only in its forward
    model.spec, model.mode = spec, mode
    return model


class TeacherInput:
    """Global crops (student normalisation) -> the teacher's input: resized so the token grids match
    (antialiased bilinear when shrinking) and renormalised when the teacher was trained with another mean / std."""

    def __init__(self, cfg, spec: TeacherSpec):
        self.size = teacher_size(cfg, spec)
        mean_s, std_s = torch.tensor(cfg.crops.mean), torch.tensor(cfg.crops.std)
        # distill.teacher_mean / _std, else what the teacher file records, else (with a warning) the student's
        mean_t = torch.tensor(cfg.distill.teacher_mean or spec.mean or cfg.crops.mean)
        std_t = torch.tensor(cfg.distill.teacher_std or spec.std or cfg.crops.std)
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t = x_s * scale + shift
        self.scale, self.shift = (std_s / std_t).view(1, 3, 1, 1), ((mean_s - mean_t) / std_t).view(1, 3, 1, 1)
        self.identity = bool((self.scale == 1).all() and (self.shift == 0).all())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if not self.identity:
            if (self.scale.device, self.scale.dtype) != (x.device, x.dtype):  # once, not a host-to-GPU copy per step
                self.scale, self.shift = self.scale.to(x.device, x.dtype), self.shift.to(x.device, x.dtype)
            x = x * self.scale + self.shift
        return x


def projection(d_in: int, d_out: int) -> nn.Sequential:
    """Student tokens -> the teacher's width, for the feature loss: Linear, GELU, Linear (hidden = teacher width)."""
    proj = nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    for layer in proj[0], proj[2]:
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return proj


def add_projections(cfg, student: nn.ModuleDict, plan: StepPlan | None = None) -> None:
    """The feature loss's projections, built into the student (trained, EMA'd and checkpointed with it). plan: the
    step plan when known (the teacher file is then read only for features targets)."""
    if not cfg.distill.teacher or (plan is not None and not plan.features):
        return
    spec = inspect_teacher(cfg.distill.teacher)
    plan = plan or make_plan(cfg, spec)
    if not plan.features:
        return
    d_s, d_t = student.backbone.embed_dim, spec.embed_dim
    student["cls_proj"] = projection(d_s, d_t)
    if plan.patch_features:
        student["patch_proj"] = projection(d_s, d_t)


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over rows of 1 - cos(x, y)."""
    return (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean()


def feature_cls_loss(s_cls: torch.Tensor, t_cls: torch.Tensor) -> torch.Tensor:
    """Projected student CLS of every crop (n_crops, B, D) vs the teacher's CLS of the 2 global crops (2, B, D),
    paired as the DINO loss pairs them (each global crop against the other, each local crop against both)."""
    total, terms = 0.0, 0
    for it in range(t_cls.shape[0]):
        for iv in range(s_cls.shape[0]):
            if iv == it:
                continue
            total, terms = total + cosine_distance(s_cls[iv], t_cls[it]), terms + 1
    return total / terms
