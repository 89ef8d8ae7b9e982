"""Slide-level probes on per-slide tile embeddings: gated-attention ABMIL and a mean-pool linear baseline.

    python eval/slide_probe.py --features features/x --labels labels.csv --task subtype
    python eval/slide_probe.py --features features/x --labels labels.csv --protocol abmil --folds 5 --seeds 3
    -> features/x/probes/<task>/<protocol>/results.json, results.md   (or --out DIR/<protocol>/)

Inputs: the per-slide HDF5 files of eval/embed_slides.py (`features` (N, D)), and a CSV `slide,label[,split]`: slide is
a file's name without .h5 (or a slide path: its name is taken), label any string, split train / val / test. With a
split column those splits are used (the seeds vary the initialisation and the tiles drawn); without one, stratified
k-fold: each fold is the test set once, each seed reshuffles the folds.

Models (the slide is a bag of its tile embeddings; at most --max-tiles of them, a seeded subset kept once):
  abmil     gated attention (Ilse et al. 2018), as eva's slide tasks: tiles projected to 128 (ReLU), attention
            a_i = softmax_i(w . (tanh(V h_i) * sigmoid(U h_i))), slide vector sum_i a_i h_i, an MLP (128 -> 64 -> classes)
  meanpool  one linear layer on the mean of the slide's tile embeddings: the baseline an attention model must beat
AdamW (lr 1e-3, weight decay 1e-4), bags in batches of 16 padded with a mask, --epochs passes; with a val split the
epoch with the best validation balanced accuracy is evaluated, otherwise the last.

Scores over the runs (folds x seeds), eva's results.json layout (mean, stdev, values): balanced accuracy, accuracy,
macro F1, AUROC (binary: of the positive class, the second in sorted order; multiclass: macro one-vs-rest).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python eval/slide_probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F

PROTOCOLS = ("abmil", "meanpool")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide")
DEFAULTS = dict(epochs=40, lr=1e-3, weight_decay=1e-4, batch_size=16, max_tiles=1000)


class GatedAttentionPool(nn.Module):
    """Ilse et al. 2018's gated attention: (B, N, H) tiles + (B, N) mask -> (B, H) slide vector, (B, N) weights."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.V, self.U, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)

    def forward(self, h, mask):
        scores = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)  # (B, N)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(1)  # padding gets weight 0
        return (weights.unsqueeze(-1) * h).sum(1), weights  # (B, H), (B, N)


class ABMIL(nn.Module):
    def __init__(self, dim: int, num_outputs: int, hidden: int = 128, mlp=(128, 64)):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.pool = GatedAttentionPool(hidden, hidden)
        layers, width = [], hidden
        for w in mlp:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        self.head = nn.Sequential(*layers, nn.Linear(width, num_outputs))

    def forward(self, x, mask):  # x (B, N, D), mask (B, N) True on real tiles
        z, _ = self.pool(self.project(x), mask)
        return self.head(z)


class MeanPoolLinear(nn.Module):
    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x, mask):
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1))  # mean over the real tiles


def build(protocol: str, dim: int, num_classes: int) -> nn.Module:
    outputs = 1 if num_classes == 2 else num_classes  # binary: one logit, as the tile probes
    if protocol == "abmil":
        return ABMIL(dim, outputs)
    if protocol == "meanpool":
        return MeanPoolLinear(dim, outputs)
    raise ValueError(f"unknown slide protocol '{protocol}'; expected one of {', '.join(PROTOCOLS)}")


# ---------------------------------------------------------------------------------------------
# metrics


def auroc_binary(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting half
    (the Mann-Whitney U statistic from average ranks). NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average rank over runs of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def slide_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """labels (N,), probs (N, C) -> balanced accuracy, accuracy, macro F1, AUROC (binary or macro one-vs-rest)."""
    from eval.metrics import classification_metrics

    C = probs.shape[1]
    out = classification_metrics(torch.as_tensor(labels), torch.as_tensor(probs.argmax(1)), C)
    out.pop("confusion_matrix")
    if C == 2:
        out["auroc"] = auroc_binary(labels == 1, probs[:, 1])
    else:
        per_class = [auroc_binary(labels == c, probs[:, c]) for c in range(C)]
        out["auroc"] = float(np.nanmean(per_class)) if not all(math.isnan(a) for a in per_class) else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# data


def load_bags(folder, slides: list[str], max_tiles: int | None, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Each slide's (n, D) float32 tile embeddings, at most max_tiles (a seeded subset), and the files' attributes."""
    import h5py

    bags, attrs = [], {}
    missing = [s for s in slides if not (Path(folder) / f"{s}.h5").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no embeddings for {len(missing)} labelled slide(s), e.g. {missing[:3]} "
                                "(expected <slide>.h5 from eval/embed_slides.py; drop them from the labels or embed them)")
    for k, s in enumerate(slides):
        with h5py.File(Path(folder) / f"{s}.h5", "r") as f:
            n = f["features"].shape[0]
            if max_tiles and n > max_tiles:
                keep = np.sort(np.random.default_rng([seed, k]).choice(n, max_tiles, replace=False))
                x = f["features"][keep]
            else:
                x = f["features"][:]
            attrs = attrs or dict(f.attrs)
        bags.append(torch.from_numpy(np.asarray(x, np.float32)))
    return bags, attrs


def _slide_key(value: str) -> str:
    """The file name eval/embed_slides.py gives a slide: a path or file name loses its folder and extension."""
    from eval.embed_slides import slide_name

    name = Path(value.strip()).name
    if name.endswith(".h5"):
        return name[:-3]
    return slide_name(name) if Path(name).suffix.lower() in SLIDE_SUFFIXES else name


def read_labels(path) -> tuple[list[str], list[str], list[str] | None]:
    """(slides, labels, splits or None) of a `slide,label[,split]` CSV; slide paths become file names."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns slide,label[,split]; found {list(rows[0]) if rows else 'no rows'}")
    slides = [_slide_key(r["slide"]) for r in rows]
    splits = [r["split"].strip().lower() for r in rows] if "split" in rows[0] else None
    if splits is not None:
        bad = sorted(set(splits) - {"train", "val", "test"})
        if bad or "train" not in splits or "test" not in splits:
            raise ValueError(f"{path}: split values must be train / val / test with train and test present; found "
                             f"{sorted(set(splits))}")
    return slides, [r["label"] for r in rows], splits


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint test index sets, each class dealt round-robin over the folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(i)
        offset += len(idx)  # the next class continues where this one stopped: fold sizes stay even
    return [np.sort(np.array(f, int)) for f in folds]


def _batch(bags: list[torch.Tensor], idx, max_tiles: int | None, generator=None):
    """Pad the bags idx into (B, N, D) with a (B, N) mask; with a generator, each bag is a random subset of at
    most max_tiles (training)."""
    chosen = []
    for i in idx:
        b = bags[i]
        if generator is not None and max_tiles and len(b) > max_tiles:
            b = b[torch.randperm(len(b), generator=generator)[:max_tiles]]
        chosen.append(b)
    n = max(len(b) for b in chosen)
    x = torch.zeros(len(chosen), max(n, 1), chosen[0].shape[1])
    mask = torch.zeros(len(chosen), max(n, 1), dtype=torch.bool)
    for j, b in enumerate(chosen):
        x[j, :len(b)], mask[j, :len(b)] = b, True
    return x, mask


def predict(model, bags, idx, num_classes: int, batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            x, mask = _batch(bags, idx[start:start + batch_size], None)
            logits = model(x, mask)
            out.append(torch.cat([-logits, logits], 1).mul(0.5).softmax(1) if num_classes == 2 else logits.softmax(1))
    return torch.cat(out).numpy()  # (n, C) probabilities (binary: [1 - p, p] with p = sigmoid(logit))


def train_one(protocol, bags, y, train, val, num_classes, *, seed=0, epochs=DEFAULTS["epochs"], lr=DEFAULTS["lr"],
              weight_decay=DEFAULTS["weight_decay"], batch_size=DEFAULTS["batch_size"], max_tiles=None):
    """Train one model on the bags `train`; with `val`, keep the epoch of the best validation balanced accuracy."""
    import copy

    torch.manual_seed(seed)
    model = build(protocol, bags[0].shape[1], num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    yt = torch.as_tensor(y)
    best, best_state, best_epoch = -1.0, None, epochs
    for epoch in range(1, epochs + 1):
        model.train()
        order = train[torch.randperm(len(train), generator=g).numpy()]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, mask = _batch(bags, idx, max_tiles, g)
            logits = model(x, mask)
            target = yt[idx]
            loss = (F.binary_cross_entropy_with_logits(logits[:, 0], target.float()) if num_classes == 2
                    else F.cross_entropy(logits, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val is not None and len(val):
            score = slide_metrics(y[val], predict(model, bags, val, num_classes))["balanced_accuracy"]
            if score > best:
                best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "best_val": best if best_state is not None else None}


def run_slide_probe(bags, y: np.ndarray, num_classes: int, protocol: str, *, splits=None, folds: int = 5,
                    seeds: int = 3, **train_kw) -> dict:
    """Every (fold or given split) x seed run -> {"metrics": {"test": {metric: {mean, stdev, values}}}, "per_run"}."""
    from eval.metrics import aggregate

    per_run = []
    for seed in range(seeds):
        if splits is not None:
            s = np.asarray(splits)
            plans = [(np.flatnonzero(s == "train"), np.flatnonzero(s == "val"), np.flatnonzero(s == "test"))]
        else:
            test_sets = stratified_folds(y, folds, seed)
            plans = [(np.setdiff1d(np.arange(len(y)), t), None, t) for t in test_sets]
        for fold, (train, val, test) in enumerate(plans):
            model, info = train_one(protocol, bags, y, train, val if val is not None and len(val) else None,
                                    num_classes, seed=seed, **train_kw)
            per_run.append({"seed": seed, "fold": fold, **info, "test": slide_metrics(y[test], predict(model, bags, test, num_classes))})
    # a metric undefined in some run (AUROC of a test fold holding one label) is left out of the summary; per_run has it
    finite = [k for k in per_run[0]["test"] if all(not math.isnan(r["test"][k]) for r in per_run)]
    return {"metrics": {"test": aggregate([{k: r["test"][k] for k in finite} for r in per_run])}, "per_run": per_run}


def probe_backbone(backbone, labels_csv, slides, out, *, mpp: float, tile_size: int, protocols=PROTOCOLS,
                   max_slides: int = 0, max_tiles: int = 0, seed: int = 0, device: str = "cpu", num_workers: int = 0,
                   batch_size: int = 64, index_dir=None, progress: bool = False, **probe_kw) -> dict:
    """A slide-level task for one model, start to end (what the probes during training run at each checkpoint):
    embed the labelled slides of `slides` (an index folder, or a manifest built into `index_dir`), at most max_slides
    of them (a fixed stratified subset) and max_tiles tiles each, into out/features, then run each protocol into
    out/<protocol>/results.json. Returns {protocol: results}."""
    from eval.embed_slides import embed_slides, slide_name
    from pathfm.data.index import IndexParams, SlideIndex, build_index
    from pathfm.data.slides import read_manifest

    out = Path(out)
    names, labels, splits = read_labels(labels_csv)
    if (Path(slides) / "index.json").is_file():
        index = SlideIndex(slides)
    else:
        from pathfm.config import DataConfig

        index = build_index(read_manifest(slides), index_dir or out / "index",
                            IndexParams(tile_size, (mpp,), DataConfig().tissue_threshold), workers=1, progress=False)
    by_name = {slide_name(index.path(i)): i for i in range(len(index))}
    keep = [k for k, s in enumerate(names) if s in by_name]
    if max_slides and len(keep) > max_slides:  # the same slides at every checkpoint: a seeded draw, labels in turn
        rng = np.random.default_rng(seed)
        per_label = {}
        for k in rng.permutation(keep).tolist():
            per_label.setdefault(labels[k], []).append(k)
        turns = [group[i] for i in range(max(map(len, per_label.values()))) for group in per_label.values()
                 if i < len(group)]
        keep = sorted(turns[:max_slides])
    if not keep:
        raise ValueError(f"{labels_csv}: none of its slides is in {slides} (compared by file name without extension)")
    features = out / "features"
    embed_slides(backbone, index, features, mpp=mpp, tile_size=tile_size, max_tiles=max_tiles or None, seed=seed,
                 batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                 rows={by_name[names[k]] for k in keep})
    done = [k for k in keep if (features / f"{names[k]}.h5").is_file()]
    subset = out / "labels.csv"
    with open(subset, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label"] + (["split"] if splits else []))
        w.writerows([names[k], labels[k]] + ([splits[k]] if splits else []) for k in done)
    results = {}
    for protocol in protocols:
        argv = ["--features", str(features), "--labels", str(subset), "--protocol", protocol, "--out", str(out),
                "--overwrite", "--max-tiles", str(max_tiles or DEFAULTS["max_tiles"])]
        for key, value in probe_kw.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        main(argv)
        results[protocol] = json.loads((out / protocol / "results.json").read_text())
    return results


def markdown(results: dict) -> str:
    from eval.common import markdown_table

    return markdown_table(results["metrics"], f"slide probe ({results['protocol']}), {results['task']}, "
                                              f"{len(results['per_run'])} runs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="folder of <slide>.h5 files (eval/embed_slides.py)")
    p.add_argument("--labels", required=True, help="CSV slide,label[,split]")
    p.add_argument("--task", help="task name in results and reports (default: the labels file's name)")
    p.add_argument("--protocol", default="abmil,meanpool", help="abmil, meanpool or both (comma-separated)")
    p.add_argument("--folds", type=int, default=5, help="stratified folds when the CSV has no split column")
    p.add_argument("--seeds", type=int, default=3, help="runs per fold / split, seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="slides per step")
    p.add_argument("--max-tiles", type=int, default=DEFAULTS["max_tiles"], help="tiles kept per slide (eva: 200-1000)")
    p.add_argument("--out", help="results folder (default: <features>/probes/<task>); one subfolder per protocol")
    p.add_argument("--overwrite", action="store_true", help="replace existing results")
    args = p.parse_args(argv)
    protocols = [s.strip() for s in args.protocol.split(",") if s.strip()]
    bad = [s for s in protocols if s not in PROTOCOLS]
    if bad:
        raise SystemExit(f"error: --protocol {','.join(bad)}: expected {', '.join(PROTOCOLS)}")
    task = args.task or Path(args.labels).stem
    out = Path(args.out) if args.out else Path(args.features) / "probes" / task
    for protocol in protocols:
        if (out / protocol / "results.json").exists() and not args.overwrite:
            raise SystemExit(f"error: {out / protocol}/results.json exists; pass --overwrite or choose another --out")
    try:
        slides, labels, splits = read_labels(args.labels)
        bags, attrs = load_bags(args.features, slides, args.max_tiles)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise SystemExit(f"error: {args.labels}: one label ({classes}); a probe needs at least two")
    y = np.array([classes.index(v) for v in labels])
    if splits is None and args.folds < 2:
        raise SystemExit(f"error: --folds {args.folds}: k-fold needs at least 2 folds (or give a split column)")
    if splits is None and np.bincount(y).min() < args.folds:
        raise SystemExit(f"error: {args.labels}: the rarest label has {np.bincount(y).min()} slides, fewer than "
                         f"--folds {args.folds}; lower --folds or give a split column")
    train_kw = dict(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                    max_tiles=args.max_tiles)
    for protocol in protocols:
        r = run_slide_probe(bags, y, len(classes), protocol, splits=splits, folds=args.folds, seeds=args.seeds,
                            **train_kw)
        model = json.loads(attrs.get("model", "{}")) if isinstance(attrs.get("model"), str) else {}
        head = r["metrics"]["test"]["balanced_accuracy"]
        results = {"protocol": protocol, "task": task, "level": "slide", "classes": classes, "model": model,
                   "embedding": attrs.get("embedding"), "datasets": {"features": str(args.features), "labels": str(args.labels)},
                   "counts": {"slides": len(slides), "per_class": np.bincount(y).tolist()},
                   "config": {**train_kw, "folds": None if splits else args.folds, "seeds": args.seeds,
                              "splits": "given" if splits else "stratified k-fold", "mpp": attrs.get("mpp") and float(attrs["mpp"])},
                   "metrics": r["metrics"], "headline": {"metric": "test/balanced_accuracy", **head},
                   "per_run": r["per_run"]}
        from eval.common import write_results

        (out / protocol).mkdir(parents=True, exist_ok=True)
        write_results(out / protocol, results, markdown(results))


if __name__ == "__main__":
    main()
