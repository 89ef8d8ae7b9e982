"""How long the index build takes to describe one slide (open it, read its levels, make its tissue mask, list
where tiles may be drawn), against the default per-slide time limit (data.index_timeout_s, --timeout).

    python bench/describe.py [SLIDE ...] [--large 120000] [--repeats 3]

Slides: those given, else the real slides in ../shared/data/slides and bench/data.py's synthetic 40000 px
slide; --large N also writes (once, into --cache) a synthetic N x N px slide at 0.25 µm/px with a 4x pyramid
(120000 px: 3 x 3 cm at 40x, larger than most TCGA scans). Each slide is described --repeats times in this
process with a cold tissue mask (a fresh mask folder each time); the table gives the slowest wall and CPU
seconds, the last line the slowest slide against the limit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pathfm.config import DataConfig  # noqa: E402
from pathfm.data.index import IndexParams, describe_slide  # noqa: E402
from pathfm.data.slides import SlideEntry  # noqa: E402
from pathfm.data.synthetic import write_synthetic_slide  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*")
    parser.add_argument("--large", type=int, default=0, help="also a synthetic slide of this many px a side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of slides whose files have none")
    parser.add_argument("--cache", default=".cache/pathfm/bench")
    args = parser.parse_args()
    cache = Path(args.cache)
    slides = [Path(s) for s in args.slides]
    if not slides:
        slides = sorted((ROOT.parent / "shared" / "data" / "slides").glob("*.svs"))
        slides += [p for p in [cache / "synthetic-40000.svs"] if p.exists()]
    if args.large:
        big = cache / f"synthetic-{args.large}-0.25mpp.svs"
        if not big.exists():
            start = time.perf_counter()
            write_synthetic_slide(big, args.large, seed=0, mpp=0.25)
            print(f"wrote {big} ({big.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        slides.append(big)
    params = IndexParams(224, (0.25, 0.5, 1.0, 2.0), 0.4)  # the default config's
    rows, loads = [], [os.getloadavg()[0]]
    for path in slides:
        wall, cpu = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as masks:  # a cold mask: the build's first describe of the slide
                w, c = time.perf_counter(), time.process_time()
                record = describe_slide(0, SlideEntry(str(path)), params, masks)
                if "no resolution" in record.get("reason", ""):  # as the manifest's mpp column would give it
                    record = describe_slide(0, SlideEntry(str(path), mpp=args.mpp), params, masks)
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
            loads.append(os.getloadavg()[0])
        size = f"{record['levels'][0][0]}x{record['levels'][0][1]}" if "levels" in record else record.get("reason", "")[:60]
        rows.append((path.name, size, path.stat().st_size / 1e6, max(wall), max(cpu)))
        print(f"{path.name}: {max(wall):.2f} s wall, {max(cpu):.2f} s CPU (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    load = f"load average {min(loads):.1f}-{max(loads):.1f}"
    print(f"\n| slide | level 0 | MB | describe, s wall (slowest of {args.repeats}) | s CPU |")
    print("|---|---|---|---|---|")
    for name, size, mb, w, c in rows:
        print(f"| {name} | {size} | {mb:,.0f} | {w:.2f} | {c:.2f} |")
    name, _, _, w, c = max(rows, key=lambda r: r[4])
    limit = DataConfig.index_timeout_s
    print(f"\nSUMMARY describe: slowest {name} {c:.1f} s CPU, {w:.1f} s wall; the default limit "
          f"data.index_timeout_s={limit:g} s is {limit / max(c, 1e-9):.0f}x its CPU time (target: limit <= 120 s); {load}")


if __name__ == "__main__":
    main()
