"""Distilled steps recomputed by hand (tests/test_step.py's machinery: one real step through pathfm.train.main, its
logged losses against plain tensor code written from the definitions):

    ibot_patches=all   DINOv2's distillation: the student sees no masks, iBOT scores every patch of the global crops
    features           a teacher without heads: 1 - cos of the projected student CLS of every crop against the
                       teacher's CLS of the other global crop (the DINO pairing), and of every global patch
    /14 teacher        with a /16 student: the teacher sees the global crops resized to 14 px x the student's grid
                       (antialiased bilinear), registers in its prefix, its patch tokens paired with the student's
"""

import pytest
import torch
import torch.nn.functional as F
from test_step import cross_entropy, koleo, run_one_step, step_config, teacher_targets

from pathfm.heads import build_heads
from pathfm.vit import ViTArgs, build_vit


def teacher_file(folder, cfg, args: ViTArgs, heads: bool) -> torch.nn.ModuleDict:
    """A frozen teacher written as a pathfm export (random weights, LayerScale 1), with its DINO head when heads."""
    from pathfm.export import save_export, save_heads

    torch.manual_seed(123)
    teacher = torch.nn.ModuleDict({"backbone": build_vit(args)})
    s = cfg.ssl
    head_args = {"objective": s.objective, "prototypes": s.prototypes, "head_hidden": s.head_hidden,
                 "head_bottleneck": s.head_bottleneck, "head_layers": s.head_layers, "ibot_separate_head": False,
                 "ibot_prototypes": s.ibot_prototypes}
    if heads:
        teacher.update(build_heads(teacher.backbone.embed_dim, head_args))
    teacher.eval()
    save_export(teacher.backbone, folder, mean=cfg.crops.mean, std=cfg.crops.std)
    if heads:
        save_heads(folder, {f"dino_head.{k}": v for k, v in teacher.dino_head.state_dict().items()},
                   head_args | {"in_dim": teacher.backbone.embed_dim})
    return teacher


def cosine_distance(a, b):
    return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()


@torch.no_grad()
def expected(cfg, seen, teacher) -> dict:
    s, d = cfg.ssl, cfg.distill
    tiles = seen["batch"]["tiles"]
    g, loc, masks = tiles["global_crops"], tiles["local_crops"], tiles["masks"]
    B = g.shape[0] // 2
    student = seen["student0"]
    p, tp = student.backbone.num_prefix_tokens, teacher.backbone.num_prefix_tokens
    size = cfg.crops.global_size // cfg.model.patch_size * teacher.backbone.patch_size  # match_grid
    x_t = g if size == g.shape[-1] else F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False,
                                                      antialias=True)
    t_tok = teacher.backbone.forward_features(x_t)  # (2B, tp + N, D_t)
    student_masks = masks if d.ibot_patches == "masked" and s.objective == "dinov2" else None
    s_glob = student.backbone.forward_features(g, student_masks)
    s_loc = student.backbone.forward_features(loc)
    s_cls = torch.cat([s_glob[:, 0], s_loc[:, 0]])  # (n_crops * B, D)
    n_crops = s_cls.shape[0] // B
    pairs = [(t, c) for t in range(2) for c in range(n_crops) if c != t]
    out = {}
    if "dino_head" in teacher:  # heads targets
        temp = s.teacher_temp_warmup_start
        p_t = teacher_targets(teacher.dino_head(t_tok[:, 0]), temp, s.centering)
        s_logits = student.dino_head(s_cls)
        out["dino"] = sum(cross_entropy(p_t[t * B:(t + 1) * B], s_logits[c * B:(c + 1) * B], s.student_temp).mean()
                          for t, c in pairs) / len(pairs)
        # ibot_patches=all: every patch of every global crop, the same count per image, so the per-image mean of
        # the patch CEs averaged over images is the mean over all patches
        p_patch = teacher_targets(teacher.dino_head(t_tok[:, tp:].flatten(0, 1)), temp, s.centering)
        out["ibot"] = cross_entropy(p_patch, student.dino_head(s_glob[:, p:].flatten(0, 1)), s.student_temp).mean()
        weights = {"dino": s.dino_weight, "ibot": s.ibot_weight}
    else:  # features targets, through the student's projections
        proj = student.cls_proj(s_cls)
        out["feat_cls"] = sum(cosine_distance(proj[c * B:(c + 1) * B], t_tok[t * B:(t + 1) * B, 0])
                              for t, c in pairs) / len(pairs)
        out["feat_patch"] = cosine_distance(student.patch_proj(s_glob[:, p:]), t_tok[:, tp:])
        weights = {"feat_cls": d.feature_weight_cls, "feat_patch": d.feature_weight_patch}
    out["koleo"] = koleo(s_glob[:B, 0]) + koleo(s_glob[B:, 0])
    weights["koleo"] = s.koleo_weight
    out["total"] = sum(weights[k] * out[k] for k in weights)
    return out


def check(cfg, seen, want):
    logged = seen["logged"]
    assert sorted(k for k in logged if k.startswith("loss/")) == sorted(f"loss/{k}" for k in want)
    for k, v in want.items():
        assert logged[f"loss/{k}"] == pytest.approx(float(v), rel=2e-5, abs=1e-6), \
            f"loss/{k}: logged {logged[f'loss/{k}']:.7g}, recomputed {float(v):.7g}"


def test_distillation_with_ibot_on_every_patch_matches_the_math(tmp_path):
    cfg = step_config(tmp_path, f"distill.teacher={tmp_path / 'teacher'}", "distill.ibot_patches=all")
    teacher = teacher_file(tmp_path / "teacher", cfg, ViTArgs(arch="vit_tiny", patch_size=16, img_size=48, layerscale=1.0),
                           heads=True)
    seen = run_one_step(cfg)
    assert not seen["batch"]["tiles"]["masks"].any()  # the student sees its global crops unmasked
    check(cfg, seen, expected(cfg, seen, teacher))


def test_feature_distillation_from_a_14px_teacher_with_registers_matches_the_math(tmp_path):
    """A /14 teacher with 4 registers, headless, teaches a /16 student: its input is 42 px (3 x 3 x 14 px), its
    CLS and patch tokens (after 5 prefix tokens) are the targets of the student's projections (1 prefix token)."""
    cfg = step_config(tmp_path, f"distill.teacher={tmp_path / 'teacher'}", "distill.feature_weight_cls=0.7",
                      "distill.feature_weight_patch=1.3")
    teacher = teacher_file(tmp_path / "teacher", cfg, ViTArgs(arch="vit_tiny", patch_size=14, img_size=42,
                                                              num_registers=4, layerscale=1.0), heads=False)
    seen = run_one_step(cfg)
    assert seen["plan"].features and teacher.backbone.num_prefix_tokens == 5
    check(cfg, seen, expected(cfg, seen, teacher))
