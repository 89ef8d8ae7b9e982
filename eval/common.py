"""Command-line plumbing shared by the eval scripts: model arguments, embeddings, the results folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.extract import backbone_from_args, cached_or_extract, extract_kwargs, load_split


def embeddings_for(args, splits: dict[str, str | None], out_folder) -> dict:
    """{split: embeddings dict} for the splits given on the command line ({"train": spec, ...}), extracted with
    the model of --ckpt / --timm into `out_folder`, or read from --embeddings when no model is given."""
    wanted = {s: spec for s, spec in splits.items() if spec}
    if args.ckpt is None and args.timm is None:
        if not args.embeddings:
            raise SystemExit("give a model (--ckpt or --timm) with datasets, or --embeddings DIR from eval/extract.py")
        present = [s for s in splits if s in ("train", "test") or (Path(args.embeddings) / f"{s}.pt").is_file()]
        return {s: load_split(args.embeddings, s) for s in present}
    if not wanted.get("train"):
        raise SystemExit("--train DATASET is needed with a model")
    backbone = backbone_from_args(args)
    folder = args.embeddings or out_folder
    out, classes = {}, None
    for split, spec in wanted.items():
        out[split] = cached_or_extract(backbone, spec, split, folder, args.embedding, classes=classes,
                                       overwrite=args.overwrite, **extract_kwargs(args))
        classes = classes or out[split]["classes"]  # test / val folders take the train set's label order
    return out


def collapse_warnings(data: dict) -> list[str]:
    """Warnings for (near-)identical embeddings, printed and returned for results.json: a probe on them scores
    at chance or the majority class whatever the labels, so its number says the model collapsed, nothing more."""
    import sys

    from pathfm.metrics import collapse_warning, rankme, spread

    out = []
    for split, d in data.items():
        x = d["embeddings"]
        w = collapse_warning(spread(x), rankme(x), f"the {split} embeddings ({len(x)} x {x.shape[1]})")
        if w:
            out.append(w + "; the scores below are then chance level (or the majority class) and measure nothing "
                       "but the collapse: evaluate a model that trained longer or check its training run")
            print(f"WARNING: {out[-1]}", file=sys.stderr, flush=True)
    return out


def add_data_args(p: argparse.ArgumentParser, val: bool) -> None:
    g = p.add_argument_group("data (KIND:ROOT[:SPLIT] with KIND in folder, csv, crc, bach, mhist, pcam, breakhis)")
    g.add_argument("--train", help="training set, e.g. crc:/data/crc:train or an image folder")
    if val:
        g.add_argument("--val", help="validation set for early stopping / choosing the lr (eva: the test set when absent)")
    g.add_argument("--test", help="evaluation set, e.g. crc:/data/crc:val")
    g.add_argument("--embeddings", help="folder of cached embeddings: reused without a model, written to with one")
    g.add_argument("--task", help="task name in results and reports (default: from --train)")
    g.add_argument("--out", help="results folder (default: <run>/eval/<checkpoint>/<task>/<protocol>)")
    g.add_argument("--overwrite", action="store_true", help="replace existing results / embeddings of another model")


def task_name(args) -> str:
    if args.task:
        return args.task
    spec = args.train or ""
    kind = spec.split(":", 1)[0]
    if kind in ("crc", "bach", "mhist", "pcam", "breakhis"):
        return kind
    if args.embeddings and not spec:  # <task>/embeddings/<choice>, as this module lays them out, or the folder's name
        folder = Path(args.embeddings.rstrip("/"))
        for up in (folder, folder.parent):
            if up.name == "embeddings":
                return up.parent.name
        return folder.name
    return Path(spec.split(":")[0] if kind != "csv" else spec.split(":")[1]).stem or "task"


def checkpoint_place(ckpt: str) -> tuple[Path, str]:
    """(run folder, checkpoint label) of a --ckpt path: `last` and run folders name the step they point to, so
    results of different steps never share a folder; an export folder is `export`."""
    from pathfm.checkpoint import latest_checkpoint

    path = Path(ckpt.rstrip("/"))
    if path.name == "last" and path.is_file():
        path = path.parent / path.read_text().strip()
    if "checkpoints" in path.parts:
        parts = path.parts
        run = Path(*parts[: parts.index("checkpoints")])
        step = path if path.name.startswith("step_") else latest_checkpoint(run / "checkpoints")
        return run, step.name if step is not None else path.name
    if (path / "model.json").is_file():  # an export folder: a run's export/ or one of its own
        return (path.parent if path.name == "export" else path), "export"
    if (path / "export" / "model.json").is_file():  # a run folder is evaluated through its export
        return path, "export"
    step = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    return path, step.name if step is not None else path.name


def default_out(args, protocol: str) -> Path:
    """<run>/eval/<checkpoint>/<task>/<protocol> for pathfm checkpoints, eval_results/<model>/<task>/<protocol>
    otherwise (timm baselines, embeddings without a model)."""
    task = task_name(args)
    if args.ckpt:
        run, label = checkpoint_place(args.ckpt)
        return run / "eval" / label / task / protocol
    name = args.timm if args.timm else Path(args.embeddings.rstrip("/")).name
    if name.startswith("local-dir:"):  # a public model's folder: its name
        name = Path(name.split(":", 1)[1].rstrip("/")).name
    return Path("eval_results") / name.split(":", 1)[-1].replace("/", "_") / task / protocol


def embeddings_folder(args, out: Path) -> Path:
    """Where extracted embeddings go: beside the protocols of the same checkpoint and task (knn and linear share
    them), one folder per embedding choice and size; inside --out when the user chose the results folder."""
    from eval.backbone import input_size_hint

    base = out / "embeddings" if args.out else out.parent / "embeddings"
    return base / f"{args.embedding}-{args.img_size or input_size_hint(args.timm)}px"


def prepare_out(args, protocol: str) -> Path:
    """The results folder; an existing results.json there is an error unless --overwrite."""
    out = Path(args.out) if args.out else default_out(args, protocol)
    if (out / "results.json").exists() and not args.overwrite:
        raise SystemExit(f"{out}/results.json exists; pass --overwrite to replace it or --out to write elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_results(out: Path, results: dict, table: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"results -> {out}/results.json")


def markdown_table(metrics: dict, title: str) -> str:
    """{split: {metric: {"mean", "stdev"}}} -> a Markdown table (rows: split/metric)."""
    lines = [f"### {title}", "", "| split | metric | mean | stdev |", "|---|---|---:|---:|"]
    for split, values in metrics.items():
        for name, v in values.items():
            lines.append(f"| {split} | {name} | {v['mean']:.4f} | {v['stdev']:.4f} |")
    return "\n".join(lines)


def provenance(data: dict) -> dict:
    """Which model, embedding and datasets produced the embeddings (from their manifests)."""
    first = next(iter(data.values()))["manifest"]
    return {"model": first.get("model", {}), "embedding": first.get("embedding"),
            "datasets": {s: d["manifest"].get("dataset") for s, d in data.items()},
            "counts": {s: len(d["labels"]) for s, d in data.items()},
            "skipped": {s: d["manifest"].get("skipped", 0) for s, d in data.items()}}
