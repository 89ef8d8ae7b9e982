#!/usr/bin/env python
"""Before / after of the step's memory changes, measured with the CPU allocator on a reduced model (BENCHMARKS.md,
"Will it fit"): the smoke ViT with Sinkhorn-Knopp centring and 16,384 prototypes, batch 8, fp32, one rank.

    OMP_NUM_THREADS=1 nice -n 19 python bench/memory_waste.py
    python bench/memory_waste.py --at-scale configs/distill_vits16_from_vitg14.yaml 8 configs/vitg14.yaml   # estimator

"before" runs the same step (pathfm.train.memory_step) with the previous Sinkhorn-Knopp (three (N, K) fp32 copies:
logits / T, minus the max, exp) and the previous compute_targets (the teacher's iBOT logits kept in the targets
through the student's forward and backward), swapped in for this process; "after" is the code as it is.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERRIDES = ["train.precision=fp32", "dist.compile=false", "optim.fused=false", "data.source=random",
             "optim.batch_size=8", "ssl.centering=sinkhorn_knopp", "ssl.prototypes=16384", "ssl.ibot_prototypes=16384",
             "ssl.ibot_separate_head=true", "ssl.mask_probability=1.0", "ssl.mask_ratio_min=0.5", "ssl.mask_ratio_max=0.5"]


@__import__("torch").no_grad()
def sinkhorn_knopp_before(teacher_logits, teacher_temp, n_iters=3):
    import torch
    import torch.distributed as dist

    from pathfm.losses import _all_reduce

    teacher_logits = teacher_logits.float()
    n_protos = teacher_logits.shape[1]
    x = teacher_logits / teacher_temp
    x_max = x.max() if x.numel() else x.new_tensor(float("-inf"))
    x = x - _all_reduce(x_max.reshape(1), op=dist.ReduceOp.MAX)
    q = torch.exp(x).t()
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
    return q.t()


def compute_targets_before(plan, model, images, masks, teacher_temp, centres):
    from pathfm import train

    tokens = model.backbone.forward_features(images)
    out = train.Targets(tokens, model.backbone.num_prefix_tokens)
    if plan.targets == "heads":
        out.cls_logits = model.dino_head(tokens[:, 0])
        out.cls_probs = train.head_targets(plan, out.cls_logits, teacher_temp, centres.dino_center)
    if plan.ibot:
        out.patch_logits = getattr(model, plan.ibot_head)(tokens[:, out.prefix:][plan.scored(masks)])
        out.patch_probs = train.head_targets(plan, out.patch_logits, teacher_temp, centres.ibot_center)
    return out


def at_scale(config: str, world: int, teacher: str) -> int:
    """The same before / after with the estimator alone, at a shipped config's size (GPU dtypes, fake ranks)."""
    from launch.estimate import peak, teacher_spec_from_config
    from pathfm import train
    from pathfm.config import load_config

    cfg, spec = load_config(config), teacher_spec_from_config(teacher) if teacher else None
    after = (train.sinkhorn_knopp, train.compute_targets)
    print(f"{config} on {world} GPUs: peak GiB (phase) / targets-phase peak GiB")
    for name, (sk, targets) in {"before": (sinkhorn_knopp_before, compute_targets_before),
                                "SK in place": (after[0], compute_targets_before), "after": after}.items():
        train.sinkhorn_knopp, train.compute_targets = sk, targets
        u = peak(cfg, world, spec)
        print(f"  {name}: {u.peak_gib:.2f} ({u.phase}) / {u.phase_peaks.get('targets', 0) / 2**30:.2f}", flush=True)
    train.sinkhorn_knopp, train.compute_targets = after
    return 0


def main() -> int:
    import torch

    from pathfm import memory, train
    from pathfm.config import load_config
    from pathfm.dist import DistEnv

    if len(sys.argv) > 1 and sys.argv[1] == "--at-scale":  # --at-scale CONFIG WORLD [TEACHER_CONFIG]
        return at_scale(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
    cfg = load_config(ROOT / "configs/smoke.yaml", OVERRIDES + sys.argv[1:])
    env = DistEnv(0, 1, 0, torch.device("cpu"), "single")
    after = (train.sinkhorn_knopp, train.compute_targets)
    versions = {"before": (sinkhorn_knopp_before, compute_targets_before), "SK in place": (after[0], compute_targets_before),
                "after": after}
    print("| code | allocator peak MiB | estimate MiB | phase of the peak | estimate, targets phase MiB |\n"
          "|---|---:|---:|---|---:|")
    for name, (sk, targets) in versions.items():
        train.sinkhorn_knopp, train.compute_targets = sk, targets
        torch.manual_seed(0)
        _, allocator = memory.measure(partial(train.memory_step, cfg), env)
        est = memory.estimate(partial(train.memory_step, cfg), 1)
        print(f"| {name} | {allocator / 2**20:.1f} | {est.peak / 2**20:.1f} | {est.phase} | "
              f"{est.phase_peaks.get('targets', 0) / 2**20:.1f} |", flush=True)
    train.sinkhorn_knopp, train.compute_targets = after
    return 0


if __name__ == "__main__":
    sys.exit(main())
