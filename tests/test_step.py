"""One real training step through pathfm.train.main, checked against a recomputation from the math.

The loop runs unchanged and writes its checkpoint after the step; the test then rebuilds what the step started from
(the step-0 student and EMA: build_models with the run's seed; the first batch: the same loader) and recomputes the
losses here with plain tensor code written from the definitions (not pathfm.losses). They are compared with what
metrics.jsonl logged and with what train.compute_targets / train.compute_losses return on the same inputs:

    teacher targets  p_t = softmax((h_t(x_t) - c) / T_t), c = 0 at step 0 (or Sinkhorn-Knopp)
    DINO             mean over (teacher global crop t, student crop s != t) of mean_b CE(p_t, softmax(h_s / T_s))
    iBOT             1/n_images sum_i (1/m_i) sum over the m_i masked patches of image i of CE
    KoLeo            sum over the 2 global crops of -mean_i log ||z_i - z_nn(i)||
    KDE              sum over the 2 global crops of mean_i log(1/(B-1) sum_{j!=i} exp(-||z_i - z_j||^2 / 2h^2))
    total            the configured weighted sum

and after the step (from the checkpoint): EMA = m * EMA_0 + (1 - m) * student_1, centre = (1 - cm) * mean teacher
logit. Distinct loss weights and LayerScale 1 (so the CLS token depends on the image) make a swapped weight, a
teacher crop paired with its own student view, or a teacher fed the student's masked crops visible.

A distilled step (distill.teacher: a frozen teacher from a file) differs only in where the targets come from:
the same recomputation, given the teacher module that was written to the file.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pathfm import checkpoint as ckpt
from pathfm.config import load_config
from pathfm.dist import DistEnv

ROOT = Path(__file__).resolve().parents[1]


def step_config(tmp_path, *overrides):
    return load_config("smoke", [
        f"train.output_dir={tmp_path}", "train.name=run", "data.source=random", "data.num_workers=0",
        "model.arch=vit_tiny_d6", "model.drop_path=0", "model.layerscale=1.0", "optim.batch_size=4", "optim.warmup_steps=0",
        "crops.global_size=48", "crops.local_size=16",
        "train.steps=10", "train.stop_after=1", "train.log_every=1", "train.rankme_every=0",
        "ssl.teacher_temp_warmup_steps=4", "ssl.dino_weight=1.0", "ssl.ibot_weight=0.6", "ssl.koleo_weight=0.3",
        *overrides])


def run_one_step(cfg) -> dict:
    """Run main(cfg) for one step; returns what it started from (rebuilt), what it saved, and its logged row of step 1."""
    from pathfm import train
    from pathfm.data.loader import Views, build_loader
    from pathfm.distill import step_plan

    out = train.main(cfg)
    assert out["step"] == 1
    run_dir = Path(out["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {"logged": next(r for r in rows if r.get("step") == 1 and "loss/total" in r), "plan": step_plan(cfg)}
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    seen["student0"], seen["teacher0"], seen["loss_state0"] = train.build_models(cfg, env)  # as the run started
    views = Views(cfg, seen["plan"])
    seen["batch"] = next(iter(build_loader(cfg, None, rank=0, world_size=1, start_step=0, views=views)))
    student, ema, loss_state = train.build_models(cfg, env)
    optimizer, _ = train.build_optimizer(cfg, student, cfg.optim.batch_size)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir / "checkpoints"), student=student, ema=ema, optimizer=optimizer,
                         loss_state=loss_state)
    seen["student1"], seen["teacher1"], seen["loss_state1"] = student, ema, loss_state
    return seen


# --- the math, written out -----------------------------------------------------------------------------------

def sinkhorn(logits, temp, iters=3):
    """Rows -> targets whose columns (prototypes) carry equal mass: alternate column and row normalisation
    of exp(logits / temp), starting from the whole matrix summing to 1; rows sum to 1 at the end."""
    n, k = logits.shape
    q = torch.exp((logits - logits.max()) / temp)  # (n, k)
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True) / k  # every prototype 1/k
        q = q / q.sum(1, keepdim=True) / n  # every row 1/n
    return q * n


def teacher_targets(logits, temp, centering):
    return sinkhorn(logits, temp) if centering == "sinkhorn_knopp" else F.softmax(logits / temp, dim=-1)


def cross_entropy(p, logits, temp):
    """(..., K) targets and student logits -> (...,) CE."""
    return -(p * F.log_softmax(logits / temp, dim=-1)).sum(-1)


def koleo(x):
    z = F.normalize(x, dim=-1)
    d = torch.cdist(z, z) + torch.diag(torch.full((len(z),), float("inf")))  # never your own neighbour
    return -torch.log(d.min(1).values + 1e-8).mean()


def kde(x, h):
    z = F.normalize(x, dim=-1)
    n = len(z)
    total = 0.0
    for i in range(n):
        k = [torch.exp(-(z[i] - z[j]).pow(2).sum() / (2 * h * h)) for j in range(n) if j != i]
        total = total + torch.log(sum(k) / (n - 1))
    return total / n


@torch.no_grad()
def expected(cfg, batch, student, teacher, teacher_temp) -> dict:
    """Every loss term of the first step from the crops, the step-0 student and the teacher that gives targets."""
    s = cfg.ssl
    tiles = batch["tiles"]
    g, loc, masks = tiles["global_crops"], tiles["local_crops"], tiles["masks"]  # crop-major: (2B, ...), (nB, ...)
    B = g.shape[0] // 2
    ibot = s.objective == "dinov2"
    p = student.backbone.num_prefix_tokens

    t_tok = teacher.backbone.forward_features(g)  # the teacher sees the global crops, unmasked
    tp = teacher.backbone.num_prefix_tokens  # a frozen teacher may have registers the student has not
    t_logits = teacher.dino_head(t_tok[:, 0])
    p_t = teacher_targets(t_logits, teacher_temp, s.centering)  # (2B, K)

    s_glob = student.backbone.forward_features(g, masks if ibot else None)
    s_loc = student.backbone.forward_features(loc)
    s_logits = student.dino_head(torch.cat([s_glob[:, 0], s_loc[:, 0]]))  # (n_crops * B, K)
    n_crops = s_logits.shape[0] // B
    pairs = [(t, c) for t in range(2) for c in range(n_crops) if c != t]
    dino = sum(cross_entropy(p_t[t * B:(t + 1) * B], s_logits[c * B:(c + 1) * B], s.student_temp).mean()
               for t, c in pairs) / len(pairs)
    out = {"dino": dino}

    if ibot:
        t_head = teacher.ibot_head if s.ibot_separate_head else teacher.dino_head
        s_head = student.ibot_head if s.ibot_separate_head else student.dino_head
        t_patch = t_head(t_tok[:, tp:][masks])  # (M, K), image by image
        p_patch = teacher_targets(t_patch, teacher_temp, s.centering)
        ce = cross_entropy(p_patch, s_head(s_glob[:, p:][masks]), s.student_temp)  # (M,)
        counts = masks.sum(1).tolist()
        assert sum(counts) > 0 and min(counts) == 0  # some crops are masked, some not: both cases are checked
        per_image, start = [], 0
        for m in counts:
            per_image.append(ce[start:start + m].sum() / m if m else ce.new_zeros(()))
            start += m
        out["ibot"] = sum(per_image) / len(counts)
        out["t_patch_logits"] = t_patch
    cls = s_glob[:, 0]
    if s.koleo_weight:
        out["koleo"] = koleo(cls[:B]) + koleo(cls[B:])
    if s.kde_weight:
        out["kde"] = kde(cls[:B], s.kde_bandwidth) + kde(cls[B:], s.kde_bandwidth)
    out["total"] = sum(getattr(s, f"{k}_weight") * out[k] for k in ("dino", "ibot", "koleo", "kde") if k in out)
    out["t_logits"] = t_logits
    return out


def recompute(cfg, seen, teacher=None) -> dict:
    """Check the logged row against the recomputation; teacher: the module that gave targets (default: the
    student's step-0 copy, the EMA teacher). Returns the recomputed values."""
    s, logged = cfg.ssl, seen["logged"]
    # schedules at step 0, from their definitions: the teacher temperature warms up from its start value,
    # the EMA momentum starts at momentum_teacher
    temp = s.teacher_temp_warmup_start if s.teacher_temp_warmup_steps else s.teacher_temp
    assert logged["teacher_temp"] == pytest.approx(temp, abs=1e-9)
    assert logged["teacher_momentum"] == pytest.approx(s.momentum_teacher, abs=1e-9)
    want = expected(cfg, seen["batch"], seen["student0"], teacher or seen["teacher0"], temp)
    names = [k for k in ("dino", "ibot", "koleo", "kde") if k in want]
    assert sorted(k for k in logged if k.startswith("loss/")) == sorted(["loss/total"] + [f"loss/{k}" for k in names])
    for k in names + ["total"]:
        assert logged[f"loss/{k}"] == pytest.approx(float(want[k]), rel=2e-5, abs=1e-6), \
            f"loss/{k}: logged {logged[f'loss/{k}']:.7g}, recomputed {float(want[k]):.7g}"
    # the step's own functions, called on the same inputs, say the same
    got = step_functions(cfg, seen, teacher or seen["teacher0"], temp)
    assert sorted(got) == sorted(names) == sorted(seen["plan"].weights)
    got["total"] = sum(seen["plan"].weights[k] * v for k, v in got.items())
    for k in names + ["total"]:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=2e-5, abs=1e-6), f"compute_losses: {k}"
    return want


@torch.no_grad()
def step_functions(cfg, seen, teacher, teacher_temp) -> dict:
    """train.compute_targets and train.compute_losses on the first batch, from the step-0 models."""
    from pathfm import train
    from pathfm.distill import TeacherInput, inspect_teacher

    plan, tiles = seen["plan"], seen["batch"]["tiles"]
    g, loc, masks = tiles["global_crops"], tiles["local_crops"], tiles["masks"]
    images = TeacherInput(cfg, inspect_teacher(cfg.distill.teacher))(g) if plan.frozen_teacher else g
    targets = train.compute_targets(plan, teacher, images, masks, teacher_temp, seen["loss_state0"])
    return train.compute_losses(plan, seen["student0"], g, loc, masks, targets)


@torch.no_grad()
def check_after_step(cfg, seen, want):
    """Teacher EMA and centre updates of the step, against the saved state."""
    m = cfg.ssl.momentum_teacher
    t0, s1, t1 = (dict(seen[k].named_parameters()) for k in ("teacher0", "student1", "teacher1"))
    err = {name: float((p - (m * t0[name] + (1 - m) * s1[name])).abs().max()) for name, p in t1.items()}
    assert max(err.values()) < 1e-6, max(err, key=err.get)
    if cfg.ssl.centering == "centering":
        cm = cfg.ssl.center_momentum
        centres = seen["loss_state1"]
        torch.testing.assert_close(centres.dino_center.center[0], (1 - cm) * want["t_logits"].mean(0), rtol=1e-4, atol=1e-7)
        if "t_patch_logits" in want:
            torch.testing.assert_close(centres.ibot_center.center[0], (1 - cm) * want["t_patch_logits"].mean(0),
                                       rtol=1e-4, atol=1e-7)


def test_dinov2_step_matches_the_math(tmp_path):
    cfg = step_config(tmp_path)
    seen = run_one_step(cfg)
    want = recompute(cfg, seen)
    check_after_step(cfg, seen, want)


def test_sinkhorn_knopp_separate_ibot_head_and_kde_step_matches_the_math(tmp_path):
    cfg = step_config(tmp_path, "ssl.centering=sinkhorn_knopp", "ssl.ibot_separate_head=true", "ssl.ibot_prototypes=256",
                      "ssl.koleo_weight=0", "ssl.kde_weight=0.2", "ssl.teacher_temp_warmup_steps=0")
    seen = run_one_step(cfg)
    assert "ibot_head" in dict(seen["student0"].named_children())
    want = recompute(cfg, seen)
    check_after_step(cfg, seen, want)


def test_distillation_step_from_a_frozen_teacher_file_matches_the_math(tmp_path):
    """distill.teacher = an export with heads: a 12-block ViT-Ti (LayerScale 1, its own random weights and heads)
    teaches the 6-block student; targets from it, the student's EMA still updated as before."""
    from pathfm.distill import build_heads
    from pathfm.export import save_export, save_heads
    from pathfm.vit import ViTArgs, build_vit

    cfg = step_config(tmp_path, f"distill.teacher={tmp_path / 'teacher'}")
    s = cfg.ssl
    torch.manual_seed(123)
    # built at the 48 px it sees (the student's global crops): the loaded teacher's position embeddings are then used
    # as written (a teacher of another size is resampled once at load: tests/test_distill.py)
    teacher = torch.nn.ModuleDict({"backbone": build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=48,
                                                                 layerscale=1.0))})
    args = {"objective": s.objective, "prototypes": s.prototypes, "head_hidden": s.head_hidden,
            "head_bottleneck": s.head_bottleneck, "head_layers": s.head_layers,
            "ibot_separate_head": s.ibot_separate_head, "ibot_prototypes": s.ibot_prototypes}
    teacher.update(build_heads(192, args))
    teacher.eval()
    save_export(teacher.backbone, tmp_path / "teacher", mean=cfg.crops.mean, std=cfg.crops.std)
    heads = {f"{name}.{k}": v for name in ("dino_head",) for k, v in teacher[name].state_dict().items()}
    save_heads(tmp_path / "teacher", heads, args | {"in_dim": 192})

    seen = run_one_step(cfg)
    want = recompute(cfg, seen, teacher=teacher)
    # the targets did come from the file: the student's own step-0 EMA would give other losses
    own = expected(cfg, seen["batch"], seen["student0"], seen["teacher0"], s.teacher_temp_warmup_start)
    assert abs(float(own["dino"]) - float(want["dino"])) > 1e-2
    check_after_step(cfg, seen, want)


def _sinkhorn_targets_of_this_rank(rank, world, cfg):
    """compute_targets on this rank's share of 8 images (ranks hold 8 / world each), Sinkhorn-Knopp centring."""
    from pathfm import dist as pdist
    from pathfm import train
    from pathfm.plan import make_plan

    env = pdist.init_distributed()
    model, images, masks, loss_state = sinkhorn_inputs(cfg)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    targets = train.compute_targets(make_plan(cfg), model, images[share], masks[share], 0.07, loss_state)
    pdist.teardown()
    return targets.patch_probs, targets.cls_probs


def sinkhorn_inputs(cfg):
    from pathfm import train

    torch.manual_seed(0)
    model = train.build_student(cfg).eval()
    images = torch.randn(8, 3, 32, 32)
    masks = torch.zeros(8, 4, dtype=torch.bool)  # masked patches per image: 0 1 0 4 2 2 1 3 -> uneven per rank
    for image, n in enumerate([0, 1, 0, 4, 2, 2, 1, 3]):
        masks[image, :n] = True
    loss_state = torch.nn.ModuleDict({"dino_center": torch.nn.Identity(), "ibot_center": torch.nn.Identity()})
    return model, images, masks, loss_state


def test_sinkhorn_knopp_targets_on_1_and_4_ranks_equal_the_math_on_the_whole_batch(tmp_path):
    """The step's Sinkhorn-Knopp needs no count of the rows over all ranks (the normalisation by it cancels): iBOT
    targets of 4 ranks holding 1, 4, 4 and 4 masked patches, and of 1 rank holding all, equal the by-hand
    Sinkhorn-Knopp (with its 1 / rows scaling) of the whole batch's masked patches."""
    from tests.ranks import run_ranks

    cfg = step_config(tmp_path, "model.arch=vit_tiny_d6", "crops.global_size=32", "ssl.centering=sinkhorn_knopp",
                      "ssl.prototypes=64", "ssl.head_hidden=32", "ssl.head_bottleneck=16")
    model, images, masks, _ = sinkhorn_inputs(cfg)
    with torch.no_grad():
        tokens = model.backbone.forward_features(images)
        want_patches = sinkhorn(model.dino_head(tokens[:, 1:][masks]), 0.07)
        want_cls = sinkhorn(model.dino_head(tokens[:, 0]), 0.07)
    for world in (1, 4):
        ranks = run_ranks(_sinkhorn_targets_of_this_rank, world, cfg)
        torch.testing.assert_close(torch.cat([r[0] for r in ranks]), want_patches, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.cat([r[1] for r in ranks]), want_cls, rtol=1e-5, atol=1e-7)
