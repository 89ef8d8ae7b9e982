"""What snapping tiles to the stored-tile grid (data.grid_aligned, the default since issue 31) changes in the tiles.

    python bench/grid.py [--draws 20000] [--decoded 2000]

On bench/data.py's synthetic 40000 px slide (written once to .cache/pathfm/bench) and the two real slides of
../shared/data (CMU-1-Small-Region.svs and the TCGA slide, mpp 0.5 given), for the mix 0.5/1/2 µm/px at 224 px,
the same draws (same seed) with grid_aligned on and off:
  - stored tiles decoded a tile (JPEG reader) and the share of draws whose snap left the tissue (kept where drawn);
  - the tissue share of each tile's footprint on the slide's tissue mask (mean, 5th percentile, share below the
    index's threshold 0.4): the snap must not make tiles emptier;
  - the distance a snap moved a tile, in µm;
  - the colour of the decoded tiles (first --decoded draws): mean R, G, B and the share of near-white pixels
    (all channels >= 220), with the standard error of each mean, aligned minus free.
Counts and pixel statistics only, no timing: the load average does not matter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pathfm.data.index import IndexParams, build_index  # noqa: E402
from pathfm.data.sampler import SlideTileDataset, TileReader  # noqa: E402
from pathfm.data.slides import SlideEntry  # noqa: E402
from pathfm.data.synthetic import write_synthetic_slide  # noqa: E402

MIX = (0.5, 1.0, 2.0)
THRESHOLD = 0.4


def tissue_mask(index, i: int) -> np.ndarray:
    stem = Path(index.path(i)).stem
    return np.load(next((index.folder / "masks" / "tissue").glob(f"{stem}-*.npy")))


def draws(index, aligned: bool, n: int, seed: int = 0) -> list[tuple[int, float, int, int]]:
    ds = SlideTileDataset(index, batch_size=1, tile_size=224, mpps=list(MIX), mpp_weights=None, seed=0, rank=0,
                          world_size=1, grid_aligned=aligned)
    rng = np.random.default_rng(seed)
    return [ds.draw_tile(0, rng) for _ in range(n)]


def describe(index, locations) -> dict:
    slide, mask = index.slide(0), tissue_mask(index, 0)
    tissue, tiles = [], []
    for _, mpp, x, y in locations:
        plan = slide.plans[mpp]
        w = max(1, round(plan.footprint / slide.mask_scale))
        r, c = int(y // slide.mask_scale), int(x // slide.mask_scale)
        tissue.append(mask[r:r + w, c:c + w].mean())
        tw, th = slide.tile_grid[plan.level]
        lx, ly = x / plan.downsample, y / plan.downsample
        tiles.append((int((lx + plan.region - 1) // tw - lx // tw) + 1) * (int((ly + plan.region - 1) // th - ly // th) + 1))
    tissue = np.array(tissue)
    return {"tiles": float(np.mean(tiles)), "tissue": float(tissue.mean()), "tissue_p5": float(np.percentile(tissue, 5)),
            "below": float((tissue < THRESHOLD).mean())}


def colours(index, locations) -> np.ndarray:
    """(n, 4): mean R, G, B and the share of near-white pixels of each decoded tile."""
    reader, slide, out = TileReader("auto"), index.slide(0), []
    for _, mpp, x, y in locations:
        t = reader.read(slide, mpp, x, y, 224).astype(np.float32)
        out.append([*t.reshape(-1, 3).mean(0), (t.min(-1) >= 220).mean()])
    return np.array(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=20000)
    p.add_argument("--decoded", type=int, default=2000)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--cache", default=str(ROOT / ".cache" / "pathfm" / "bench"))
    a = p.parse_args()
    cache = Path(a.cache)
    synthetic = cache / "synthetic-40000.svs"
    if not synthetic.exists():
        write_synthetic_slide(synthetic, 40000, seed=0)
    slides = {"synthetic 40000 px": SlideEntry(str(synthetic)),
              "CMU-1-Small-Region": SlideEntry(str(Path(a.data) / "slides" / "CMU-1-Small-Region.svs")),
              "TCGA-CR-7395 (mpp 0.5)": SlideEntry(str(Path(a.data) / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"), mpp=0.5)}
    print(f"{a.draws} draws a slide and setting (mix {MIX} µm/px, 224 px, same seed), colour of the first {a.decoded}")
    print("| slide | positions | stored tiles a tile | kept where drawn | tissue share: mean / 5th pct / < 0.4 "
          "| moved, µm (mean / max) | R | G | B | near-white share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in slides.items():
        index = build_index([entry], cache / f"grid-index-{name.split()[0]}", IndexParams(224, MIX, THRESHOLD), workers=1, progress=False)
        free, aligned = draws(index, False, a.draws), draws(index, True, a.draws)
        moved = np.array([np.hypot(f[2] - g[2], f[3] - g[3]) * index.slide(0).info.mpp for f, g in zip(free, aligned)])
        kept = np.mean([f == g for f, g in zip(free, aligned)])
        rows = {}
        for label, locs in (("free", free), ("aligned", aligned)):
            d, c = describe(index, locs), colours(index, locs[:a.decoded])
            rows[label] = c
            extra = f"{moved.mean():.1f} / {moved.max():.1f}" if label == "aligned" else "-"
            share = f"{kept:.4f}" if label == "aligned" else "-"
            stats = " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(c.mean(0), c.std(0) / np.sqrt(len(c))))
            print(f"| {name} | {label} | {d['tiles']:.2f} | {share} | {d['tissue']:.3f} / {d['tissue_p5']:.3f} / "
                  f"{d['below']:.4f} | {extra} | {stats} |")
        diff = rows["aligned"].mean(0) - rows["free"].mean(0)
        se = np.sqrt(rows["aligned"].var(0) / len(rows["aligned"]) + rows["free"].var(0) / len(rows["free"]))
        print(f"| {name} | aligned - free | | | | | " + " | ".join(f"{v:+.2f} ({v / s:+.1f} se)" for v, s in zip(diff, se)) + " |")


if __name__ == "__main__":
    main()
