"""What reading ahead costs the decoding thread: variants of one worker's aligned 0.5 µm/px stream, alternated in one
process, against the page cache read in turn; and what a slide's open costs at +5 ms a read.

    python bench/readahead_cost.py [--rounds 3] [--seconds 3]
    python bench/readahead_cost.py --only "+5 ms" --rounds 1 --seconds 8     # e.g. under `perf record -g`
    python bench/readahead_cost.py --opens                                    # JpegTiffReader opens, by buffer size

Rows (bench/storage.py's worker, `tiles_per_s`, and its FUSE mount adding 5 ms to every read; bench/data.py's
synthetic 40000 px slide): the page cache read in turn (the reference); the page cache with reading ahead forced on
(reads take microseconds, so what it adds is the read-ahead machinery itself); +5 ms with the defaults; +5 ms with
`sys.setswitchinterval` 0.2 ms and 50 ms (the GIL's hand-over); +5 ms with read threads sized to 1.2x and 0.9x
latency x decode rate instead of one a read in flight (a thread that ends a read then finds the next one queued and
does not sleep); +5 ms after `gc.freeze()`. Medians over --rounds; the decoding thread's CPU a tile is the figure
(bench/storage.py's last column), the wall rate beside it. --opens times 3 opens of the slide through the mount with
the TIFF directories read through the file's own block size, 64 KB (jpegtiles.DIRECTORY_READ) and 1 MB.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import storage  # noqa: E402
from pathfm.data import jpegtiles, sampler  # noqa: E402
from pathfm.data.index import IndexParams, build_index  # noqa: E402
from pathfm.data.slides import SlideEntry  # noqa: E402

AHEAD = dict(read_ahead_bytes=16 << 20, read_threads=128)


def fewer_threads(fraction: float):
    """_Threads.run with the read threads capped at fraction x latency / decode time a draw + 2."""
    real = sampler._Threads.run

    def run(self, fn, args, threads):
        ahead = getattr(fn, "__self__", None)
        if isinstance(ahead, sampler.ReadAhead) and fn.__name__ == "timed":
            threads = min(threads, max(2, math.ceil(fraction * math.exp(ahead.log_latency) / ahead.busy) + 2))
        return real(self, fn, args, threads)
    return run


def variants(index, slow):
    """name -> (index, dataset arguments, setup, undo)."""
    keep = (sampler.SLOW_READ_S, sys.getswitchinterval(), sampler._Threads.run)

    def undo():
        sampler.SLOW_READ_S, _, sampler._Threads.run = keep
        sys.setswitchinterval(keep[1])
        gc.unfreeze()

    def set_(slow_read=None, interval=None, run=None, freeze=False):
        def setup():
            if slow_read is not None:
                sampler.SLOW_READ_S = slow_read
            if interval is not None:
                sys.setswitchinterval(interval)
            if run is not None:
                sampler._Threads.run = run
            if freeze:
                gc.freeze()
        return setup

    return {"page cache, in turn": (index, dict(read_ahead_bytes=0), set_(), undo),
            "page cache, reading ahead forced": (index, AHEAD, set_(slow_read=0.0), undo),
            "+5 ms, defaults": (slow, AHEAD, set_(), undo),
            "+5 ms, switch interval 0.2 ms": (slow, AHEAD, set_(interval=2e-4), undo),
            "+5 ms, switch interval 50 ms": (slow, AHEAD, set_(interval=0.05), undo),
            "+5 ms, read threads 1.2x latency x rate": (slow, AHEAD, set_(run=fewer_threads(1.2)), undo),
            "+5 ms, read threads 0.9x latency x rate": (slow, AHEAD, set_(run=fewer_threads(0.9)), undo),
            "+5 ms, gc.freeze()": (slow, AHEAD, set_(freeze=True), undo)}


def opens(slide: Path, dimensions, repeats: int = 3) -> None:
    for name, buffering in (("the file's block", -1), ("64 KB (default)", 64 << 10), ("1 MB", 1 << 20)):
        jpegtiles.DIRECTORY_READ, times = buffering, []
        for _ in range(repeats):
            start = time.perf_counter()
            jpegtiles.JpegTiffReader(str(slide), dimensions).close()
            times.append(time.perf_counter() - start)
        print(f"| open at +5 ms a read, directories through {name} | " + ", ".join(f"{1000 * t:.0f}" for t in times) + " ms |")
    jpegtiles.DIRECTORY_READ = 64 << 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--only", default="", help="only the rows whose names contain this")
    parser.add_argument("--opens", action="store_true", help="time a slide's open at +5 ms instead")
    parser.add_argument("--cache", default=".cache/pathfm/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache).resolve()
    slides, name = cache / "slides", "synthetic-40000.svs"
    if not (slides / name).exists():
        raise SystemExit(f"bench/readahead_cost.py: no {slides / name}; run `python bench/storage.py` once first")
    index = build_index([SlideEntry(str(slides / name))], cache / "index-storage-40000",
                        IndexParams(224, tuple(storage.MIX), 0.4), workers=1, mask_dir=cache / "masks", progress=False)
    point = cache / "mnt-cost-5ms"
    storage.mount(storage.build_slowfs(cache), slides, point, 5.0)
    try:
        if args.opens:
            return opens(point / name, index.slide(0).info.dimensions)
        rows = {k: v for k, v in variants(index, storage.MountedIndex(index, slides, point)).items() if args.only in k}
        got, loads = {}, [os.getloadavg()[0]]
        for r in range(args.rounds):
            for row, (idx, kw, setup, undo) in rows.items():
                setup()
                try:
                    m = storage.tiles_per_s(idx, args.seconds, 32, mpps=[0.5], grid_aligned=True, reader="jpeg", **kw)
                finally:
                    undo()
                got.setdefault(row, []).append(m)
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}: {row}: {m[0]:.0f} tiles/s, decoding thread {1e6 / m[4]:.0f} µs a tile "
                      f"(load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    finally:
        storage.unmount(point)
    print(f"\n| aligned 0.5 µm/px, one worker (median of {args.rounds}, load average {min(loads):.1f}-{max(loads):.1f}) "
          "| tiles/s | decoding thread, µs of CPU a tile | process, µs of CPU a tile |")
    print("|---|---|---|---|")
    for row, ms in got.items():
        rate, per_cpu, own = (statistics.median(m[i] for m in ms) for i in (0, 1, 4))
        print(f"| {row} | {rate:.0f} | {1e6 / own:.0f} | {1e6 / per_cpu:.0f} |")


if __name__ == "__main__":
    main()
