"""Cohort-scale rows of bench/data.py: the slide index and the sampler with 10^2-10^5 slides.

    python bench/data.py --seconds 4              # prints these rows after the single-slide table
    python bench/cohort.py --seconds 4            # only these rows
    python bench/cohort.py --costs                # µs a tile: draw, cell, JPEG decode in and out of a batch

Stand-ins, as the issue allows: hard-linked copies of one synthetic 40000 x 40000 px slide at 0.5 µm/px
(2 x 2 cm, the size of a TCGA diagnostic slide), each a distinct slide to pathfm while the bytes stay in
the page cache, so what is measured is pathfm's own per-slide bookkeeping, not disk I/O.
- build rate: really built, cold masks (a fresh mask cache), 1 and 2 processes;
- 1,000- and 10,000-slide indexes: the journal of a build holds one record per link, copied from the
  real record of the slide (describing 10,000 links would recompute the same mask 10,000 times),
  then merged by the real merge;
- the 100,000-slide index: its tables (slides, levels, plans, segments, paths) are real size, but all
  its slides share one copy of the runs (100,000 copies would be 18 GB here); start-up and the tables'
  memory are measured as they are, the pages a long run touches are measured on the 10,000-slide index.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pathfm.data import index as I  # noqa: E402
from pathfm.data.sampler import SlideTileDataset  # noqa: E402
from pathfm.data.slides import SlideEntry  # noqa: E402

MIX = (0.5, 1.0, 2.0)
PARAMS = I.IndexParams(224, MIX, 0.4)


def links(src: Path, folder: Path, n: int) -> list[Path]:
    """n hard links to src (made once)."""
    folder = folder.resolve()  # absolute: the manifest's rows must read back as the same paths
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"slide-{i:06d}.svs"
        if not p.exists():
            os.link(src, p)
        out.append(p)
    return out


def write_manifest(paths: list[Path], path: Path) -> list[SlideEntry]:
    path.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return [SlideEntry(str(p)) for p in paths]


def build_rate(src: Path, work: Path, n: int, workers: int) -> float:
    """Slides/s of a real build of n links with cold masks."""
    entries = [SlideEntry(str(p)) for p in links(src, work / "build-links", n)]
    out, masks = work / f"build-{workers}", work / f"build-masks-{workers}"
    for d in (out, masks):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    start = time.perf_counter()
    I.build_index(entries, out, PARAMS, workers=workers, mask_dir=masks, progress=False)
    return n / (time.perf_counter() - start)


def from_record(record: dict, entries: list[SlideEntry], out: Path) -> I.SlideIndex:
    """The index a build of `entries` would make if every slide were the one `record` describes."""
    if (out / "index.json").exists():
        return I.SlideIndex(out)
    parts = I.prepare_parts(out, PARAMS, I.manifest_identity(entries))
    with open(parts / "copies.journal", "wb") as f:
        for row, e in enumerate(entries):
            I.write_record(f, {**record, "row": row, "path": e.path})
    return I.merge_parts(entries, out, PARAMS)


def shared_runs(small: I.SlideIndex, entries: list[SlideEntry], out: Path) -> Path:
    """A len(entries)-slide index whose slides all point at the one-slide index's runs (see the docstring)."""
    if (out / "index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    n = len(entries)
    slides = np.repeat(np.asarray(small.slides[:1]), n)
    paths = [e.path.encode() for e in entries]
    starts = np.cumsum([0] + [len(p) for p in paths])
    slides["row"], slides["path_start"], slides["path_len"] = np.arange(n), starts[:-1], np.diff(starts)
    n_levels = int(small.slides[0]["n_levels"])
    slides["level_start"] = np.arange(n) * n_levels
    arrays = {"slides.npy": slides, "levels.npy": np.tile(np.asarray(small.levels[:n_levels]), n),
              "plans.npy": np.repeat(np.asarray(small.plans[:1]), n, 0),
              "segments.npy": np.repeat(np.asarray(small.segments[:1]), n, 0),
              "runs.npy": np.asarray(small.runs), "ends.npy": np.asarray(small.ends)}
    for name, a in arrays.items():
        np.save(out / name, a)
    (out / "paths.bin").write_bytes(b"".join(paths))
    (out / "unusable.csv").write_text("row,path,reason\n")
    meta = {**small.meta, "slides": n, "path_bytes": int(starts[-1]),
            "manifest": {"path": "", "rows": n, "sha256": I.manifest_identity(entries)}}
    (out / "index.json").write_text(json.dumps(meta))
    return out


STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from pathfm.data.index import IndexParams, SlideIndex, manifest_identity
from pathfm.data.sampler import SlideTileDataset
from pathfm.data.slides import read_manifest
def rss():
    f = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(f[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
folder, manifest = sys.argv[1], sys.argv[2]
t1, before = time.perf_counter(), rss()
index = SlideIndex(folder)
index.check(IndexParams(224, (0.5, 1.0, 2.0), 0.4), manifest_identity(read_manifest(manifest)) if manifest else None)
ds = SlideTileDataset(index, batch_size=64, tile_size=224, mpps=[0.5, 1.0, 2.0], mpp_weights=None, seed=0, rank=0,
                      world_size=1)
rng = np.random.default_rng(0)
for _ in range(64):
    ds.draw(rng)
t2, ready = time.perf_counter(), rss()
for _ in range(10000):
    ds.draw(rng)
after = rss()
print(json.dumps({"imports_s": t1 - t0, "ready_s": t2 - t1, "ready": {k: ready[k] - before[k] for k in before},
                  "after_10k_draws": {k: after[k] - before[k] for k in before}}))
"""


def startup(folder: Path, manifest: Path | None) -> dict:
    """A fresh process: open the index (and check it against the manifest), make the dataset, draw;
    MB of resident memory it added: private (RssAnon) and mapped file pages (RssFile, shared)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", STARTUP, str(folder), str(manifest or "")], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def tile_rate(index: I.SlideIndex, seconds: float, batch: int, seed: int) -> tuple[float, float]:
    """(tiles/s of a fresh worker from its very first batch, files opened per tile)."""
    ds = SlideTileDataset(index, batch_size=batch, tile_size=224, mpps=list(MIX), mpp_weights=None, seed=seed, rank=0,
                          world_size=1)
    n, step, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(ds.batch(step)["tiles"])
        step += 1
    return n / (time.perf_counter() - start), ds.reader.opens / n


def interleaved_rates(indexes: dict, seconds: float, batch: int, rounds: int = 5) -> dict:
    """Median over `rounds` rounds, each measuring every index in turn for seconds / rounds, so a
    loaded machine slows all of them alike and their ratio holds."""
    got = {n: [] for n in indexes}
    for r in range(rounds):
        for n, index in indexes.items():
            got[n].append(tile_rate(index, seconds / rounds, batch, seed=r))
    return {n: (float(np.median([g[0] for g in v])), float(np.median([g[1] for g in v]))) for n, v in got.items()}


def cohort_rows(src: Path, work: Path, *, seconds: float, batch: int, build_slides: int = 8) -> dict:
    import torch

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    print(f"\n| cohort scale ({src.name}, hard links) | value |\n|---|---|")
    for workers in (1, 2):
        results[f"build_{workers}"] = build_rate(src, work, build_slides, workers)
        print(f"| index build, {build_slides} slides, cold masks, {workers} process(es) | "
              f"{results[f'build_{workers}']:.2f} slides/s |", flush=True)
    print(f"| index build speed-up, 2 vs 1 process | {results['build_2'] / results['build_1']:.2f}x |")
    record = I.describe_slide(0, SlideEntry(str(src)), PARAMS, str(work / "build-masks-1"))
    sizes = {}
    for n in (1, 100, 1000, 10000):
        entries = write_manifest(links(src, work / "links", n), work / f"manifest-{n}.csv")
        sizes[n] = from_record(record, entries, work / f"index-{n}")
    entries = write_manifest([(work / "links").resolve() / f"virtual-{i:06d}.svs" for i in range(100000)],
                             work / "manifest-100000.csv")
    folders = {n: sizes[n].folder for n in (1, 1000, 10000)} | {100000: shared_runs(sizes[1], entries, work / "index-100000")}
    for n, folder in folders.items():
        disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
        r = startup(folder, work / f"manifest-{n}.csv")
        results[f"startup_{n}"] = r
        print(f"| {n:,} slides: ready to sample (open + check vs manifest + dataset + 64 draws) | {r['ready_s']:.2f} s "
              f"(imports {r['imports_s']:.1f} s) |")
        print(f"| {n:,} slides: memory added, ready / after 10k draws (private + mapped file) | "
              f"{r['ready']['RssAnon']:.0f} + {r['ready']['RssFile']:.0f} MB / {r['after_10k_draws']['RssAnon']:.0f} + "
              f"{r['after_10k_draws']['RssFile']:.0f} MB; index {disk:,.0f} MB on disk |", flush=True)
    rates = interleaved_rates({n: sizes[n] for n in (1, 100, 10000)}, 3 * seconds, batch)
    for n, (rate, opens) in rates.items():
        results[f"tiles_{n}"] = (rate, opens)
        print(f"| {n:,} slides: tiles/s of one fresh worker, median of 5 interleaved rounds (files opened per tile) | "
              f"{rate:.0f} ({opens:.3f}) |", flush=True)
    print(f"| tile rate 10,000 / 1 slide | {results['tiles_10000'][0] / results['tiles_1'][0]:.2f}x |")
    return results


def per_tile_costs(src: Path, work: Path, batch: int = 32, n: int = 2000) -> dict:
    """µs of pathfm's own work per tile (a draw, a cell) and of one JPEG decode: in a tight loop over
    the same bytes, and inside the batch loop (timed around each call), for the 0.5 µm/px aligned row."""
    import simplejpeg

    from pathfm.data import jpegtiles

    index = I.build_index([SlideEntry(str(src))], work / "index-costs", I.IndexParams(224, (0.5,), 0.4), workers=1,
                          mask_dir=work / "build-masks-1", progress=False)
    ds = SlideTileDataset(index, batch_size=batch, tile_size=224, mpps=[0.5], mpp_weights=None, seed=0, rank=0,
                          world_size=1, grid_aligned=True, reader="jpeg")
    ds.batch(0)
    rng = np.random.default_rng(0)

    def us(fn, reps=n):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6

    out = {"draw_tile": us(lambda: ds.draw_tile(0, rng)), "cell": us(lambda: index.cell(0, 0, rng))}
    reader = ds.reader.handles[index.path(0)]
    blobs = [reader.tile_bytes(0, x // 256, y // 256) for _, _, x, y in (ds.draw(rng) for _ in range(n))]
    it = iter(blobs)
    out["decode_tight"] = us(lambda: simplejpeg.decode_jpeg(next(it), colorspace="RGB"), len(blobs))
    spent, calls, real = [0.0], [0], jpegtiles.JpegTiffReader.decode_tile

    def timed(self, *a):
        start = time.perf_counter()
        result = real(self, *a)
        spent[0] += time.perf_counter() - start
        calls[0] += 1
        return result

    jpegtiles.JpegTiffReader.decode_tile = timed
    try:
        out["tile_in_batch"] = us(lambda: ds.batch(1 + calls[0]), n // batch) / batch
        out["decode_in_batch"] = spent[0] / calls[0] * 1e6
    finally:
        jpegtiles.JpegTiffReader.decode_tile = real
    print("\n| µs a tile (0.5 µm/px, grid-aligned, jpeg) | value |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v:.1f} |")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=40000)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache", default=".cache/pathfm/bench")
    p.add_argument("--build-slides", type=int, default=8)
    p.add_argument("--costs", action="store_true", help="only the per-tile cost split (draw, decode in and out of a batch)")
    a = p.parse_args()
    slide = Path(a.cache) / f"synthetic-{a.size}.svs"
    if not slide.exists():
        from pathfm.data.synthetic import write_synthetic_slide

        write_synthetic_slide(slide, a.size, seed=0)
    if a.costs:
        per_tile_costs(slide, Path(a.cache) / "cohort", a.batch)
    else:
        cohort_rows(slide, Path(a.cache) / "cohort", seconds=a.seconds, batch=a.batch, build_slides=a.build_slides)
