"""Samples/s per core of MultiCrop vs a per-image torchvision/PIL DINOv2 pipeline (2 x 224 + 8 x 96).

    python bench/augment.py [--batch 32] [--repeats 5] [--tile 256]

Both run in this process with torch.set_num_threads(1), on the same real H&E tiles (the nine
NCT-CRC-HE tiles of shared/data, resized to --tile px); the table gives medians over --repeats,
timed alternately.
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pathfm.data.augment import MultiCrop

TILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"


def load_tiles(n: int, size: int) -> list[Image.Image]:
    paths = sorted(TILES.glob("*/*.tif"))
    if not paths:
        raise SystemExit(f"no tiles found under {TILES}")
    images = [Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC) for p in paths]
    return [images[i % len(images)] for i in range(n)]


def pil_dinov2(n_local: int = 8):
    """DINOv2's multi-crop recipe with torchvision v1 transforms on PIL images, plus vertical flips."""
    bicubic = T.InterpolationMode.BICUBIC
    color = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)
    flips = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    norm = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    g1 = T.Compose([T.RandomResizedCrop(224, (0.32, 1.0), interpolation=bicubic), *flips, *color, blur(1.0), *norm])
    g2 = T.Compose([T.RandomResizedCrop(224, (0.32, 1.0), interpolation=bicubic), *flips, *color, blur(0.1),
                    T.RandomSolarize(128, p=0.2), *norm])
    loc = T.Compose([T.RandomResizedCrop(96, (0.05, 0.32), interpolation=bicubic), *flips, *color, blur(0.5), *norm])
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(n_local)]


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Seconds per call of each fn, alternating between them so that load from other processes
    on a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tile", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    images = load_tiles(args.batch, args.tile)
    tiles = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()  # (B, 3, T, T)
    multicrop, generator = MultiCrop(), torch.Generator().manual_seed(0)
    pipeline = pil_dinov2()

    rows = time_interleaved({
        "torchvision v1 / PIL, per image": lambda: [pipeline(im) for im in images],
        "pathfm MultiCrop, batched uint8": lambda: multicrop(tiles, generator),
    }, args.repeats)
    rates = {name: args.batch / statistics.median(t) for name, t in rows.items()}
    print(f"| pipeline (2 x 224 + 8 x 96 from {args.tile} px, 1 thread, batch {args.batch}) | samples/s per core |")
    print("|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    pil, ours = rates.values()
    print(f"| ratio | {ours / pil:.2f}x |")


if __name__ == "__main__":
    main()
