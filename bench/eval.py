"""Time and peak memory of the probes on random embeddings (no data, no model).

    python bench/eval.py                          # both parts, each in its own process
    python bench/eval.py --part knn --train 200000 --test 10000 --dim 1024
    python bench/eval.py --part linear --train 100000 --dim 1024 --steps 391

knn: DINOv2's weighted vote for k in {10, 20, 100, 200}, chunked (512 test x 32768 train similarities at a time).
linear: the 13-learning-rate grid, batch 256, `--steps` steps (391 = one pass over 100,000 embeddings).
Peak memory is the process's maximum resident set size, which includes the embeddings themselves.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_knn(n_train: int, n_test: int, dim: int, classes: int) -> None:
    import torch

    from eval.knn import KS, knn_predict

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(n_train, dim, generator=g), torch.randn(n_test, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    base = peak_mib()
    t = time.perf_counter()
    knn_predict(train, labels, test, classes, ks=KS)
    dt = time.perf_counter() - t
    print(f"knn: {n_train} train x {n_test} test x {dim} dims, k {KS}: {dt:.1f} s "
          f"({n_test / dt:.0f} queries/s), peak RSS {peak_mib():.0f} MiB "
          f"(embeddings alone {(n_train + n_test) * dim * 4 / 2**20:.0f} MiB, before the search {base:.0f} MiB), "
          f"{torch.get_num_threads()} threads")


def bench_linear(n_train: int, dim: int, classes: int, steps: int) -> None:
    import torch

    from eval.linear import DINOV2_LRS, train_linear_grid

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train, dim, generator=g), torch.randint(0, classes, (n_train,), generator=g)
    t = time.perf_counter()
    train_linear_grid(x, y, classes, lrs=DINOV2_LRS, batch_size=256, max_steps=steps)
    dt = time.perf_counter() - t
    print(f"linear grid: {len(DINOV2_LRS)} heads, {n_train} x {dim} embeddings, {classes} classes, {steps} steps of "
          f"256: {dt:.1f} s ({1000 * dt / steps:.1f} ms/step; 12,500 steps ~ {12500 * dt / steps / 60:.1f} min), "
          f"peak RSS {peak_mib():.0f} MiB, {torch.get_num_threads()} threads")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("knn", "linear", "both"), default="both")
    p.add_argument("--train", type=int, default=None, help="training embeddings (knn 200000, linear 100000)")
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--steps", type=int, default=391)
    a = p.parse_args()
    if a.part == "both":  # separate processes, so each peak is its own
        for part in ("knn", "linear"):
            subprocess.run([sys.executable, __file__, "--part", part, "--test", str(a.test), "--dim", str(a.dim),
                            "--classes", str(a.classes), "--steps", str(a.steps)]
                           + (["--train", str(a.train)] if a.train else []), check=True)
    elif a.part == "knn":
        bench_knn(a.train or 200_000, a.test, a.dim, a.classes)
    else:
        bench_linear(a.train or 100_000, a.dim, a.classes, a.steps)


if __name__ == "__main__":
    main()
