"""Data pipeline throughput on a synthetic 40000 x 40000 JPEG slide (CPU), and the same path at cohort
scale (hard-linked copies of that slide: distinct slides to pathfm, one file in the page cache).

    python bench/data.py [--size 40000] [--seconds 5] [--batch 32] [--rounds 1] [--no-cohort] [--rows full,baseline]
    python bench/data.py --phases     # where a full sample's CPU time goes (reading, multi-crop and its ops, masks)

Rows, each measured in 1 process and in 2 worker processes (fork, 1 torch thread each); with --rounds N
the whole table is measured N times, rows alternating, and the medians are printed; "per CPU-second" is
the 1-process rate over the CPU time it used, a per-core rate that a loaded machine distorts less:
  raw decode      stored 256 px JPEG tiles at sampled tissue positions, bytes in memory,
                  simplejpeg: the limit for any reader
  openslide 224/256  OpenSlide read_region of random tissue regions at level 0
  pathfm tiles    SlideTileDataset batches, JPEG fast path, grid-aligned, 224 px at 0.5 µm/px
  pathfm tiles mix   the same, magnification mix 0.5/1/2 µm/px, at the defaults (auto reader; grid_aligned, the
                  default since issue 31: every magnification snapped to the stored-tile grid)
  ... free positions  the mix with grid_aligned=False (the default before issue 31: unaligned draws)
  ... full decodes   the mix at free positions as before issue 22: 1 µm/px tiles from full-size decodes + resize
  full samples    pathfm tiles (mix, defaults) + MultiCrop (2 x 224 + 8 x 96) + iBOT masks (pathfm.data.loader.Views)
  ... free positions  the same with grid_aligned=False (the previous default)
  ... torch colour   the same with augment.OPENCV = False: MultiCrop's torch hue, blur, flips and tile transposes
                  (before OpenCV)
  ... unmapped    the same with glibc's default allocator thresholds (before issue 31): every batch
                  page-faults its views in afresh (sampler.keep_freed_memory, which loader workers call)
  baseline        OpenSlide read + torchvision/PIL DINOv2-style multi-crop, one sample at a time
Cohort rows (bench/cohort.py): index build rate (1 and 2 processes, cold masks), start-up time and
resident memory of a rank with an index of 1, 1,000 and 100,000 slides, tiles/s of one worker at
1, 100 and 10,000 slides from its first batch, and the files it opened per tile.
The slide is written once to .cache/pathfm/bench and reused. Every row runs in processes forked for it, stand-ins
for loader workers (they call sampler.keep_freed_memory as workers do). The SUMMARY lines at the end give each
target (issue 31: full samples / baseline >= 5x in 1 process; mix / grid-aligned >= 0.5; both at the defaults, and the
first also at free positions, the previous default) with pass or fail and the load average: a run at load above 1.5
does not count. --rows NAME,NAME runs only the rows whose names contain one; --one-process skips the 2-process
column, whose two processes alone lift a 2-core machine's load average to about 1.6.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pathfm.data.jpegtiles import JpegTiffReader  # noqa: E402
from pathfm.data.index import IndexParams, build_index  # noqa: E402
from pathfm.data.sampler import SlideTileDataset, keep_freed_memory  # noqa: E402
from pathfm.data.slides import SlideEntry  # noqa: E402
from pathfm.data.synthetic import write_synthetic_slide  # noqa: E402

MIX = [0.5, 1.0, 2.0]
STATE = {}  # filled in main() before the fork: prepared slides and arguments


def rate(fn, seconds: float) -> tuple[float, float]:
    """(items per second, items per CPU-second) of fn() (which returns how many items it made), after one
    warm-up call."""
    fn()
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        n += fn()
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)


def tile_dataset(**kw):
    args = dict(batch_size=STATE["batch"], tile_size=224, mpps=MIX, mpp_weights=None,
                seed=os.getpid(), rank=0, world_size=1)
    return SlideTileDataset(STATE["index"], **{**args, **kw})


def bench_raw_decode(seconds):
    import simplejpeg
    ds = tile_dataset(mpps=[0.5], grid_aligned=True)
    reader = JpegTiffReader(str(STATE["path"]), STATE["index"].slide(0).info.dimensions)
    rng = np.random.default_rng(os.getpid())
    blobs = []
    for _ in range(256):  # the stored tiles pathfm would decode, read into memory once
        _, _, x, y = ds.draw(rng)
        blobs.append(reader.tile_bytes(0, x // 256, y // 256))
    it = iter(range(1 << 62))
    return rate(lambda: simplejpeg.decode_jpeg(blobs[next(it) % len(blobs)]) is not None, seconds)


def bench_openslide(size):
    def run(seconds):
        import openslide
        slide = openslide.OpenSlide(str(STATE["path"]))
        # free positions, as a DINOv2-style loader draws them
        ds, rng = tile_dataset(mpps=[0.5], grid_aligned=False), np.random.default_rng(os.getpid())

        def one():
            _, _, x, y = ds.draw(rng)
            np.asarray(slide.read_region((x, y), 0, (size, size)))[..., :3].copy()
            return 1
        return rate(one, seconds)
    return run


def bench_pathfm(before=False, **kw):
    def run(seconds):
        import pathfm.data.sampler as sampler
        if before:  # issue 22's "before": a 1 µm/px tile from full-size decodes of level 0 + an antialiased resize
            sampler.decode_scale = lambda region, size: 1
        ds, step = tile_dataset(**kw), iter(range(1 << 62))
        return rate(lambda: len(ds.batch(next(step))["tiles"]), seconds)
    return run


def multicrop_transform():
    """The trainer's own views: DINOv2 multi-crop (2 x 224 + 8 x 96) and iBOT masks for the global crops."""
    from pathfm.config import Config
    from pathfm.data.loader import Views
    from pathfm.plan import make_plan

    cfg = Config()
    cfg.model.patch_size = 14
    return Views(cfg, make_plan(cfg))  # DINOv2: iBOT masks on the global crops


def bench_full(opencv=True, unmapped=False, **kw):
    def run(seconds):
        from pathfm.data import augment
        augment.OPENCV = opencv
        ds, step = tile_dataset(transform=multicrop_transform(), **kw), iter(range(1 << 62))
        return rate(lambda: len(ds.batch(next(step))["tiles"]["global_crops"]) // 2, seconds)
    run.glibc_defaults = unmapped  # _single and _worker leave this row's processes with glibc's allocator defaults
    return run


def torchvision_multicrop():
    """DINOv2's reference augmentation written with torchvision transforms on PIL images."""
    from torchvision import transforms as T
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
    norm = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    blur = lambda p: T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)
    flip_color = [T.RandomHorizontalFlip(), jitter, T.RandomGrayscale(0.2)]
    crop = lambda size, scale: T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    g1 = T.Compose([crop(224, (0.32, 1.0)), *flip_color, blur(1.0), norm])
    g2 = T.Compose([crop(224, (0.32, 1.0)), *flip_color, blur(0.1), T.RandomSolarize(128, p=0.2), norm])
    loc = T.Compose([crop(96, (0.05, 0.32)), *flip_color, blur(0.5), norm])
    return lambda img: ([g1(img), g2(img)], [loc(img) for _ in range(8)])


def bench_baseline(seconds):
    import openslide
    from PIL import Image
    slide = openslide.OpenSlide(str(STATE["path"]))
    ds, rng, augment = tile_dataset(grid_aligned=False), np.random.default_rng(os.getpid()), torchvision_multicrop()

    def one():
        index, mpp, x, y = ds.draw(rng)
        plan = STATE["index"].slide(index).plans[mpp]
        img = slide.read_region((x, y), plan.level, (plan.region, plan.region)).convert("RGB")
        augment(img.resize((224, 224), Image.BILINEAR))
        return 1
    return rate(one, seconds)


def phases(batches: int = 20, warmup: int = 4) -> None:
    """Where a full sample's CPU time goes (--phases): time.process_time around reading the tiles, MultiCrop and the
    iBOT masks, in this process with 1 torch thread, and inside MultiCrop around each op (wrapped in place; the
    uint8 -> float copy, the normalisation and the loop are what render has left), at the defaults and at free positions."""
    import collections
    from pathfm.data import augment
    from pathfm.data.masking import block_masks

    torch.set_num_threads(1)
    keep_freed_memory()
    spent = collections.Counter()

    def timed(owner, name, label):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - start
        setattr(owner, name, wrapper)

    inner = {"resized_crops": "resized crops", "flips": "flips", "transposed_tiles": "transposed tiles",
             "adjust_hue": "hue rotation", "gaussian_blur": "blur", "adjust_brightness": "brightness",
             "adjust_contrast": "contrast", "adjust_saturation": "saturation", "solarize": "solarisation"}
    for name, label in inner.items():
        timed(augment, name, label)
    timed(augment.MultiCrop, "_colour", "colour ops (all)")
    timed(augment.MultiCrop, "render", "render (all)")
    views = multicrop_transform()
    for where, kw in (("defaults", {}), ("free positions", dict(grid_aligned=False))):
        ds, rows = tile_dataset(**kw), collections.Counter()
        for step in range(warmup + batches):
            spent.clear()
            t0 = time.process_time()
            tiles = ds.batch(step)["tiles"]
            t1 = time.process_time()
            generator = torch.Generator().manual_seed(step)
            out = views.multicrop.apply(tiles, views.multicrop.sample_params(len(tiles), tiles.shape[2], tiles.shape[3],
                                                                              generator))
            t2 = time.process_time()
            block_masks(len(out["global_crops"]), views.grid, *views.mask_args, generator)
            t3 = time.process_time()
            if step >= warmup:
                rows.update({"reading the tiles": t1 - t0, "multi-crop": t2 - t1, "iBOT masks": t3 - t2, **spent})
        n = batches * STATE["batch"]
        total = rows["reading the tiles"] + rows["multi-crop"] + rows["iBOT masks"]
        rest = rows["render (all)"] - rows["colour ops (all)"] - sum(rows[k] for k in ("resized crops", "flips"))
        print(f"\n| a full sample's CPU time, {where} ({batches} batches of {STATE['batch']}, 1 thread, "
              f"load average {os.getloadavg()[0]:.1f}) | ms | share |\n|---|---|---|")
        for label, v in [("reading the tiles", rows["reading the tiles"]), ("multi-crop", rows["multi-crop"]),
                         *((f"... {k}", rows[k]) for k in ("resized crops", "flips", "transposed tiles", "colour ops (all)")),
                         *((f"... ... {k}", rows[k]) for k in ("hue rotation", "blur", "contrast", "saturation", "brightness",
                                                             "solarisation")),
                         ("... uint8 -> float copy, normalisation, loop", rest),
                         ("iBOT masks", rows["iBOT masks"]), ("total", total)]:
            print(f"| {label} | {1e3 * v / n:.3f} | {100 * v / total:.0f}% |")


def _worker(args):
    row, seconds = args  # the row's function is found in the forked copy of STATE (closures do not pickle)
    torch.set_num_threads(1)
    if not getattr(STATE["rows"][row][2], "glibc_defaults", False):
        keep_freed_memory()
    return STATE["rows"][row][2](seconds)[0]


def measure(row, seconds, two=True):
    """(rate in one process, its rate per CPU-second, summed rate of 2 processes running at once; NaN without
    `two`), each in fresh forked processes, so that a row's module switches (decode_scale, augment.OPENCV) stay
    in its row."""
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        torch.set_num_threads(1)
        single, per_cpu = pool.apply(_single, (row, seconds))
    if not two:
        return single, per_cpu, float("nan")
    with ctx.Pool(2) as pool:
        double = sum(pool.map(_worker, [(row, seconds)] * 2))
    return single, per_cpu, double


def _cell(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"  # NaN: the 2-process column under --one-process


def _single(row, seconds):
    torch.set_num_threads(1)
    if not getattr(STATE["rows"][row][2], "glibc_defaults", False):
        keep_freed_memory()
    return STATE["rows"][row][2](seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=40000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="measure the table this many times; medians")
    parser.add_argument("--cache", default=".cache/pathfm/bench")
    parser.add_argument("--no-cohort", action="store_true", help="only the single-slide rows")
    parser.add_argument("--build-slides", type=int, default=8, help="slides indexed for the build rate")
    parser.add_argument("--rows", default="", help="comma-separated parts of row names: only those rows")
    parser.add_argument("--phases", action="store_true", help="only where a full sample's CPU time goes, by phase")
    parser.add_argument("--one-process", action="store_true", help="skip the 2-process column: on 2 cores its two "
                        "processes lift the load average to about 1.6, over the 1.5 a target's timing may run at")
    args = parser.parse_args()
    path = Path(args.cache) / f"synthetic-{args.size}.svs"
    if not path.exists():
        start = time.perf_counter()
        write_synthetic_slide(path, args.size, seed=0)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
    index = build_index([SlideEntry(str(path))], Path(args.cache) / f"index-{args.size}", IndexParams(224, tuple(MIX), 0.4),
                        workers=1, mask_dir=Path(args.cache) / "masks", progress=False)
    STATE.update(index=index, path=path, batch=args.batch)
    if args.phases:
        return phases()
    rows = [("raw JPEG decode (256 px stored tiles)", "tiles/s", bench_raw_decode),
            ("OpenSlide read_region 224 px", "regions/s", bench_openslide(224)),
            ("OpenSlide read_region 256 px", "regions/s", bench_openslide(256)),
            ("pathfm tiles, 0.5 µm/px grid-aligned (jpeg)", "tiles/s", bench_pathfm(mpps=[0.5], grid_aligned=True)),
            ("pathfm tiles, mix 0.5/1/2 µm/px (defaults: grid-aligned)", "tiles/s", bench_pathfm()),
            ("... mix at free positions (the default before)", "tiles/s", bench_pathfm(grid_aligned=False)),
            ("... mix at free positions, full decodes + resize (before)", "tiles/s",
             bench_pathfm(before=True, grid_aligned=False)),
            ("full samples: pathfm mix + MultiCrop (defaults)", "samples/s", bench_full()),
            ("... full samples at free positions (the default before)", "samples/s", bench_full(grid_aligned=False)),
            ("... torch colour ops (before)", "samples/s", bench_full(opencv=False)),
            ("... freed memory unmapped (before)", "samples/s", bench_full(unmapped=True)),
            ("baseline: OpenSlide + torchvision multi-crop", "samples/s", bench_baseline)]
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    rows = [r for r in rows if not wanted or any(w in r[0] for w in wanted)]
    STATE["rows"] = rows
    got, loads = {}, [os.getloadavg()[0]]
    for r in range(args.rounds):
        for row, (name, unit, _) in enumerate(rows):
            got.setdefault(name, []).append(measure(row, args.seconds, not args.one_process))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: {name}: " + ", ".join(f"{x:.0f}" for x in got[name][-1]) + f" (load {loads[-1]:.1f})",
                  file=sys.stderr, flush=True)
    results = {name: [statistics.median(v) for v in zip(*runs)] for name, runs in got.items()}
    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"\n| {args.size} px synthetic slide, {os.cpu_count()} CPUs, median of {args.rounds}, {load} | unit | 1 process | "
          "1 process, per CPU-second | 2 processes |")
    print("|---|---|---|---|---|")
    for name, unit, _ in rows:
        print(f"| {name} | {unit} | " + " | ".join(_cell(x, 0) for x in results[name]) + " |")
    ratios = []  # (what, ratios of the three columns, target or None)
    for what, a, b, target in [("grid-aligned tiles / raw decode limit", "grid-aligned (jpeg)", "raw JPEG", None),
                               ("mix tiles / raw decode limit", "mix 0.5/1/2", "raw JPEG", None),
                               ("mix / grid-aligned", "mix 0.5/1/2", "grid-aligned (jpeg)", 0.5),
                               ("mix at free positions / grid-aligned", "mix at free positions (the", "grid-aligned (jpeg)", None),
                               ("mix before (full decodes) / grid-aligned", "full decodes", "grid-aligned (jpeg)", None),
                               ("full samples / baseline", "full samples: pathfm", "baseline", 5.0),
                               ("full samples at free positions / baseline", "full samples at free", "baseline", 5.0),
                               ("full samples before OpenCV / baseline", "torch colour", "baseline", None),
                               ("full samples, freed memory unmapped (before) / baseline", "unmapped", "baseline", None)]:
        top = next((n for n, _, _ in rows if a in n), None)
        bottom = next((n for n, _, _ in rows if b in n), None)
        if top and bottom:
            ratios.append((what, [x / y for x, y in zip(results[top], results[bottom])], target))
    print("\nratios (1 process / per CPU-second / 2 processes):")
    for what, values, _ in ratios:
        print(f"- {what}: " + " / ".join(_cell(v, 2) for v in values))
    counts = "" if max(loads) <= 1.5 else "; load above 1.5: does not count"
    for what, values, target in ratios:
        if target is not None:
            two = "" if args.one_process else f", 2 processes {values[2]:.2f}"
            print(f"SUMMARY data {what}, 1 process: {values[0]:.2f} (per CPU-second {values[1]:.2f}{two}); "
                  f"target >= {target:g}: {'PASS' if values[0] >= target else 'FAIL'}; {load}{counts}")
    if not args.no_cohort:
        from cohort import cohort_rows

        cohort_rows(path, Path(args.cache) / "cohort", seconds=args.seconds, batch=args.batch, build_slides=args.build_slides)


if __name__ == "__main__":
    main()
