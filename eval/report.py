"""Collect results.json files of several checkpoints / runs into one table and PNG plots.

    python eval/report.py runs/a/eval runs/b/eval eval_results/ --out report/
    -> report/report.md  (one row per model, protocol and embedding; one column per task: headline mean ± stdev;
                          slide-level (eval/slide_probe.py) and dense (eval/seg_probe.py) tasks marked in their column)
       report/comparison.png  (every row on every task: pathfm checkpoints beside public baselines)
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
        rows.append({"model": source, "label": model_label(source, step), "kind": model_kind(source),
                     "embedding": r.get("embedding") or "cls",
                     "run": run, "step": step, "task": task_label(r), "level": r.get("level", "tile"),
                     "protocol": r["protocol"],
                     "metric": r["headline"]["metric"], "mean": r["headline"]["mean"],
                     "stdev": r["headline"].get("stdev", 0.0), "file": str(f)})
    return rows


def task_label(results: dict) -> str:
    """A task's column: its name, marked when it is not a tile task (slide-level probes, dense probes), so that
    slide and dense tasks stand beside the tile tasks of the same model."""
    level = results.get("level", "tile")
    return results["task"] if level == "tile" else f"{results['task']} ({level})"


def model_label(source: str, step) -> str:
    """A short name for a row: run/checkpoint for pathfm, the folder or hub name for public models."""
    if source.startswith("local-dir:"):
        return Path(source.split(":", 1)[1].rstrip("/")).name
    if source.startswith(("hf-hub:", "timm:")):
        return source.split(":", 1)[1].removesuffix(":random")
    path = Path(source.rstrip("/"))
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent if path.name == "export" else path
    at = f"step {step}" if step is not None else path.name if run != path else ""
    return f"{run.name} @ {at}" if at else run.name


def model_kind(source: str) -> str:
    if source.startswith(("local-dir:", "hf-hub:")):
        return "public"
    if source.startswith("timm:"):
        return "timm, random init" if source.endswith(":random") else "timm"
    return "pathfm"


def row_key(r) -> tuple:
    return r["model"], r["protocol"], r["embedding"]


def markdown(rows) -> str:
    """One row per (model, protocol, embedding), one column per task: models evaluated the same way side by side."""
    tasks = sorted({r["task"] for r in rows})
    keys = sorted(dict.fromkeys(row_key(r) for r in rows), key=lambda k: (k[1], k[2], model_kind(k[0]) != "pathfm", k[0]))
    first = {row_key(r): r for r in rows}
    cell = {(*row_key(r), r["task"]): r for r in rows}
    metrics = sorted({f"{r['protocol']}: {r['metric']}" for r in rows})
    lines = ["| model | kind | protocol | embedding | " + " | ".join(tasks) + " |", "|---|---|---|---|" + "---:|" * len(tasks)]
    for key in keys:
        vals = []
        for t in tasks:
            r = cell.get((*key, t))
            vals.append("" if r is None else f"{r['mean']:.3f} ± {r['stdev']:.3f}" if r["stdev"] else f"{r['mean']:.3f}")
        lines.append(f"| {first[key]['label']} | {first[key]['kind']} | {key[1]} | {key[2]} | " + " | ".join(vals) + " |")
    sources = sorted({f"{first[k]['label']}: {k[0]}" for k in keys})
    return "\n".join(lines + ["", "Headline metrics: " + "; ".join(metrics), "", "Models: " + "; ".join(sources)])


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def comparison_plot(rows, out: Path) -> Path:
    """One figure: a group of bars per task, one bar per (model, protocol, embedding) row, the same colour on every task."""
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    keys = list(dict.fromkeys(row_key(r) for r in rows))
    cell = {(*row_key(r), r["task"]): r for r in rows}
    labels = {row_key(r): f"{r['label']} ({r['protocol']}, {r['embedding']})" for r in rows}
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) * max(1, len(keys) / 3) + 2), 4))
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j, t in enumerate(tasks) if (*key, t) in cell]
        rs = [cell[(*key, t)] for t in tasks if (*key, t) in cell]
        ax.bar(xs, [r["mean"] for r in rs], width, yerr=[r["stdev"] for r in rs], capsize=2, label=labels[key])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("headline metric (see report.md)")
    ax.set_title("models side by side")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, out / "comparison.png")


def plot(rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = [comparison_plot(rows, out)]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["protocol"])].append(r)
    for (task, protocol), rs in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rs) + 2), 3.5))
        ax.bar(range(len(rs)), [r["mean"] for r in rs], yerr=[r["stdev"] for r in rs], capsize=3)
        ax.set_xticks(range(len(rs)), [f"{r['label']} ({r['embedding']})" for r in rs],
                      rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task} ({protocol})")
        ax.set_ylabel(rs[0]["metric"])
        name = re.sub(r"[^\w.-]+", "_", task).strip("_")  # a file name: 'subtype (slide)' -> subtype_slide
        written.append(save_figure(fig, out / f"{name}_{protocol}.png"))
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
        written.append(save_figure(fig, out / f"steps_{protocol}.png"))
    return written


def probe_curves(paths, out: Path) -> list[Path]:
    """For each run-level probe table (eval/probes.jsonl, written by eval/watch.py) under `paths`: curves_<run>.png,
    one panel per task and protocol, the headline against the training step, the best checkpoint starred and failed
    or skipped probes marked at the bottom with their step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [p for p in map(Path, paths) if p.is_dir() for p in [p / "probes.jsonl", *p.glob("*/eval/probes.jsonl")]]
    written = []
    for table in filter(Path.is_file, dict.fromkeys(tables)):
        rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
        panels = sorted({(r["task"], r["protocol"]) for r in rows})
        if not panels:
            continue
        run = table.parent.parent.name
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
        for ax, (task, protocol) in zip(axes[0], panels):
            ok = sorted((r["step"], r["value"]) for r in rows if (r["task"], r["protocol"]) == (task, protocol)
                        and r["status"] == "ok")
            bad = [r["step"] for r in rows if (r["task"], r["protocol"]) == (task, protocol) and r["status"] != "ok"]
            if ok:
                ax.plot([s for s, _ in ok], [v for _, v in ok], marker="o")
                best = max(ok, key=lambda sv: sv[1])
                ax.plot(*best, marker="*", markersize=14, color="tab:orange", label=f"best: step {best[0]}")
            if bad:
                ax.plot(bad, [0] * len(bad), "x", color="tab:red", label="failed / skipped")
            ax.legend(fontsize=7)
            metric = next((r["metric"] for r in rows if r.get("metric") and (r["task"], r["protocol"]) == (task, protocol)),
                          "headline")
            ax.set(title=f"{task} ({protocol})", xlabel="training step", ylabel=metric)
        fig.suptitle(f"probes of {run}")
        written.append(save_figure(fig, out / f"curves_{run}.png"))
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
    pngs = plot(rows, out) + probe_curves(args.paths, out)
    print(table)
    print(f"{len(rows)} results -> {out}/report.md, {len(pngs)} plots")


if __name__ == "__main__":
    main()
