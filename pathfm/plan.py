"""What one training step does, decided once before the loop: the step plan.

    plan = make_plan(cfg, teacher_spec)     # teacher_spec: distill.inspect_teacher(cfg.distill.teacher), or None
    plan = distill.step_plan(cfg)           # the same, reading the teacher file named in cfg (cheap: no weights)

The trainer's step (pathfm/train.py: compute_targets, compute_losses, the loop), the views (data/loader.py: which
crops carry iBOT masks), the FLOP count (flops.py), the benchmark and the distillation checks (distill.py) read
these fields. None of them re-derives "is iBOT on?" or "which head scores patches?" from the config: a mirror of
the step kept by hand drifts (the FLOP counter once counted a head twice).

Adding a field: derive it in make_plan from cfg and the teacher spec, say in a comment what it decides, and read it
where the step branches (and in step_flops if it changes the work). tests/test_plan.py builds the plan for every
shipped config and every distillation mode; add the new case there.
Adding a loss: compute it in train.compute_losses under its name, and give it a weight in make_plan's `weights`
(only when it runs). The loop adds weights[name] * loss to the total and logs it as loss/<name>.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    targets_from: str  # "ema" (self-distillation: the student's EMA) | "teacher" (a frozen model, distill.teacher)
    targets: str  # "heads": DINO (+ iBOT) on head probabilities | "features": the student's projected tokens
                  # regress the teacher's by cosine (a teacher without heads)
    ibot: bool  # the iBOT loss runs (heads targets, ssl.objective dinov2, patch targets not switched off)
    patch_features: bool  # features targets: the patch-token loss runs too (distill.patch_targets)
    mask_crops: bool  # the student's global crops carry iBOT block masks (Views draws them)
    ibot_patches: str  # "masked": iBOT scores the masked patches | "all": every patch, nothing masked (DINOv2's
                       # distillation; only with a frozen teacher)
    ibot_head: str  # the head that scores patches, student and target side: "ibot_head" (its own) | "dino_head"
    centering: str  # how head logits become targets: "centering" (EMA centre, updated after the step) | "sinkhorn_knopp"
    weights: dict  # {loss name: weight in the total} for exactly the losses that run; read it, never change it
    student_temp: float
    kde_bandwidth: float
    gram_scale: int = 0  # Gram anchoring (pathfm/gram.py; its weight is weights["gram"], ramped by gram.gram_weight): 0 off
                         # | 1: the Gram teacher sees the global crops | 2: their regions at twice the pixels ("gram_crops")
    gram_remove_negatives: bool = False  # negative patch similarities set to 0 before the Gram loss

    @property
    def frozen_teacher(self) -> bool:
        return self.targets_from == "teacher"

    @property
    def features(self) -> bool:
        return self.targets == "features"

    @property
    def patch_targets(self) -> bool:
        """Patch-level targets of any kind: iBOT, or patch features (the student then has a patch_proj)."""
        return self.ibot or self.patch_features

    @property
    def update_centres(self) -> bool:
        """The EMA centres move after each step (centering of head targets; Sinkhorn-Knopp keeps no state)."""
        return self.targets == "heads" and self.centering == "centering"

    def scored(self, masks: torch.Tensor) -> torch.Tensor:
        """(2B, N) bool: the patches iBOT scores, from the views' masks (True = masked patch)."""
        return masks if self.ibot_patches == "masked" else torch.ones_like(masks)


def loss_mode(cfg, teacher_spec) -> str:
    """distill.loss resolved: auto = heads when the teacher file has them, else features."""
    if cfg.distill.loss != "auto":
        return cfg.distill.loss
    return "heads" if teacher_spec.heads else "features"


def make_plan(cfg, teacher_spec=None) -> StepPlan:
    """The plan of the step for cfg; teacher_spec: what distill.teacher holds (distill.inspect_teacher), None for
    self-distillation. Pairing errors are distill.check_pairing's business, not this function's."""
    s, d = cfg.ssl, cfg.distill
    if bool(cfg.distill.teacher) != (teacher_spec is not None):
        raise ValueError("make_plan: pass the teacher's spec exactly when distill.teacher is set "
                         f"(distill.teacher={cfg.distill.teacher!r}, spec {'given' if teacher_spec else 'missing'})")
    frozen = teacher_spec is not None
    targets = loss_mode(cfg, teacher_spec) if frozen else "heads"
    patch_targets = not frozen or d.patch_targets  # distill.patch_targets=false: CLS-level targets only
    ibot = targets == "heads" and s.objective == "dinov2" and patch_targets
    patch_features = targets == "features" and d.patch_targets
    ibot_patches = d.ibot_patches if frozen else "masked"
    # the student's crops are masked as iBOT masks them, also under feature targets (patch tokens regressed everywhere)
    mask_crops = s.objective == "dinov2" and patch_targets and ibot_patches == "masked"
    if targets == "heads":
        weights = {"dino": s.dino_weight} | ({"ibot": s.ibot_weight} if ibot else {})
    else:
        weights = {"feat_cls": d.feature_weight_cls} | ({"feat_patch": d.feature_weight_patch} if patch_features else {})
    weights |= ({"koleo": s.koleo_weight} if s.koleo_weight else {}) | ({"kde": s.kde_weight} if s.kde_weight else {})
    weights |= {"gram": cfg.gram.weight} if cfg.gram.weight else {}
    return StepPlan(targets_from="teacher" if frozen else "ema", targets=targets, ibot=ibot,
                    patch_features=patch_features, mask_crops=mask_crops, ibot_patches=ibot_patches,
                    ibot_head="ibot_head" if s.ibot_separate_head else "dino_head", centering=s.centering,
                    weights=weights, student_temp=s.student_temp, kde_bandwidth=s.kde_bandwidth,
                    gram_scale=cfg.gram.scale if cfg.gram.weight else 0, gram_remove_negatives=cfg.gram.remove_negatives)
