"""Time and peak memory of the probes on random embeddings (no data, no model).

    python bench/eval.py                          # both parts, each in its own process
    python bench/eval.py --part knn --train 200000 --test 10000 --dim 1024
    python bench/eval.py --part linear --train 100000 --dim 1024 --steps 391

knn: DINOv2's weighted vote for k in {10, 20, 100, 200}, chunked (512 test x 32768 train similarities at a time).
linear: the 13-learning-rate grid, batch 256, `--steps` steps (391 = one pass over 100,000 embeddings).
small: both probe protocols with their defaults (5 runs, 12,500 steps at most) on 9 embeddings.
extract: eval/extract.py's embedding rate on an image folder against the model's forward rate on
  already decoded batches, alternately (--images FOLDER, or the 9 shipped CRC tiles repeated).
Peak memory is the process's maximum resident set size, which includes the embeddings themselves.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def bench_small(dim: int, classes: int) -> None:
    import torch

    from eval.linear import run_probe

    g = torch.Generator().manual_seed(0)
    split = {"embeddings": torch.randn(classes, dim, generator=g), "labels": torch.arange(classes),
             "classes": [str(c) for c in range(classes)]}
    for grid in (True, False):
        t = time.perf_counter()
        r = run_probe({"train": split, "test": split}, grid=grid, runs=5)
        steps = sum(run.get("steps", 12_500) for run in r["per_run"])
        print(f"linear {'grid (13 lrs)' if grid else 'eva'}, {classes} x {dim} embeddings, 5 runs ({steps} steps): "
              f"{time.perf_counter() - t:.1f} s")


def bench_extract(images: str | None, n: int, arch: str, patch: int, size: int, workers: int, repeats: int) -> None:
    """Images/s of extract() on a folder vs the same model's forward on decoded batches of the same size."""
    import shutil
    import statistics
    import tempfile

    import torch

    from eval.backbone import EvalBackbone
    from eval.datasets import open_dataset
    from eval.extract import embed, extract
    from pathfm.vit import ViTArgs, build_vit

    tmp = None
    if images is None:  # the 9 real CRC tiles, linked n/9 times each, one class folder per tile
        src = ROOT.parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"
        tmp = images = tempfile.mkdtemp(prefix="bench-extract-")
        for i, f in enumerate(sorted(src.rglob("*.tif"))):
            (Path(tmp) / f.parent.name).mkdir()
            for j in range(n // 9):
                (Path(tmp) / f.parent.name / f"{j}.tif").symlink_to(f)
    ds = open_dataset(images)
    vit = build_vit(ViTArgs(arch=arch, patch_size=patch, img_size=size)).eval()
    bb = EvalBackbone(vit, (0.5,) * 3, (0.5,) * 3, "bench", arch)
    x = torch.randn(64, 3, size, size)
    fwd, ext = [], []
    with torch.inference_mode():
        embed(vit, x)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(max(1, len(ds) // 64)):
                embed(vit, x)
        fwd.append(64 * max(1, len(ds) // 64) / (time.perf_counter() - t))
        t = time.perf_counter()
        extract(bb, ds, img_size=size, num_workers=workers, progress=False)
        ext.append(len(ds) / (time.perf_counter() - t))
    f, e = statistics.median(fwd), statistics.median(ext)
    print(f"extract: {arch}/{patch} at {size} px, {len(ds)} images, {workers} workers, {torch.get_num_threads()} "
          f"threads, medians of {repeats}: forward {f:.1f} img/s, extract {e:.1f} img/s, ratio {e / f:.2f}")
    if tmp:
        shutil.rmtree(tmp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("knn", "linear", "both", "small", "extract"), default="both")
    p.add_argument("--train", type=int, default=None, help="training embeddings (knn 200000, linear 100000)")
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--steps", type=int, default=391)
    p.add_argument("--images", help="extract: image folder (default: the shipped CRC tiles, repeated)")
    p.add_argument("--n", type=int, default=576, help="extract: images when repeating the shipped tiles")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.part == "both":  # separate processes, so each peak is its own
        for part in ("knn", "linear"):
            subprocess.run([sys.executable, __file__, "--part", part, "--test", str(a.test), "--dim", str(a.dim),
                            "--classes", str(a.classes), "--steps", str(a.steps)]
                           + (["--train", str(a.train)] if a.train else []), check=True)
    elif a.part == "small":
        bench_small(a.dim, a.classes)
    elif a.part == "extract":
        bench_extract(a.images, a.n, a.arch, a.patch, a.size, a.workers, a.repeats)
    elif a.part == "knn":
        bench_knn(a.train or 200_000, a.test, a.dim, a.classes)
    else:
        bench_linear(a.train or 100_000, a.dim, a.classes, a.steps)


if __name__ == "__main__":
    main()
