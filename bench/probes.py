"""Do probes beside training slow it down, and how far behind do they run? Pairs of local runs, with and without
probes on every checkpoint, timed alternately (the order flips every pair), medians.

    python bench/probes.py --out /tmp/bench-probes --pairs 3
    python bench/probes.py --out /tmp/bench-probes --pairs 3 train.steps=60 probes.protocol=knn+linear

Each run: configs/smoke.yaml (or --config) on this machine, keep_last=1, probes (when on) on the nine labelled tiles
of ../shared/data (kNN, 224 px; train = test: a speed figure, not a quality one) in the trainer's nice-19 probe
process. Training speed: the median of the per-step rates the trainer logs (images_per_s at a fixed batch, so
proportional to steps/s; first step excluded). Probe lag: from the moment a checkpoint folder appears (this script polls for it) to its row in
eval/probes.jsonl, in checkpoint intervals (the median time between checkpoints). Prints a table and writes
results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TILES = ROOT.parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"


def one_run(out: Path, name: str, config: str, probes: bool, overrides: list[str]) -> dict:
    run = out / name
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", config, "--local", "--name", name,
           f"train.output_dir={out}", "train.keep_last=1", "train.log_every=1", "train.rankme_every=0",
           *([f"probes.tasks=crc={TILES},{TILES}"] if probes else []), *overrides]
    seen, started = {}, time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # when each checkpoint appears (keep_last=1 prunes them, so watch for them)
        for p in (run / "checkpoints").glob("step_*"):
            if not p.name.endswith(".tmp"):
                seen.setdefault(int(p.name.split("_")[1]), time.time())
        time.sleep(0.1)
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr.read()[-3000:]}")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"images_per_s"' in line]
    rates = [s["images_per_s"] for s in steps if s["step"] > 1]  # a fixed batch: proportional to steps/s
    out_row = {"name": name, "probes": probes, "images_per_s": statistics.median(rates), "wall_s": round(wall, 1),
               "checkpoints": sorted(seen)}
    if probes:
        table = run / "eval" / "probes.jsonl"
        deadline = time.time() + 600
        while len(table.read_text().splitlines() if table.is_file() else []) < len(seen) and time.time() < deadline:
            time.sleep(0.5)  # the probe process finishes its queue after the trainer has gone
        rows = [json.loads(line) for line in table.read_text().splitlines()]
        done_at = {r["step"]: datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp() for r in rows}
        ts = [seen[s] for s in sorted(seen)]
        interval = statistics.median(b - a for a, b in zip(ts, ts[1:])) if len(ts) > 1 else float("nan")
        lags = {s: done_at[s] - seen[s] for s in seen if s in done_at}
        out_row.update(interval_s=round(interval, 2), lag_s={s: round(v, 1) for s, v in lags.items()},
                       max_lag_intervals=round(max(lags.values()) / interval, 2),
                       after_end_s=round(max(done_at.values()) - (started + wall), 1),
                       statuses=sorted({r["status"] for r in rows}), probed=len(rows))
    return out_row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("overrides", nargs="*", default=[])
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["train.steps=40", "train.ckpt_every=5", "data.num_workers=1", *a.overrides]
    results = []
    for i in range(a.pairs):
        for probes in ((True, False) if i % 2 == 0 else (False, True)):
            r = one_run(out, f"{'with' if probes else 'without'}_{i}", a.config, probes, overrides)
            print(json.dumps(r), flush=True)
            results.append(r)
    med = {k: statistics.median(r["images_per_s"] for r in results if r["probes"] == k) for k in (True, False)}
    ratios = [w["images_per_s"] / wo["images_per_s"] for w, wo in
              zip([r for r in results if r["probes"]], [r for r in results if not r["probes"]])]
    n = max(r["max_lag_intervals"] for r in results if r["probes"])
    summary = {"images_per_s_with": med[True], "images_per_s_without": med[False], "ratio_median": statistics.median(ratios),
               "ratios": ratios, "max_lag_intervals": n, "N": math.ceil(n), "command": " ".join(sys.argv),
               "overrides": overrides, "runs": results}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ntraining images/s, median: with probes {med[True]:.3f}, without {med[False]:.3f}; per-pair ratios "
          f"{', '.join(f'{x:.3f}' for x in ratios)} (median {summary['ratio_median']:.3f})")
    print(f"probes done within {n:.2f} checkpoint intervals of their checkpoint (N = {math.ceil(n)})")


if __name__ == "__main__":
    main()
