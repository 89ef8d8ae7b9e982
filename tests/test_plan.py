"""The step plan (pathfm/plan.py): one answer per config to "which targets, which losses, which masks", and every
reader of it agreeing: the views (the trainer's and the benchmark's), step_flops, and the step itself.

The expected plans are written out here from the method (DINOv2 and its distillation), not from plan.py; the FLOP
check counts a real step (train.compute_targets + train.compute_losses on a tiny model) with
torch.utils.flop_counter and compares it with step_flops for the same plan.
"""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pathfm.config import load_config
from pathfm.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def spec_with_heads(cfg):
    """A teacher spec as distill.inspect_teacher reads it from a file with heads that fit cfg (no file needed)."""
    from pathfm.distill import TeacherSpec
    from pathfm.heads import HEAD_KEYS
    from pathfm.vit import ViTArgs

    heads = {k: getattr(cfg.ssl, k) for k in HEAD_KEYS}
    return TeacherSpec(cfg.distill.teacher, "export", Path("."), ViTArgs(arch="vit_large", patch_size=14), heads, None, None)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_has_a_plan_that_views_and_the_benchmark_follow(name):
    from pathfm.benchmark import step_views

    cfg = load_config(f"configs/{name}")
    s, distilled = cfg.ssl, bool(cfg.distill.teacher)
    plan = make_plan(cfg, spec_with_heads(cfg) if distilled else None)
    dinov2 = s.objective == "dinov2"
    assert plan.targets_from == ("teacher" if distilled else "ema") and plan.targets == "heads"
    assert plan.ibot == (dinov2 and (not distilled or cfg.distill.patch_targets))
    assert plan.mask_crops == (plan.ibot and (not distilled or cfg.distill.ibot_patches == "masked"))
    assert plan.ibot_head == ("ibot_head" if s.ibot_separate_head else "dino_head")
    assert plan.centering == s.centering
    want = {"dino": s.dino_weight, "ibot": s.ibot_weight if plan.ibot else 0, "koleo": s.koleo_weight, "kde": s.kde_weight,
            "gram": cfg.gram.weight}
    assert plan.weights == {k: w for k, w in want.items() if w or k == "dino"}
    # the views the trainer gets: iBOT masks exactly when the plan masks crops (the benchmark's views are these)
    views = step_views(cfg, plan)
    assert views.mask_crops == plan.mask_crops
    out = views(torch.randint(0, 256, (2, 3, cfg.data.tile_size, cfg.data.tile_size), dtype=torch.uint8),
                torch.Generator().manual_seed(0))
    assert out["masks"].shape == (4, (cfg.crops.global_size // cfg.model.patch_size) ** 2)
    assert bool(out["masks"].any()) == (plan.mask_crops and int(4 * s.mask_probability) > 0)


# the distillation modes, and what each step must do: (overrides, targets, ibot, patch features, masked crops, weights)
MODES = {
    "heads": ([], "heads", True, False, True, {"dino", "ibot", "koleo"}),
    "heads-all-patches": (["distill.ibot_patches=all"], "heads", True, False, False, {"dino", "ibot", "koleo"}),
    "heads-separate-ibot-head": (["ssl.ibot_separate_head=true"], "heads", True, False, True, {"dino", "ibot", "koleo"}),
    "heads-separate-all-patches": (["ssl.ibot_separate_head=true", "distill.ibot_patches=all"], "heads", True, False,
                                   False, {"dino", "ibot", "koleo"}),
    "heads-cls-only": (["distill.patch_targets=false"], "heads", False, False, False, {"dino", "koleo"}),
    "heads-dino-objective": (["ssl.objective=dino"], "heads", False, False, False, {"dino", "koleo"}),
    "features": (["distill.loss=features"], "features", False, True, True, {"feat_cls", "feat_patch", "koleo"}),
    "features-all-patches": (["distill.loss=features", "distill.ibot_patches=all"], "features", False, True, False,
                             {"feat_cls", "feat_patch", "koleo"}),
    "features-cls-only": (["distill.loss=features", "distill.patch_targets=false"], "features", False, False, False,
                          {"feat_cls", "koleo"}),
    "features-kde": (["distill.loss=features", "ssl.koleo_weight=0", "ssl.kde_weight=0.2"], "features", False, True,
                     True, {"feat_cls", "feat_patch", "kde"}),
}
SELF = {  # self-distillation: the EMA gives targets
    "dinov2": ([], True, True, {"dino", "ibot", "koleo"}),
    "dinov2-separate-sinkhorn": (["ssl.ibot_separate_head=true", "ssl.centering=sinkhorn_knopp"], True, True,
                                 {"dino", "ibot", "koleo"}),
    "dino": (["ssl.objective=dino", "ssl.koleo_weight=0"], False, False, {"dino"}),
    # distill.* keys mean nothing without a teacher
    "dinov2-distill-keys": (["distill.ibot_patches=all", "distill.patch_targets=false"], True, True,
                            {"dino", "ibot", "koleo"}),
}

TINY = ["data.source=random", "data.num_workers=0", "model.arch=vit_tiny_d6", "model.drop_path=0", "model.img_size=32",
        "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "optim.batch_size=2", "ssl.prototypes=64",
        "ssl.ibot_prototypes=48", "ssl.head_hidden=32", "ssl.head_bottleneck=16", "ssl.mask_probability=1.0",
        "train.rankme_every=0"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teacher files: ViT-Ti/16 exports with shared and with separate iBOT heads, and a backbone-only state dict."""
    from pathfm.export import save_export, save_heads
    from pathfm.heads import HEAD_KEYS, build_heads
    from pathfm.vit import ViTArgs, build_vit

    out, folder = {}, tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    vit = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, layerscale=1.0))
    for separate in (False, True):
        cfg = load_config("smoke", [*TINY, f"ssl.ibot_separate_head={separate}"])
        args = {k: getattr(cfg.ssl, k) for k in HEAD_KEYS}
        heads = build_heads(192, args)
        save_export(vit, folder / f"sep{separate}", mean=cfg.crops.mean, std=cfg.crops.std)
        save_heads(folder / f"sep{separate}", {f"{n}.{k}": v for n, m in heads.items() for k, v in m.state_dict().items()},
                   args | {"in_dim": 192})
        out[separate] = folder / f"sep{separate}"
    torch.save(vit.state_dict(), folder / "backbone.pth")
    out["backbone"] = folder / "backbone.pth"
    return out


def tiny_config(overrides, teacher=None):
    return load_config("smoke", [*TINY, *overrides, *([f"distill.teacher={teacher}"] if teacher else [])])


def loss_matmul_flops(cfg, plan, B: int) -> int:
    """FLOPs of the matmuls inside the losses (step_flops counts the models only): the DINO loss's einsum over
    (teacher crop, student crop) pairs, and KoLeo's / KDE's B x B similarities of each global crop's CLS tokens."""
    n_crops, K, D = 2 + cfg.crops.n_local, cfg.ssl.prototypes, 192
    flops = 2 * 2 * n_crops * B * K if "dino" in plan.weights else 0
    return flops + sum(2 * 2 * B * B * D for k in ("koleo", "kde") if k in plan.weights)


def recorded_step(cfg, plan):
    """FLOPs of a real step on the tiny model: (teacher forward, student forward incl. losses, scored patches)."""
    import copy

    from pathfm import train
    from pathfm.data.loader import Views
    from pathfm.dist import DistEnv
    from pathfm.distill import TeacherInput, load_teacher
    from pathfm.losses import Centering

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    torch.manual_seed(0)
    student = train.build_student(cfg)
    ema = copy.deepcopy(student).eval()
    loss_state = torch.nn.ModuleDict({"dino_center": Centering(cfg.ssl.prototypes),
                                      "ibot_center": Centering(cfg.ssl.ibot_prototypes if cfg.ssl.ibot_separate_head
                                                               else cfg.ssl.prototypes)})
    crops = Views(cfg, plan)(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8), torch.Generator().manual_seed(1))
    g, loc, masks = crops["global_crops"], crops["local_crops"], crops["masks"]
    assert bool(masks.any()) == plan.mask_crops  # the views mask exactly when the plan says so
    teacher = load_teacher(cfg, env) if plan.frozen_teacher else None
    for model in (student, ema, teacher):  # attention as plain matmuls: CPU's fused kernel is invisible to the counter
        if model is not None:
            model.backbone.set_attn_backend("math")
    with FlopCounterMode(display=False) as counter:
        if plan.frozen_teacher:
            targets = train.compute_targets(plan, teacher, TeacherInput(cfg, teacher.spec)(g), masks, 0.04, loss_state)
        else:
            targets = train.compute_targets(plan, ema, g, masks, 0.04, loss_state)
    teacher_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        losses = train.compute_losses(plan, student, g, loc, masks, targets)
    assert set(losses) == set(plan.weights)  # exactly the losses the plan weighs
    return teacher_flops, counter.get_total_flops(), int(plan.scored(masks).sum()) if plan.ibot else 0


@pytest.mark.parametrize("mode", MODES)
def test_distillation_modes_plan_views_step_and_flops_agree(mode, teachers):
    from pathfm.distill import inspect_teacher, step_plan
    from pathfm.flops import step_flops

    overrides, targets, ibot, patch_features, mask_crops, losses = MODES[mode]
    separate = "ssl.ibot_separate_head=true" in overrides
    teacher = teachers["backbone"] if "distill.loss=features" in overrides else teachers[separate]
    cfg = tiny_config(overrides, teacher)
    plan = step_plan(cfg)
    assert plan == make_plan(cfg, inspect_teacher(str(teacher)))
    assert (plan.targets_from, plan.targets, plan.ibot, plan.patch_features, plan.mask_crops, set(plan.weights)) == \
        ("teacher", targets, ibot, patch_features, mask_crops, losses)
    assert plan.ibot_patches == cfg.distill.ibot_patches
    t_flops, s_flops, scored = recorded_step(cfg, plan)
    counted = step_flops(cfg, plan, scored=scored)
    assert counted["teacher_forward"] == t_flops
    assert counted["student_forward"] == s_flops - loss_matmul_flops(cfg, plan, cfg.optim.batch_size)


@pytest.mark.parametrize("mode", SELF)
def test_self_distillation_plan_views_step_and_flops_agree(mode):
    from pathfm.flops import step_flops

    overrides, ibot, mask_crops, losses = SELF[mode]
    cfg = tiny_config(overrides)
    plan = make_plan(cfg)
    assert (plan.targets_from, plan.targets, plan.ibot, plan.mask_crops, set(plan.weights)) == \
        ("ema", "heads", ibot, mask_crops, losses)
    t_flops, s_flops, scored = recorded_step(cfg, plan)
    counted = step_flops(cfg, plan, scored=scored)
    assert counted["teacher_forward"] == t_flops
    assert counted["student_forward"] == s_flops - loss_matmul_flops(cfg, plan, cfg.optim.batch_size)


def test_a_plan_needs_the_teacher_exactly_when_the_config_names_one():
    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="distill.teacher"):
        make_plan(cfg, spec_with_heads(cfg))
    cfg = load_config("smoke", ["distill.teacher=somewhere"])
    with pytest.raises(ValueError, match="distill.teacher"):
        make_plan(cfg)
