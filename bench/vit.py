"""pathfm ViT vs timm's implementation of the same architecture: forward + backward time, one run.

    python bench/vit.py --arch vit_small --patch 16 --batch 32 --size 224 --repeats 7

Both models get identical weights (pathfm's state dict loads into timm strictly); the two are timed
alternately so machine noise hits both alike; medians and their ratio are printed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pathfm.export import timm_export  # noqa: E402
from pathfm.vit import ViTArgs, build_vit  # noqa: E402


def step_time(model, x) -> float:
    t0 = time.perf_counter()
    model(x).float().pow(2).mean().backward()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layerscale", type=float, default=0.0)
    a = p.parse_args()
    torch.manual_seed(0)
    ours = build_vit(ViTArgs(arch=a.arch, patch_size=a.patch, img_size=a.size, layerscale=a.layerscale)).train()
    name, kwargs, sd = timm_export(ours)
    theirs = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).train()
    theirs.load_state_dict(sd, strict=True)
    x = torch.randn(a.batch, 3, a.size, a.size)
    for m in (ours, theirs):  # warm-up
        step_time(m, x)
    t_ours, t_timm = [], []
    for _ in range(a.repeats):
        t_ours.append(step_time(ours, x))
        t_timm.append(step_time(theirs, x))
    mo, mt = statistics.median(t_ours), statistics.median(t_timm)
    print(f"{name} batch {a.batch} {a.size}px fwd+bwd, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pathfm {mo * 1000:.0f} ms | timm {mt * 1000:.0f} ms | pathfm/timm {mo / mt:.3f} (median of {a.repeats})")


if __name__ == "__main__":
    main()
