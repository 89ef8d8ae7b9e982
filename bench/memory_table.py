#!/usr/bin/env python
"""docs/scaling.md's memory table: every shipped GPU config on one 8-GPU node, without and with activation
checkpointing, peak per GPU at its batch and the largest batch that fits 40, 80 and 141 GiB.

    OMP_NUM_THREADS=1 nice -n 19 python bench/memory_table.py > table.md     # about 30 CPU-minutes
    python bench/memory_table.py 8 vitg14_highres,distill_vits16_from_vitg14   # some configs only

Each row is two estimates (pathfm.memory via launch/estimate.py: the real step on fake tensors, 8 fake ranks,
eager): at the config's batch B and at B/2. Peak memory is linear in the batch (what grows with it is activations,
logits and targets), so the largest batch for each memory size is read from the line through the two and rounded
down; launch/train.py's refusal searches instead. The distillation pair uses configs/vitg14.yaml as its teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ["vits16", "vits8", "vitb16", "vitb8", "vitl14", "vitg14", "vitg14_highres", "distill_vits16_from_vitg14"]
MEMORY_GIB = (40, 80, 141)


def main() -> int:
    from launch.estimate import peak, teacher_spec_from_config
    from pathfm import memory
    from pathfm.config import load_config

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    print(f"| config | activation checkpointing | batch per GPU | peak GiB (phase) | "
          + " | ".join(f"largest batch, {g} GiB" for g in MEMORY_GIB) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(MEMORY_GIB))
    for name in sys.argv[2].split(",") if len(sys.argv) > 2 else CONFIGS:
        spec = teacher_spec_from_config(str(ROOT / "configs/vitg14.yaml")) if name.startswith("distill") else None
        for ac in ("none", "full"):
            cfg = load_config(ROOT / f"configs/{name}.yaml", [f"dist.activation_checkpointing={ac}"])
            batches = [64, 32] if name.startswith("distill") else [cfg.optim.batch_size, max(2, cfg.optim.batch_size // 2)]
            usages = {b: peak(cfg, world, spec, b) for b in batches}
            (b1, u1), (b2, u2) = usages.items()
            slope = (u1.peak - u2.peak) / (b1 - b2)
            fits = [max(0, int(b2 + (g * memory.GIB - u2.peak) / slope)) for g in MEMORY_GIB]
            for b, u in usages.items():
                print(f"| {name} | {ac} | {b} | {u.peak_gib:.1f} ({u.phase}) | "
                      + " | ".join(str(f) for f in fits) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
