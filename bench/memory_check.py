#!/usr/bin/env python
"""The memory estimate against real allocations, at sizes that run on this CPU (BENCHMARKS.md, "Will it fit").

    OMP_NUM_THREADS=1 nice -n 19 python bench/memory_check.py              # ViT-S/16, ViT-B/16, a distillation pair
    python bench/memory_check.py --cases vits16 --ranks 1                   # one case

For each case and rank count (1, and 2 gloo ranks): pathfm.memory.estimate (fake tensors, a fake process group)
against the same step (pathfm.train.memory_step) on real tensors, tracked by the same tracker and by the CPU
allocator's own running total (the profiler's allocation events: every allocation and free of c10's CPU allocator,
kernels' internal buffers included). fp32 (this CPU has no bf16 path in pathfm), torch.compile off, batch 8.
Prints one row per case: peaks in GiB and the ratios estimate / tracked and estimate / allocator.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # name: (config, overrides, teacher config for a distillation pair)
    "vits16": ("configs/vits16.yaml", [], ""),
    "vitb16": ("configs/vitb16.yaml", [], ""),
    "distill vits16 <- vitb16": ("configs/distill_vits16_from_vitg14.yaml",
                                 ["ssl.prototypes=65536", "ssl.ibot_separate_head=false", "ssl.head_bottleneck=256"],
                                 "configs/vitb16.yaml"),
}
COMMON = ["optim.batch_size=8", "train.precision=fp32", "dist.compile=false", "optim.fused=false", "data.source=random",
          "data.manifest="]


def case_config(name: str):
    from pathfm.config import load_config

    config, overrides, teacher = CASES[name]
    return load_config(ROOT / config, COMMON + overrides), teacher


def teacher_spec(teacher: str):
    if not teacher:
        return None
    from launch.estimate import teacher_spec_from_config

    return teacher_spec_from_config(str(ROOT / teacher), ["ssl.objective=dinov2"])  # a teacher with an iBOT head


def real_rank(rank: int, world: int, name: str, port: int, out):
    """One real rank: gloo group of `world`, the step on real tensors, tracked; rank 0 puts its numbers in out."""
    import torch
    import torch.distributed as dist

    from pathfm import memory
    from pathfm.dist import DistEnv
    from pathfm.train import memory_step

    cfg, teacher = case_config(name)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    env = DistEnv(rank, world, 0, torch.device("cpu"), "single" if world == 1 else "torchrun")
    usage, allocator = memory.measure(partial(memory_step, cfg, teacher_spec=teacher_spec(teacher)), env)
    if rank == 0:
        out.put((usage.peak, allocator))
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--ranks", default="1,2")
    a = p.parse_args(argv)
    import torch.multiprocessing as mp

    from pathfm import memory
    from pathfm.train import memory_step

    print("| case | ranks | estimate GiB | tracked GiB | allocator GiB | estimate / tracked | estimate / allocator |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.cases.split(","):
        for world in (int(w) for w in a.ranks.split(",")):
            cfg, teacher = case_config(name)
            est = memory.estimate(partial(memory_step, cfg, teacher_spec=teacher_spec(teacher)), world).peak
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            port = 29500 + os.getpid() % 1000
            procs = [ctx.Process(target=real_rank, args=(r, world, name, port, out)) for r in range(world)]
            for proc in procs:
                proc.start()
            tracked, allocator = out.get()
            for proc in procs:
                proc.join()
            g = memory.GIB
            print(f"| {name} | {world} | {est / g:.3f} | {tracked / g:.3f} | {allocator / g:.3f} | "
                  f"{est / tracked:.3f} | {est / allocator:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
