#!/usr/bin/env python
"""One benchmark point on one rank, with the trainer: what launch/benchmark.py starts under torchrun, and the callable
each SLURM task of a benchmark job runs (BenchJob). The measuring is pathfm/benchmark.py's run_point; it is handed
pathfm.train.main here, so that nothing in pathfm/ imports the trainer. No torch import at module top.

    torchrun --nproc-per-node 2 -m launch.bench_point --point-dir runs/bench/x/local-2 --warmup 2 --measure 3
    BenchJob(point_dir, warmup=5, measure=20)()      # the callable a SLURM task runs (submitit)
"""

from __future__ import annotations

import sys


def run(point_dir: str, **kwargs) -> dict:
    """pathfm.benchmark.run_point with the trainer; returns this rank's record (also in ranks/rank_R.json)."""
    from pathfm.benchmark import run_point
    from pathfm.train import main

    return run_point(point_dir, train=main, **kwargs)


class BenchJob:
    """The callable each SLURM task runs (submitit pickles it by this module's import path)."""

    def __init__(self, point_dir: str, warmup: int, measure: int, data: bool = False, memory_gib: float | None = None):
        self.point_dir, self.warmup, self.measure, self.data, self.memory_gib = str(point_dir), warmup, measure, data, memory_gib

    def __call__(self) -> dict:
        return run(self.point_dir, warmup=self.warmup, measure=self.measure, data=self.data, memory_gib=self.memory_gib)


def cli(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="one benchmark point on this rank (run by launch/benchmark.py under torchrun)")
    p.add_argument("--point-dir", required=True, help="folder holding config.yaml; results go to its ranks/")
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--measure", type=int, required=True)
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--memory-gib", type=float)
    a = p.parse_args(argv)
    rec = run(a.point_dir, warmup=a.warmup, measure=a.measure, data=a.data_only, memory_gib=a.memory_gib)
    if rec["status"] != "ok":
        print(f"rank {rec['rank']}: {rec['status']}: {rec['error']}", file=sys.stderr, flush=True)
    # a failed rank exits non-zero so that torchrun stops the others (they may wait in a collective)
    return 0 if rec["status"] in ("ok", "too_large") else 1


if __name__ == "__main__":
    sys.exit(cli())
