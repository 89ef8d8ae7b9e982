"""Collect results.json files of several checkpoints / runs into one table and PNG plots.

    python eval/report.py runs/a/eval runs/b/eval eval_results/ --out report/
    -> report/report.md  (one row per model, one column per task and protocol: headline mean ± stdev)
       report/<task>_<protocol>.png  (bars, one per model)
       report/steps_<protocol>.png   (headline against training step, when a run has several checkpoints)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def find_results(paths) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results.json"))
        else:
            raise FileNotFoundError(f"'{p}' is neither a results.json nor a folder")
    if not found:
        raise FileNotFoundError(f"no results.json under {[str(p) for p in paths]}")
    return found


def load_rows(files) -> list[dict]:
    """One flat row per results.json: model, run, step, task, protocol, metric, mean, stdev."""
    rows = []
    for f in files:
        r = json.loads(Path(f).read_text())
        if "headline" not in r:
            raise ValueError(f"{f}: not a pathfm eval results.json (no 'headline'); written by eval/knn.py, linear.py ...")
        model = r.get("model", {})
        source = str(model.get("source", "?"))
        step = model.get("step")
        if step is None and (m := re.search(r"step_(\d+)", source)):
            step = int(m.group(1))
        run = source.split("/checkpoints")[0].removesuffix("/export") if "/" in source else source
        rows.append({"model": source, "run": run, "step": step, "task": r["task"], "protocol": r["protocol"],
                     "metric": r["headline"]["metric"], "mean": r["headline"]["mean"],
                     "stdev": r["headline"].get("stdev", 0.0), "file": str(f)})
    return rows


def markdown(rows) -> str:
    columns = sorted({(r["task"], r["protocol"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["task"], r["protocol"]): r for r in rows}
    metrics = sorted({f"{r['protocol']}: {r['metric']}" for r in rows})
    lines = ["| model | " + " | ".join(f"{t} ({p})" for t, p in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for m in models:
        vals = []
        for t, p in columns:
            r = cell.get((m, t, p))
            vals.append("" if r is None else f"{r['mean']:.3f} ± {r['stdev']:.3f}" if r["stdev"] else f"{r['mean']:.3f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines + ["", "Headline metrics: " + "; ".join(metrics)])


def plot(rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["protocol"])].append(r)
    for (task, protocol), rs in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rs) + 2), 3.5))
        ax.bar(range(len(rs)), [r["mean"] for r in rs], yerr=[r["stdev"] for r in rs], capsize=3)
        ax.set_xticks(range(len(rs)), [Path(r["model"]).name if "/" in r["model"] else r["model"] for r in rs],
                      rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task} ({protocol})")
        ax.set_ylabel(rs[0]["metric"])
        fig.tight_layout()
        path = out / f"{task}_{protocol}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    by_protocol = defaultdict(list)
    for r in rows:
        if r["step"] is not None:
            by_protocol[r["protocol"]].append(r)
    for protocol, rs in sorted(by_protocol.items()):
        lines = defaultdict(list)  # (run, task) -> [(step, mean)]
        for r in rs:
            lines[(r["run"], r["task"])].append((r["step"], r["mean"]))
        lines = {k: sorted(v) for k, v in lines.items() if len({s for s, _ in v}) > 1}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for (run, task), pts in sorted(lines.items()):
            ax.plot([s for s, _ in pts], [m for _, m in pts], marker="o", label=f"{Path(run).name}: {task}")
        ax.set_xlabel("training step")
        ax.set_ylabel(rs[0]["metric"])
        ax.set_title(f"{protocol} probe against training step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"steps_{protocol}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="results.json files or folders searched for them")
    p.add_argument("--out", default="report", help="folder for report.md and the PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "report.md").exists() and not args.overwrite:
        sys.exit(f"{out}/report.md exists; pass --overwrite to replace it or --out to write elsewhere")
    rows = load_rows(find_results(args.paths))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "report.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    pngs = plot(rows, out)
    print(table)
    print(f"{len(rows)} results -> {out}/report.md, {len(pngs)} plots")


if __name__ == "__main__":
    main()
