"""DINOv2-style self-supervised training: the loop, top to bottom. Edit it.

    python launch/train.py --config configs/smoke.yaml --local          # one process, this machine
    torchrun --nproc-per-node 8 -m pathfm.train --config configs/vitl14.yaml
    python -m pathfm.train --config configs/smoke.yaml train.steps=20   # overrides: section.key=value

One step: teacher forward on the 2 global crops -> student forward on all crops (global crops with
iBOT masks) -> DINO + iBOT + KoLeo/KDE losses -> backward -> clip -> AdamW step with the schedules
-> teacher EMA -> log. DINO (v1) is `ssl.objective: dino` (no iBOT), DINOv2 is `dinov2`.
The teacher is the student's EMA (self-distillation) or, with `distill.teacher`, a frozen model loaded from a
file (distillation, pathfm/distill.py); the EMA is then still kept, and is what is checkpointed and exported.
`train.head_warmup_steps` holds the backbone (and its EMA) still while fresh heads learn (continued pretraining).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from collections import Counter
import math
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from pathfm import checkpoint as ckpt
from pathfm import dist as pdist
from pathfm import probes as pprobes
from pathfm.config import Config, ConfigError, load_config, to_dict
from pathfm.data.failures import summarise as summarise_read_failures
from pathfm.data.index import summary as index_summary
from pathfm.data.loader import (LoaderFault, Views, batches, build_loader, loader_fault, slide_index, tile_dataset,
                                views_generator)
from pathfm.data.masking import block_masks
from pathfm.data.sampler import FAILURES_TO_DROP
from pathfm.data.slides import SlideError
from pathfm.distill import TeacherInput, cosine_distance, feature_cls_loss, inspect_teacher, load_teacher
from pathfm.export import save_export, save_heads
from pathfm.flops import mfu, peak_flops, step_flops
from pathfm.gram import (build_gram_teacher, check_resumable, copy_backbone, gram_loss, gram_patches, gram_weight,
                         refreshes_done, snapshot_due)
from pathfm.losses import Centering, dino_loss, ibot_loss, kde_loss, koleo_loss, sinkhorn_knopp
from pathfm.metrics import (CollapseWatch, Logger, PlateauWatch, StepTimer, peak_memory_gib, rankme,
                            relative_entropy, spread, student_teacher_kl)
from pathfm.optim import backbone_lr_scale, cosine_schedule, param_groups, scaled_lr, set_hparams, teacher_temp_schedule
from pathfm.plan import StepPlan, make_plan
from pathfm.runfolder import STOPPED_EXIT, check_device, check_inputs, prepare_run_folder, write_status
from pathfm.student import build_student, init_heads_file, vit_args
from pathfm.vit import resolve_attn_backend
from pathfm.weights import checkpoint_heads, load_ema_backbone


def head_warmup_steps(cfg: Config) -> int:
    """train.head_warmup_steps, resolved: -1 (auto) = a tenth of train.steps, at most 2500, when the backbone comes
    from model.init_weights and the heads start random, else 0."""
    if cfg.train.head_warmup_steps >= 0:
        return cfg.train.head_warmup_steps
    return min(cfg.train.steps // 10, 2500) if cfg.model.init_weights and not init_heads_file(cfg) else 0


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM and submitit send before a time limit or preemption)
    set a flag; the loop checkpoints at the end of the step and returns."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class NonFiniteSteps:
    """Steps skipped for a non-finite loss or gradient norm; `max_in_a_row` consecutive ones stop the run
    before anything overwrites the last good checkpoint."""

    def __init__(self, max_in_a_row: int, total: int = 0):
        self.max_in_a_row, self.total, self.run = max_in_a_row, total, 0

    def skipped(self, step: int, problem: str, optimizer, logger) -> bool:
        """True when this step's update is skipped: problem names what was non-finite ("" = nothing, which ends a
        run of skipped steps)."""
        if not problem:
            self.run = 0
            return False
        self.skip(step, problem, optimizer, logger)
        return True

    def skip(self, step: int, what: str, optimizer, logger) -> None:
        self.run, self.total = self.run + 1, self.total + 1
        optimizer.zero_grad(set_to_none=True)
        logger.log(step, {"nonfinite_steps": self.total})
        print(f"step {step}: non-finite {what}; update skipped", file=sys.stderr, flush=True)
        if self.run >= self.max_in_a_row:
            raise FloatingPointError(f"stopping at step {step}: {self.run} consecutive non-finite steps "
                                     f"(last: {what}); the last good checkpoint is untouched")


def clip_gradients(student: nn.ModuleDict, max_norm: float, per_module: bool) -> dict:
    """Clip gradients in place; returns the norms before clipping, {module name: norm} or {"all": norm}.

    per_module, as DINOv2: the backbone and each head are clipped to max_norm on their own, so a
    65k-131k-prototype head's large gradient does not shrink the backbone's step. max_norm 0 measures
    only. Under FSDP2 the gradients are DTensor shards: clip_grad_norm_ clips with the norm over all ranks, but on
    torch 2.6-2.9 it returns that norm as a partial DTensor whose float() is this rank's shard alone (an inf in one
    rank's shard then reads inf there and finite elsewhere, and the ranks disagree on skipping the step). The full
    tensor is the same number on every rank, as in DINOv3.
    """
    limit = max_norm if max_norm > 0 else float("inf")
    parts = dict(student.items()) if per_module else {"all": student}
    norms = {}
    for name, m in parts.items():
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), limit)
        norms[name] = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return norms


@torch.no_grad()
def update_ema(ema: nn.Module, student: nn.Module, momentum: float, skip: tuple = ()) -> None:
    """ema <- momentum * ema + (1 - momentum) * student, parameter by parameter; the submodules named in skip
    (the backbone during a head warm-up) are left as they are.

    Under FSDP2 both hold fp32 DTensor shards and each rank updates its own slice. An EMA wrapped with
    dist.reshard_after_forward=false still holds unsharded parameters after its forward: reshard first,
    so both sides are shards of the same layout.
    """
    for m in (ema, student):
        for mod in m.modules():
            if isinstance(mod, FSDPModule):
                mod.reshard()
    for (name, p_ema), p_s in zip(ema.named_parameters(), student.parameters()):
        if name.split(".")[0] not in skip:
            p_ema.lerp_(p_s.detach(), 1.0 - momentum)


def build_models(cfg: Config, env: pdist.DistEnv, plan: StepPlan | None = None):
    """(student, ema, loss_state): the student and its EMA start equal (and equal on every rank), wrapped for this
    device; the EMA never gets gradients. plan: the step plan (default: read from cfg and the teacher file)."""
    ssl, device = cfg.ssl, env.device
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, plan).to(device)
    ema = copy.deepcopy(student)
    ema.requires_grad_(False)
    ema.train(False)  # no stochastic depth in the EMA
    backend = resolve_attn_backend(cfg.model.attn_backend, device)
    for m in (student, ema):
        m.backbone.set_attn_backend(backend)
        m.backbone.set_sdpa_kernels(cfg.model.sdpa_kernels)
        pdist.wrap_model(m, env, fsdp=cfg.dist.fsdp, ac=cfg.dist.activation_checkpointing if m is student else "none",
                         compile=cfg.dist.compile, precision=cfg.train.precision,
                         reshard_after_forward=cfg.dist.reshard_after_forward)
    torch.manual_seed(cfg.train.seed + env.rank)  # per-rank randomness from here on (stochastic depth)
    loss_state = nn.ModuleDict({"dino_center": Centering(ssl.prototypes, ssl.center_momentum)})
    if ssl.objective == "dinov2":
        loss_state["ibot_center"] = Centering(ssl.ibot_prototypes if ssl.ibot_separate_head else ssl.prototypes,
                                              ssl.center_momentum)
    return student, ema, loss_state.to(device)


def build_optimizer(cfg: Config, student: nn.Module, global_batch: int):
    """AdamW over the parameter groups, and the per-step schedules (lr, weight decay, teacher momentum and temperature)."""
    ssl, opt, steps = cfg.ssl, cfg.optim, cfg.train.steps
    lr_peak = scaled_lr(opt.base_lr, global_batch, opt.lr_ref_batch, opt.lr_scaling)
    groups = param_groups(student, weight_decay=opt.weight_decay, layer_decay=opt.layer_decay,
                          patch_embed_lr_mult=opt.patch_embed_lr_mult, num_layers=student.backbone.depth,
                          decay_tokens=opt.decay_tokens)
    optimizer = torch.optim.AdamW(groups, lr=lr_peak, betas=(opt.beta1, opt.beta2), fused=opt.fused or None)
    schedules = (cosine_schedule(lr_peak, opt.min_lr, steps, min(opt.warmup_steps, steps)),
                 cosine_schedule(opt.weight_decay, opt.weight_decay_final, steps),
                 cosine_schedule(ssl.momentum_teacher, ssl.momentum_teacher_final, steps),
                 teacher_temp_schedule(ssl.teacher_temp_warmup_start, ssl.teacher_temp,
                                       min(ssl.teacher_temp_warmup_steps, steps), steps))
    return optimizer, schedules


def resume(cfg: Config, run_dir: Path, student, ema, optimizer, loss_state, env, gram=None) -> tuple[int, int]:
    """(start step, non-finite steps so far): from the run folder's last checkpoint, else step 0, starting
    from train.init_checkpoint's weights when given. gram: the Gram teacher, restored too when the checkpoint has it."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        if cfg.train.init_checkpoint:
            ckpt.load_weights(cfg.train.init_checkpoint, student=student, ema=ema)
        return 0, 0
    meta = ckpt.load_checkpoint(last, student=student, ema=ema, optimizer=optimizer, loss_state=loss_state, rank=env.rank,
                                gram=gram)
    if gram is not None:  # a checkpoint of a run without Gram anchoring: fine while its anchor is still to be taken
        check_resumable(cfg.gram, meta["step"], meta["gram_restored"], last)
    if env.is_main:
        print(f"resuming from {last} at step {meta['step']}", file=sys.stderr, flush=True)
    return meta["step"], meta.get("nonfinite_total", 0)


@dataclass
class Targets:
    """What the model that gives targets (the EMA or the frozen teacher) makes of the 2 global crops; no gradients."""
    tokens: torch.Tensor  # (2B, prefix + N, D_t): its final-norm tokens
    prefix: int  # its class + register tokens
    cls_logits: torch.Tensor | None = None  # (2B, K) heads targets: its DINO head on the CLS tokens
    cls_probs: torch.Tensor | None = None  # (2B, K) the DINO targets (centred or Sinkhorn-Knopp)
    patch_logits: torch.Tensor | None = None  # (M, K') iBOT with EMA centering (the centre's update): its iBOT head on the M scored patches
    patch_probs: torch.Tensor | None = None  # (M, K') the iBOT targets
    gram: torch.Tensor | None = None  # (2B, N, D_g) Gram anchoring: the Gram teacher's patch tokens on the student's grid


def head_targets(plan: StepPlan, logits: torch.Tensor, temp: float, centre: Centering) -> torch.Tensor:
    """Head logits -> target probabilities: softmax after the EMA centre, or Sinkhorn-Knopp's balanced assignment."""
    return sinkhorn_knopp(logits, temp) if plan.centering == "sinkhorn_knopp" else centre.probs(logits, temp)


@torch.no_grad()
def compute_targets(plan: StepPlan, model: nn.ModuleDict, images: torch.Tensor, masks: torch.Tensor, teacher_temp: float,
                    centres: nn.ModuleDict) -> Targets:
    """The step's targets from `model` (the EMA, or the frozen teacher with images already at its input size): its
    tokens of the 2 global crops, never masked, and with heads targets its DINO and iBOT targets. masks (2B, N): the
    views' iBOT masks; centres: loss_state (read here, updated after the step)."""
    tokens = model.backbone.forward_features(images)  # (2B, prefix + N, D_t)
    out = Targets(tokens, model.backbone.num_prefix_tokens)
    if plan.targets == "heads":
        out.cls_logits = model.dino_head(tokens[:, 0])  # (2B, K)
        out.cls_probs = head_targets(plan, out.cls_logits, teacher_temp, centres.dino_center)
    if plan.ibot:
        patches = tokens[:, out.prefix:][plan.scored(masks)]  # (M, D_t)
        logits = getattr(model, plan.ibot_head)(patches)  # (M, K')
        out.patch_probs = head_targets(plan, logits, teacher_temp, centres.ibot_center)
        # kept only for the EMA centre's update after the step; Sinkhorn-Knopp keeps no state, so they die here
        # instead of living through the student's forward and backward (an (M, K') matrix: gigabytes at 131k)
        out.patch_logits = logits if plan.update_centres else None
    return out


def compute_losses(plan: StepPlan, student: nn.ModuleDict, global_crops: torch.Tensor, local_crops: torch.Tensor,
                   masks: torch.Tensor, targets: Targets, warming_up: bool = False) -> dict:
    """{loss name: value} of the student on all crops against the targets, for exactly the losses in plan.weights.

    The student sees all crops in one call, the global crops (2B, 3, G, G) with their iBOT masks when the plan masks
    them, the local crops (n_local*B, 3, L, L) as they are; crop-major, globals first. warming_up (head warm-up):
    the backbone runs without gradients and only the heads learn."""
    B = global_crops.shape[0] // 2
    n_crops = 2 + local_crops.shape[0] // B
    n_prefix = student.backbone.num_prefix_tokens
    with torch.no_grad() if warming_up else contextlib.nullcontext():
        s_global, s_local = student.backbone.forward_features_list([global_crops, local_crops],
                                                                   [masks if plan.mask_crops else None, None])
    s_cls = torch.cat([s_global[:, 0], s_local[:, 0]])  # (n_crops*B, D): globals first, crop-major
    if plan.features:  # a teacher without heads: the projected student tokens regress the teacher's, by cosine
        s_cls_proj = student.cls_proj(s_cls).view(n_crops, B, -1)
        losses = {"feat_cls": feature_cls_loss(s_cls_proj, targets.tokens[:, 0].view(2, B, -1))}
        if plan.patch_features:  # every patch of the global crops, masked ones included
            losses["feat_patch"] = cosine_distance(student.patch_proj(s_global[:, n_prefix:]),
                                                   targets.tokens[:, targets.prefix:])
    else:
        s_cls_logits = student.dino_head(s_cls)  # (n_crops*B, K)
        losses = {"dino": dino_loss(s_cls_logits.view(n_crops, B, -1), targets.cls_probs.view(2, B, -1), plan.student_temp)}
    if plan.ibot:
        scored = plan.scored(masks)  # (2B, N)
        s_patch_logits = getattr(student, plan.ibot_head)(s_global[:, n_prefix:][scored])  # (M, K')
        losses["ibot"] = ibot_loss(s_patch_logits, targets.patch_probs, scored, plan.student_temp)
    if "koleo" in plan.weights:  # spread the CLS tokens of each global crop over the sphere
        losses["koleo"] = sum(koleo_loss(c) for c in s_global[:, 0].chunk(2))
    if "kde" in plan.weights:
        losses["kde"] = sum(kde_loss(c, plan.kde_bandwidth) for c in s_global[:, 0].chunk(2))
    if targets.gram is not None:  # Gram anchoring: keep the patch-to-patch similarities of an earlier model (gram.py)
        losses["gram"] = gram_loss(s_global[:, n_prefix:], targets.gram, plan.gram_remove_negatives)
    return losses


def memory_step(cfg: Config, env: pdist.DistEnv, tracker, teacher_spec=None, steps: int = 2) -> None:
    """The loop's step for pathfm.memory (an estimate on fake tensors, or a measurement on real ones).

    The models are built and wrapped as main builds them; then `steps` steps on random crops with the views' iBOT
    masks, in the loop's order and through the loop's functions: targets, losses, backward, clip, optimizer step,
    EMA and centres. The tracker's window opens at the last step, once the optimizer state exists. A distillation
    teacher is built without reading its weights (memory does not depend on them): from teacher_spec when given (a
    file that is elsewhere), else from distill.teacher's file. Change this function with the loop.
    """
    c, B = cfg.crops, cfg.optim.batch_size
    teacher_spec = teacher_spec or (inspect_teacher(cfg.distill.teacher) if cfg.distill.teacher else None)
    plan = make_plan(cfg, teacher_spec)
    student, ema, loss_state = build_models(cfg, env, plan)
    teacher = load_teacher(cfg, env, teacher_spec)
    gram = build_gram_teacher(cfg, env)
    optimizer, (_, _, momentum_sched, temp_sched) = build_optimizer(cfg, student, B * env.world_size)
    for name, model in (("student", student), ("EMA", ema), ("teacher", teacher), ("Gram teacher", gram),
                        ("centres", loss_state)):
        if model is not None:
            tracker.label("parameters", [*model.parameters(), *model.buffers()], name)
    views = Views(cfg, plan)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    teacher_input = TeacherInput(cfg, teacher.spec) if teacher is not None else None
    for step in range(steps):
        if step == steps - 1:
            tracker.start_window()
        global_crops = torch.randn(2 * B, 3, c.global_size, c.global_size, device=env.device)  # (2B, 3, G, G)
        local_crops = torch.randn(c.n_local * B, 3, c.local_size, c.local_size, device=env.device)
        with tracker.values():  # the masks decide how many patch rows iBOT scores: real values even in an estimate
            masks = block_masks(2 * B, views.grid, *views.mask_args, torch.Generator().manual_seed(step)) \
                if plan.mask_crops else torch.zeros(2 * B, views.grid**2, dtype=torch.bool)
        masks = masks.to(env.device)
        with autocast:
            with tracker.phase("targets"):
                if plan.frozen_teacher:
                    targets = compute_targets(plan, teacher, teacher_input(global_crops), masks, temp_sched[step], loss_state)
                else:
                    targets = compute_targets(plan, ema, global_crops, masks, temp_sched[step], loss_state)
                if gram is not None:
                    images = torch.randn(2 * B, 3, 2 * c.global_size, 2 * c.global_size, device=env.device) \
                        if plan.gram_scale == 2 else global_crops
                    targets.gram = gram_patches(gram, images, views.grid)
            with tracker.phase("student forward"):
                losses = compute_losses(plan, student, global_crops, local_crops, masks, targets)
        loss = sum(plan.weights[k] * v for k, v in losses.items())
        with tracker.phase("backward"):
            loss.backward()
        tracker.label("gradients", [p.grad for p in student.parameters() if p.grad is not None])
        with tracker.phase("clip"):
            clip_gradients(student, cfg.optim.clip_grad, per_module=cfg.optim.clip_grad_mode == "per_module")
        with tracker.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tracker.label("optimizer state", [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)])
        with tracker.phase("EMA"):
            update_ema(ema, student, momentum_sched[step])
            if plan.update_centres:
                loss_state.dino_center.update(targets.cls_logits)
                if plan.ibot:
                    loss_state.ibot_center.update(targets.patch_logits)


def setup_models(cfg: Config, env: pdist.DistEnv, say):
    """(student, ema, loss_state, teacher, teacher_input, gram, plan) for main. The student and its EMA start equal
    (and equal on every rank); the EMA never gets gradients. The targets come from the EMA (self-distillation) or from
    a frozen teacher (distill.teacher: distillation; teacher_input resizes the global crops to its token grid)."""
    student, ema, loss_state = build_models(cfg, env)
    say(f"models: {cfg.model.arch}/{cfg.model.patch_size}, "
        f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f} M student parameters, {env.world_size} rank(s)")
    teacher = load_teacher(cfg, env)  # None: self-distillation
    plan = make_plan(cfg, teacher.spec if teacher is not None else None)
    teacher_input = None
    if plan.frozen_teacher:
        teacher_input = TeacherInput(cfg, teacher.spec)
        say(f"distilling from the frozen {teacher.spec.describe()}, {plan.targets} targets at {teacher_input.size} px")
        if plan.features and cfg.distill.loss == "auto":
            say("WARNING: the teacher has no heads, so the student regresses its features; fitting its heads first "
                "distilled better (README: teachers without heads): train.head_warmup_steps=N train.steps=N "
                "model.init_weights=TEACHER with the teacher's model.* keys, then distill.teacher=that run")
    gram = build_gram_teacher(cfg, env)  # Gram anchoring (pathfm/gram.py): a frozen backbone; None when gram.weight is 0
    if gram is not None:
        say(f"Gram anchoring: weight {cfg.gram.weight} from step {cfg.gram.start_step}, anchor {cfg.gram.anchor}, "
            f"its input at {cfg.gram.scale}x the global crops' pixels")
    return student, ema, loss_state, teacher, teacher_input, gram, plan


def main(cfg: Config) -> dict:
    check_device(cfg)
    check_inputs(cfg)
    env = pdist.init_distributed(timeout_s=cfg.dist.timeout_s)
    device = env.device
    run_dir, restart_file, resume_changes = prepare_run_folder(cfg, env)
    steps = cfg.train.steps

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if env.is_main else (lambda msg: None)  # phases, once
    # --- data: the slide index, opened (data.index, or built before) or built once, each rank a share of the slides
    index = slide_index(cfg, rank=env.rank, world_size=env.world_size, wait=lambda: pdist.long_barrier(env))
    if index is not None:
        say(index_summary(index))

    # --- models: the student, its EMA, a frozen teacher (distillation) or None, the Gram teacher or None, and the
    # step plan (pathfm/plan.py: which targets, losses, masks and weights), decided here, once
    student, ema, loss_state, teacher, teacher_input, gram, plan = setup_models(cfg, env, say)
    head_warmup = head_warmup_steps(cfg)  # continued pretraining: the backbone and its EMA wait while fresh heads learn
    # then the backbone's lr ramps up from 0: AdamW has no moments for it yet, a full-lr first step would jolt it
    ramp = (max(head_warmup, 1) if cfg.train.backbone_ramp_steps < 0 else cfg.train.backbone_ramp_steps) if head_warmup else 0

    # --- optimizer and schedules (plain arrays indexed by step)
    global_batch = cfg.optim.batch_size * env.world_size
    optimizer, (lr_sched, wd_sched, momentum_sched, temp_sched) = build_optimizer(cfg, student, global_batch)

    # --- resume: automatic when the run folder has a checkpoint; else optionally start from weights
    meta_common = {"vit_args": vars(vit_args(cfg)), "mean": cfg.crops.mean, "std": cfg.crops.std, "config": to_dict(cfg)}
    start_step, nonfinite_total = resume(cfg, run_dir, student, ema, optimizer, loss_state, env, gram)
    if start_step >= steps:
        say(f"run already finished ({start_step} >= train.steps={steps}); nothing to do")
        pdist.teardown()
        return {"run_dir": str(run_dir), "step": start_step, "status": "finished"}

    say(f"training steps {start_step + 1}-{steps}: first batch from {cfg.data.num_workers} loader worker(s)")
    views = Views(cfg, plan)
    loader = build_loader(cfg, index, rank=env.rank, world_size=env.world_size, start_step=start_step, views=views,
                          failures_dir=run_dir / "read_failures")
    heldout = heldout_batch(cfg, index, views, env, loader) if cfg.train.rankme_every else None
    log = RunLog(cfg, env, run_dir, index, plan, start_step, restart_file, resume_changes, say)  # metrics, warnings
    stop = StopSignal()
    probes = pprobes.start_probes(cfg, run_dir, say) if env.is_main else None  # a process beside the run; never waited for
    nonfinite = NonFiniteSteps(cfg.train.max_nonfinite, nonfinite_total)
    status, step, timer = "finished", start_step, log.timer
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def save(step_done):
        meta = {**meta_common, "nonfinite_total": nonfinite.total}
        folder = ckpt.save_checkpoint(run_dir / "checkpoints", step_done, student=student, ema=ema,
                                      optimizer=optimizer, loss_state=loss_state, meta=meta, rank=env.rank,
                                      keep_last=cfg.train.keep_last, hold=pprobes.holds(cfg, step_done), gram=gram)
        say(f"checkpoint saved: {folder} (step {step_done})")
        if probes and (warning := probes.poll()):
            say(f"WARNING: {warning}")

    for batch in batches(loader, failures_dir=run_dir / "read_failures", rank=env.rank, start_step=start_step):
        step = batch["step"]
        log.mpp_mix.update(location[1] for location in batch.get("locations", ()))
        if step >= steps:
            break
        crops = batch_crops(cfg, batch, views, env)
        global_crops, local_crops, masks = crops["global_crops"], crops["local_crops"], crops["masks"]
        timer.lap("data")
        if step == start_step and env.is_main:
            log.logger.images("crops/first_batch", crop_grid(global_crops, local_crops, cfg.crops), step)

        lr, wd, momentum, teacher_temp = lr_sched[step], wd_sched[step], momentum_sched[step], temp_sched[step]
        backbone_scale = backbone_lr_scale(step, head_warmup, ramp)  # 0 in a head warm-up, then a ramp to 1
        set_hparams(optimizer, lr=lr, weight_decay=wd, freeze_last_layer=step < cfg.ssl.freeze_last_layer_steps,
                    backbone_scale=backbone_scale)
        warming_up = step < head_warmup  # head warm-up: the backbone runs without gradients, only the heads learn

        if gram is not None and snapshot_due(cfg.gram, step):  # Gram anchoring: the anchor taken, or refreshed, from the EMA
            copy_backbone(gram, ema)

        # targets (global crops only, unmasked) -> losses of the student on all crops -> their weighted sum
        with autocast:
            if plan.frozen_teacher:  # distillation: its input resized so that its token grid is the student's
                targets = compute_targets(plan, teacher, teacher_input(global_crops), masks, teacher_temp, loss_state)
            else:  # self-distillation: the student's EMA
                targets = compute_targets(plan, ema, global_crops, masks, teacher_temp, loss_state)
            if gram is not None and step >= cfg.gram.start_step:  # the Gram teacher's patch tokens, on the student's grid
                images = crops["gram_crops"] if plan.gram_scale == 2 else global_crops
                targets.gram = gram_patches(gram, images, views.grid)
            losses = compute_losses(plan, student, global_crops, local_crops, masks, targets, warming_up)
        weights = plan.weights | ({"gram": gram_weight(cfg.gram, step)} if "gram" in losses else {})  # Gram: ramped in
        loss = sum(weights[k] * v for k, v in losses.items())
        timer.lap("forward")

        # a non-finite loss (on any rank) or gradient norm: skip the update everywhere; max_nonfinite in a row stop
        bad = [k for k, v in losses.items() if not torch.isfinite(v)]
        problem = f"loss {', '.join(bad) or 'on another rank'}" if pdist.all_reduce_max(float(bool(bad)), env) else ""
        if not problem:
            loss.backward()
            timer.lap("backward")
            grad_norms = clip_gradients(student, cfg.optim.clip_grad, per_module=cfg.optim.clip_grad_mode == "per_module")
            grad_norm = math.sqrt(sum(float(n) ** 2 for n in grad_norms.values()))  # the same on every rank
            if not math.isfinite(grad_norm):  # a finite loss can still give inf / NaN gradients: never apply them
                problem = "gradient norm of " + ", ".join(k for k, n in grad_norms.items() if not math.isfinite(float(n)))
        if nonfinite.skipped(step, problem, optimizer, log.logger):
            timer.start()
            continue
        if "dino" in losses:
            log.plateau(step, float(losses["dino"].detach()))  # warns once if stuck at ln K
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # the EMA (on local shards under FSDP; its backbone waits out a head warm-up too) and centre updates
        update_ema(ema, student, momentum, skip=("backbone",) if warming_up else ())
        if plan.update_centres:
            loss_state.dino_center.update(targets.cls_logits)
            if plan.ibot:
                loss_state.ibot_center.update(targets.patch_logits)
        timer.lap("optimizer")

        step_done = step + 1
        if log.due(step_done):
            hparams = {"lr": lr, **({"lr_backbone_scale": backbone_scale} if head_warmup else {}), "weight_decay": wd,
                       "teacher_momentum": momentum, "teacher_temp": teacher_temp, "grad_norm": grad_norm}
            log.step(step, loss, losses, targets, watched_cls(plan, ema, targets, global_crops, autocast), grad_norms,
                     hparams, nonfinite.total)
        if heldout is not None and step_done % cfg.train.rankme_every == 0:
            log.logger.log(step_done, {"rankme/teacher_cls": ema_rankme(ema, heldout, autocast)})

        if cfg.train.stop_after and step_done - start_step >= cfg.train.stop_after:
            stop.received = stop.received or "train.stop_after"
        if pdist.all_reduce_max(float(stop.received is not None), env):
            save(step_done)
            status, step = "interrupted", step_done
            say(f"stopping on {stop.received or 'a signal on another rank'}: checkpoint saved at step {step_done}")
            break
        if step_done % cfg.train.ckpt_every == 0 or step_done == steps:
            save(step_done)
        timer.start()
        step = step_done

    if status == "finished" and env.is_main:
        export_run(cfg, run_dir, step, say)
    if env.is_main:  # for scripts and launchers (torchrun turns a worker's exit status 75 into 1)
        write_status(run_dir, status=status, step=step)
    if probes and (warning := probes.poll()):  # it finishes the queue by itself once we are gone
        say(f"WARNING: {warning}")
    log.logger.close()
    pdist.teardown()
    return {"run_dir": str(run_dir), "step": step, "status": status}


def batch_crops(cfg: Config, batch: dict, views: Views, env: pdist.DistEnv) -> dict:
    """The step's crops on the device: global_crops (2B, 3, G, G), crop-major; local_crops (n_local*B, 3, L, L);
    masks (2B, N) bool, True = a masked patch (plan.mask_crops); gram_crops (2B, 3, 2G, 2G) when Gram anchoring reads
    the tiles at twice the pixels. With data.device_augment the workers sent raw tiles and the views are made here,
    batched on the device; else the workers made them."""
    if cfg.data.device_augment:
        crops = views(batch["tiles"].to(env.device, non_blocking=True),
                      views_generator(cfg.train.seed, env.rank, batch["step"]), batch.get("fine_tiles"))
    else:
        crops = batch["tiles"]
    return {k: v.to(env.device, non_blocking=True) for k, v in crops.items()
            if k in ("global_crops", "local_crops", "masks", "gram_crops")}


def export_run(cfg: Config, run_dir: Path, step: int, say) -> None:
    """run_dir/export: timm weights of the EMA backbone (and its heads, to continue or distil from), from the final
    checkpoint, so a sharded (FSDP) EMA exports the same way as a plain one; at the resolution they trained at, with
    a model card from the run."""
    vit, _ = load_ema_backbone(run_dir / "checkpoints")
    save_export(vit, run_dir / "export", mean=cfg.crops.mean, std=cfg.crops.std, extra={"step": step},
                img_size=cfg.crops.global_size, run_dir=run_dir)
    if heads := checkpoint_heads(run_dir / "checkpoints"):
        save_heads(run_dir / "export", *heads)
    say(f"export written: {run_dir / 'export'} (timm weights of the EMA backbone, and its heads, step {step})")


@torch.no_grad()
def watched_cls(plan: StepPlan, ema, targets: Targets, global_crops: torch.Tensor, autocast) -> torch.Tensor:
    """(2B, D) fp32: the CLS tokens of the model being trained, for the batch diagnostics and the collapse warning.
    Self-distillation: the targets' own (the EMA's). Beside a frozen teacher, which cannot collapse: the EMA's,
    computed here (logging steps only)."""
    if not plan.frozen_teacher:
        return targets.tokens[:, 0].float()
    with autocast:
        return ema.backbone.forward_features(global_crops)[:, 0].float()


class RunLog:
    """What the loop reports on its run, kept out of the step: metrics.jsonl / TensorBoard (Logger), step times and
    MFU, the data path's statistics, the ln K plateau and collapse warnings (once each)."""

    def __init__(self, cfg: Config, env: pdist.DistEnv, run_dir: Path, index, plan: StepPlan, start_step: int,
                 restart_file: str, resume_changes: dict, say):
        self.cfg, self.env, self.run_dir, self.index, self.say = cfg, env, run_dir, index, say
        self.start_step, self.gram = start_step, cfg.gram if cfg.gram.weight else None
        self.logger = Logger(run_dir, cfg.train.steps, enabled=env.is_main, resume_step=start_step or None)
        if restart_file:  # where this launch took over, and with which settings
            self.logger.event(start_step, {"restart": restart_file, "argv": sys.argv,
                                           **({"resume_changes": resume_changes} if resume_changes else {})})
        self.timer = StepTimer(env.device, sync=cfg.train.sync_timing)
        self.mpp_mix = Counter()  # magnifications of the tiles this rank trained on since the last log
        self.plateau_watch = PlateauWatch(cfg.ssl.prototypes, cfg.train.plateau_warn_steps, after_step=cfg.optim.warmup_steps)
        # the model being trained, watched for a collapse: the EMA (the targets' model in self-distillation; beside a
        # frozen teacher, which cannot collapse, watched_cls computes its CLS tokens on logging steps); warns once
        self.watched = "ema" if plan.frozen_teacher else "teacher"
        self.collapse = CollapseWatch(f"the {'student EMA' if plan.frozen_teacher else 'teacher'}'s CLS embeddings of this batch")
        self.peak = peak_flops(env.device)  # MFU on known GPUs; the count (0.6 s of CPU at start-up) only there
        self.flops_per_step = step_flops(cfg, plan)["total"] if self.peak else None
        self.global_batch = cfg.optim.batch_size * env.world_size

    def due(self, step_done: int) -> bool:
        return (step_done % self.cfg.train.log_every == 0 or step_done == self.cfg.train.steps
                or step_done - 1 == self.start_step)

    def plateau(self, step: int, dino_loss_value: float) -> None:
        if warning := self.plateau_watch.update(step, dino_loss_value):
            self.say(f"WARNING: {warning}")
            self.logger.event(step, {"warning": warning})

    def step(self, step: int, loss, losses: dict, targets: Targets, cls: torch.Tensor, grad_norms: dict, hparams: dict,
             nonfinite_total: int) -> None:
        """Log step `step` (as step + 1, the steps done): losses, diagnostics, schedules, gradient norms, throughput."""
        step_done, w = step + 1, self.watched
        # stuck or learning: teacher entropy / ln K (1 = flat targets), KL(teacher || student), RankMe of the watched
        # model's CLS tokens on this batch (1 = every image the same embedding; at most 2B), their spread (0: all alike)
        diag = {f"diag/{w}_rankme_batch": rankme(cls), f"diag/{w}_spread": spread(cls)}
        if "dino" in losses:
            diag |= {"diag/teacher_entropy": relative_entropy(targets.cls_probs),
                     "diag/student_teacher_kl": student_teacher_kl(float(losses["dino"].detach()), targets.cls_probs)}
        values = pdist.mean_over_ranks({"loss/total": loss, **{f"loss/{k}": v for k, v in losses.items()}, **diag}, self.env)
        collapsed, warning = self.collapse.update(step_done, values[f"diag/{w}_spread"], values[f"diag/{w}_rankme_batch"])
        values["diag/collapsed"] = float(collapsed is not None)
        if warning:
            self.say(f"WARNING: {warning}")
            self.logger.event(step_done, {"collapse": collapsed})
        timer = self.timer
        values.update({**hparams, **{f"grad_norm/{k}": float(n) for k, n in grad_norms.items() if len(grad_norms) > 1},
                       "images_per_s": self.global_batch / max(timer.total(), 1e-9),
                       "memory_gib": peak_memory_gib(self.env.device),
                       **(data_stats(self.index, self.run_dir, self.mpp_mix) if self.env.is_main else {}),
                       "nonfinite_steps": nonfinite_total, **{f"time/{k}_s": v for k, v in timer.laps.items()}})
        if self.gram is not None:
            values.update({"gram/weight": gram_weight(self.gram, step), "gram/refreshes": refreshes_done(self.gram, step)})
        if self.peak:
            values["mfu"] = mfu(self.flops_per_step, timer.total(), self.peak)
        self.logger.log(step_done, values)
        self.logger.progress(step_done, values)


def data_stats(index, run_dir: Path, mpp_mix: Counter) -> dict:
    """What the data path did since the last log: usable slides, read failures over all workers and
    ranks (also merged into skipped_slides.csv), the realised magnification mix of this rank."""
    if index is None:
        return {}
    failures, dropped = summarise_read_failures(run_dir / "read_failures", run_dir / "skipped_slides.csv", FAILURES_TO_DROP)
    total = sum(mpp_mix.values()) or 1
    stats = {"data/usable_slides": len(index) - dropped, "data/unusable_slides": index.meta["unusable"],
             "data/read_failures": failures, "data/dropped_slides": dropped,
             **{f"data/mpp_share/{m:g}": n / total for m, n in sorted(mpp_mix.items())}}
    mpp_mix.clear()
    return stats


def heldout_batch(cfg: Config, index, views: Views, env, loader) -> torch.Tensor:
    """A fixed batch of global crops, never trained on (its own seed), for RankMe; the same tile
    stream as training (same filters), from another seed."""
    if cfg.data.source == "random":
        return loader.dataset.batch(10**9)["tiles"]["global_crops"][: cfg.optim.batch_size].to(env.device)
    ds = tile_dataset(cfg, index, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed + 10**6,
                      batch_size=cfg.train.rankme_batch)
    tiles = ds.batch(0)["tiles"]
    crops = views(tiles, views_generator(cfg.train.seed + 10**6, env.rank, 0))["global_crops"]
    return crops[: len(tiles)].to(env.device)  # the first global crop of each tile


@torch.no_grad()
def ema_rankme(ema, images, autocast) -> float:
    """RankMe of the EMA's CLS tokens on the held-out batch (logged as rankme/teacher_cls: the EMA is the
    self-distillation teacher)."""
    with autocast:
        cls = ema.backbone.forward_features(images)[:, 0]
    return rankme(cls.float())


def crop_grid(global_crops, local_crops, crops_cfg, n: int = 4) -> torch.Tensor:
    """The first n tiles' crops, de-normalised, as one (3, H, W) image for TensorBoard."""
    from torchvision.utils import make_grid

    mean = torch.tensor(crops_cfg.mean, device=global_crops.device).view(1, 3, 1, 1)
    std = torch.tensor(crops_cfg.std, device=global_crops.device).view(1, 3, 1, 1)
    B = global_crops.shape[0] // 2
    n = min(n, B)
    size = global_crops.shape[-1]
    rows = []
    for i in range(n):
        locals_i = local_crops[i::B] if local_crops.numel() else local_crops
        locals_i = F.interpolate(locals_i, size=size, mode="nearest") if locals_i.numel() else locals_i
        rows.append(torch.cat([global_crops[i : i + 1], global_crops[B + i : B + i + 1], locals_i]))
    images = torch.cat(rows) * std + mean
    return make_grid(images.clamp(0, 1).float().cpu(), nrow=rows[0].shape[0])


def main_for_user(cfg: Config, debug: bool = False) -> dict:
    """main(cfg) for a command line: an error the user caused (a config value, slide, manifest or weights file) is
    one line naming it, and a run folder this launch created is removed; --debug keeps the traceback."""
    run_dir = Path(cfg.train.output_dir) / (cfg.train.name or "run")
    fresh = not run_dir.exists()
    try:
        return main(cfg)
    except ckpt.CheckpointError as e:  # the same line on every rank; keep the run folder: it holds the previous checkpoint
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            write_status(run_dir, status="failed", step=e.step, ranks=e.ranks, reason=e.strerror)
        if debug:
            raise
        raise SystemExit(f"error: {e.strerror}") from None
    except (ConfigError, SlideError) as e:
        if debug:
            raise
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise SystemExit(f"error: {e}") from None
    except (LoaderFault, RuntimeError) as e:  # a stalled loader or a dead loader worker: stop for a requeue (75)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        fault = e if isinstance(e, LoaderFault) else loader_fault(e, run_dir / "read_failures", rank)
        if fault is None or debug:
            raise
        print(f"error: {fault}", file=sys.stderr, flush=True)
        write_status(run_dir, status="interrupted", ranks=[rank], reason=str(fault))
        return {"run_dir": str(run_dir), "status": "interrupted", "reason": str(fault)}


def cli(argv=None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description="pathfm training (run under torchrun, srun, or alone)")
    p.add_argument("--config", required=True, help="YAML file, or a name in configs/")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if not cfg.train.name:
        cfg.train.name = Path(a.config).stem
    return main_for_user(cfg, a.debug)


if __name__ == "__main__":
    sys.exit(STOPPED_EXIT if cli()["status"] == "interrupted" else 0)
