"""The data side of slide embedding: pathfm's grid reader against a TRIDENT / CLAM-style baseline, per core.

    OMP_NUM_THREADS=1 python bench/embed_data.py                 # about 2 minutes on 2 cores
    OMP_NUM_THREADS=1 python bench/embed_data.py --workers 2 --tiles 600

The same tiles (eval/embed_slides.py's grid of tissue tiles at --mpp, --size px, from the training index) of the same
slides (the two real slides of ../shared/data and --synthetic pathfm synthetic slides), read to uint8 tensors in a
DataLoader with --workers worker processes and batches of 64:

  pathfm    eval.embed_slides.SlideGridTiles: the JPEG-tile reader, each stored tile decoded once per batch
            (the grid is walked in 8 x 8 blocks), OpenSlide only where the file is not JPEG-tiled
  baseline  a map-style Dataset whose __getitem__ opens (once per worker) the slide with OpenSlide and calls
            read_region((x, y), level, (r, r)) for one tile, converts to RGB, resizes to --size when r differs, and
            makes a uint8 tensor: TRIDENT's and CLAM's patch loop (their float ToTensor / Normalize left out, in
            the baseline's favour)

Cost = CPU seconds of the process and its workers (getrusage, self + children), so the rate is tiles per second
per core whatever else the machine runs; the ratio of the two in one run is the number to read. Also printed: the
forward-bound rate of one GPU on paper (pathfm.flops: forward FLOPs a tile, bf16 peak of an H100 at 40% MFU) and
the cores of pathfm's data side that feed it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children (DataLoader workers, once joined)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class OpenSlideTiles:
    """The baseline: one tile per __getitem__, OpenSlide read_region, as TRIDENT's and CLAM's patch datasets."""

    def __init__(self, items, size: int):
        self.items, self.size, self.handles = items, size, {}  # items: (path, level, r, x, y)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        import openslide
        import torch
        from PIL import Image

        path, level, r, x, y = self.items[k]
        if path not in self.handles:
            self.handles[path] = openslide.OpenSlide(path)
        tile = self.handles[path].read_region((x, y), level, (r, r)).convert("RGB")
        if r != self.size:
            tile = tile.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(tile)).permute(2, 0, 1)  # (3, T, T) uint8


def timed(loader) -> tuple[int, float, float]:
    cpu, wall, n = cpu_seconds(), time.perf_counter(), 0
    for batch in loader:
        n += len(batch["tiles"]) if isinstance(batch, dict) else len(batch)
    return n, cpu_seconds() - cpu, time.perf_counter() - wall


def jpeg_tiled(path: str) -> bool:
    import openslide

    from pathfm.data.jpegtiles import JpegTiffReader

    with openslide.OpenSlide(path) as slide:
        dims = list(slide.level_dimensions)
    try:
        JpegTiffReader(path, dims).close()
        return True
    except ValueError:
        return False


def forward_bound() -> list[str]:
    from pathfm.flops import analytic_vit_flops, peak_flops_by_name
    from pathfm.vit import ViTArgs

    peak, mfu = peak_flops_by_name("H100"), 0.4
    rows = []
    for arch, patch in (("vit_small", 16), ("vit_base", 16), ("vit_large", 14), ("vit_giant2", 14)):
        args = ViTArgs(arch=arch, patch_size=patch, img_size=224)
        flops = analytic_vit_flops(args, (224 // patch) ** 2 + 1, 1)
        rows.append((f"{arch}/{patch}", flops / 1e9, peak * mfu / flops))
    return rows


def main(argv=None):
    import torch

    from eval.embed_slides import SlideGridTiles, grid_coords, threaded_batches, tile_loader
    from pathfm.data.index import IndexParams, build_index
    from pathfm.data.sampler import TileReader
    from pathfm.data.slides import read_manifest
    from pathfm.data.synthetic import ensure_synthetic_slides

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--tiles", type=int, default=400, help="tiles per slide (a seeded subset of its grid; 0: all)")
    p.add_argument("--synthetic", type=int, default=2, help="synthetic 8192 px slides (0.5 µm/px, JPEG q80)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for both")
    p.add_argument("--threads", type=int, default=0, help="pathfm reads on this many threads of its process instead "
                   "of DataLoader workers (eval.embed_slides --read-threads); the baseline keeps --workers")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both (the best round of each is kept)")
    p.add_argument("--jpeg-only", action="store_true", help="only the slides with JPEG-tiled levels (TCGA's usual "
                   "Aperio SVS); without it, also the JPEG 2000 TCGA slide, which both read with OpenSlide")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    slides = [(str(DATA / "slides" / "CMU-1-Small-Region.svs"), ""), (str(DATA / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"), "0.5")]
    slides += [(str(s), "") for s in ensure_synthetic_slides(ROOT / ".cache" / "pathfm" / "bench", a.synthetic, 8192, 11)]
    if a.jpeg_only:
        slides = [(s, m) for s, m in slides if jpeg_tiled(s)]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.csv"
        manifest.write_text("path,mpp\n" + "".join(f"{s},{m}\n" for s, m in slides))
        index = build_index(read_manifest(manifest), Path(tmp) / "index", IndexParams(a.size, (a.mpp,), 0.4),
                            workers=1, progress=False, timeout_s=0)
        jobs = list(range(len(index)))
        items = []
        for i in jobs:
            view = index.slide(i)
            _, _, _, r, _ = TileReader.region(view, a.mpp, 0, 0, a.size)
            level = view.plans[a.mpp].level
            for x, y in grid_coords(index, i, a.mpp, a.size, a.tiles or None).tolist():
                items.append((index.path(i), level, r, x, y))
        ours_ds = SlideGridTiles(index, jobs, a.mpp, a.size, 64, a.tiles or None)
        base_ds = OpenSlideTiles(items, a.size)
        results = {"pathfm": [], "baseline": []}
        for _ in range(a.rounds):
            results["pathfm"].append(timed(threaded_batches(ours_ds, a.threads) if a.threads else
                                           tile_loader(ours_ds, a.workers)))
            results["baseline"].append(timed(torch.utils.data.DataLoader(base_ds, batch_size=64, num_workers=a.workers)))
    load = open("/proc/loadavg").read().strip()
    print(f"{len(items)} tiles of {len(slides)} slides ({', '.join(Path(s).name for s, _ in slides)}) at {a.mpp} µm/px, "
          f"{a.size} px, {a.workers} worker(s){f', pathfm on {a.threads} thread(s)' if a.threads else ''}; load {load}")
    best = {}
    for name, runs in results.items():
        assert all(n == len(items) for n, _, _ in runs), (name, [n for n, _, _ in runs], len(items))
        rates = [n / cpu for n, cpu, _ in runs]
        best[name] = max(rates)
        print(f"  {name:9s} tiles per CPU-second: " + ", ".join(f"{r:.0f}" for r in rates)
              + "   wall tiles/s: " + ", ".join(f"{n / w:.0f}" for n, _, w in runs))
    ratio = best["pathfm"] / best["baseline"]
    print(f"  ratio pathfm / baseline, per core (best rounds): {ratio:.2f}x")
    print("forward-bound rate per GPU on paper (H100 bf16 989 TFLOP/s at 40% MFU; pathfm.flops), and the cores of "
          "pathfm's data side that feed it:")
    for name, gflops, rate in forward_bound():
        print(f"  {name:14s} {gflops:7.1f} GFLOP/tile  {rate:8.0f} tiles/s  {rate / best['pathfm']:6.1f} cores")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"embed_data{'_jpeg' if a.jpeg_only else ''}.json").write_text(json.dumps({"tiles": len(items), "args": vars(a), "loadavg": load,
                                                     "per_core": best, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
