"""Does it learn? Train configs/learn_cpu.yaml on the two real slides, then probe every checkpoint.

    python bench/learn.py --out runs/learn                      # the recipe: about 20 min on 2 CPU cores
    python bench/learn.py --out /tmp/learn-quick --steps 40 --probe-every 20 train.rankme_every=20

Writes into --out: run/ (the training run folder), results.json, results.md (the table) and
curves.png (DINO loss against ln K, the teacher's entropy / ln K, RankMe, kNN accuracy over steps).

The probe (bench/learn_probe.py): tissue type of the nine labelled NCT-CRC-HE-100K tiles, 64 px
sub-tiles, left halves to train the kNN and right halves to test it, so no test pixel is in a
training sub-tile. Every sub-tile is colour-normalised first (per-channel mean and std set to
the set's; Reinhard's method in RGB): with one tile per class, mean colour alone names the class
(87% on the raw sub-tiles), so without it the probe would measure colour, not tissue. Each
checkpoint's teacher backbone is compared with the same architecture at its random initialisation
(the run's step 0) and with raw pixels (the best of average-pooling 1-16 px and one mean colour
per sub-tile, chosen on the test split: a baseline given every advantage). The uncorrected probe is reported beside it.
Trailing arguments are dotted config overrides, applied after the recipe's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLIDES = (("slides/CMU-1-Small-Region.svs", ""), ("slides/TCGA-CR-7395-01A-01-TS1.svs", "0.5"))  # TCGA: no mpp in the file
TILES = "tiles/nct_crc_he_100k_sample9"
POOLS = (1, 2, 4, 8, 16, 64)  # 64: one mean colour per 64 px sub-tile


def write_manifest(data: Path, out: Path) -> Path:
    path = out / "manifest.csv"
    path.write_text("path,mpp\n" + "".join(f"{(data / p).resolve()},{mpp}\n" for p, mpp in SLIDES))
    return path


def probe_sets(data: Path, stride: int = 16) -> dict:
    """{"raw": split, "normalised": split}, each split as learn_probe.crc_split returns it."""
    from bench.learn_probe import colour_normalise, crc_split

    raw = crc_split(data / TILES, stride=stride)
    return {"raw": raw, "normalised": colour_normalise(raw)}


def probe(features, sets: dict) -> dict:
    """{probe name: kNN top-1 accuracy (k = 20)} for one feature function (uint8 images -> (N, D))."""
    from bench.learn_probe import knn_accuracy

    out = {}
    for name, d in sets.items():
        (xtr, ytr), (xte, yte) = d["train"], d["test"]
        out[name] = knn_accuracy(features(xtr), ytr, features(xte), yte, len(d["classes"]))
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def at_step(rows: list[dict], key: str, step: int):
    """The value of key logged at the latest step <= step (None if never)."""
    best = None
    for r in rows:
        if key in r and r["step"] <= step and (best is None or r["step"] >= best[0]):
            best = (r["step"], r[key])
    return None if best is None else best[1]


def plot(rows: list[dict], table: list[dict], baselines: dict, log_k: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    ax[0].plot(*series("loss/dino"), label="DINO")
    if any("loss/ibot" in r for r in rows):
        ax[0].plot(*series("loss/ibot"), label="iBOT")
    ax[0].axhline(log_k, color="k", ls="--", lw=1, label="ln K (uniform)")
    ax[0].set_title("losses")
    ax[1].plot(*series("diag/teacher_entropy"), label="teacher entropy / ln K")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_title("teacher entropy / ln K")
    ax[2].plot(*series("rankme/teacher_cls"), "o-", label="held-out batch")
    ax[2].plot(*series("diag/teacher_rankme_batch"), label="training batch")
    ax[2].set_title("teacher CLS RankMe")
    steps = [r["step"] for r in table]
    for name, style in (("normalised", "o-"), ("raw", "s:")):
        ax[3].plot(steps, [r[f"knn_{name}"] for r in table], style, label=f"trained, {name}")
        ax[3].axhline(baselines["random_init"][name], ls="--", lw=1, color="C1" if name == "normalised" else "C3",
                      label=f"random init, {name}")
        ax[3].axhline(baselines["pixels"][name], ls="-.", lw=1, color="C2" if name == "normalised" else "C4",
                      label=f"raw pixels, {name}")
    ax[3].set_title("kNN accuracy, CRC tissue type (9 classes)")
    for a in ax:
        a.set_xlabel("step")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the run folder is OUT/run)")
    p.add_argument("--config", default=str(ROOT / "configs" / "learn_cpu.yaml"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the folder with slides/ and tiles/")
    p.add_argument("--steps", type=int, default=None, help="train.steps (default: the config's)")
    p.add_argument("--probe-every", type=int, default=None, help="checkpoint and probe every N steps (default: steps / 6)")
    p.add_argument("--probe-stride", type=int, default=16, help="sub-tile stride of the probe (16: 396 + 396 sub-tiles)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every probed checkpoint (default: the last)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.base_lr=1e-3")
    a = p.parse_args(argv)

    import torch

    from bench.learn_probe import cls_features, pixel_features
    from pathfm.config import load_config
    from pathfm.train import build_student, main as train_main
    from pathfm.weights import load_ema_backbone

    if a.threads:
        torch.set_num_threads(a.threads)
    out, data = Path(a.out), Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(data, out)
    cfg = load_config(a.config, [f"data.manifest={manifest}", f"train.output_dir={out}", "train.name=run",
                                 *([f"train.steps={a.steps}"] if a.steps else []), *a.overrides])
    every = a.probe_every or max(cfg.train.steps // 6, 1)
    cfg.train.ckpt_every, cfg.train.keep_last = every, cfg.train.steps // every + 2
    sets = probe_sets(data, a.probe_stride)
    mean, std = cfg.crops.mean, cfg.crops.std

    # baselines: raw pixels (best pooling on the test split, per probe) and the run's own step-0 model
    pixels = {name: max(probe(lambda x: pixel_features(x, pool), {name: d})[name] for pool in POOLS)
              for name, d in sets.items()}
    torch.manual_seed(cfg.train.seed)  # as build_models: the teacher at step 0 is this backbone
    init = build_student(cfg).backbone
    baselines = {"pixels": pixels, "random_init": probe(lambda x: cls_features(init, x, mean, std), sets)}

    t0 = time.perf_counter()
    result = train_main(cfg)
    train_s = time.perf_counter() - t0
    run_dir = Path(result["run_dir"])
    rows = read_metrics(run_dir)

    table = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        vit, meta = load_ema_backbone(step_dir)
        step = int(step_dir.name.split("_")[1])
        knn = probe(lambda x: cls_features(vit, x, mean, std), sets)
        table.append({"step": step, "loss_dino": at_step(rows, "loss/dino", step),
                      "teacher_entropy": at_step(rows, "diag/teacher_entropy", step),
                      "rankme_heldout": at_step(rows, "rankme/teacher_cls", step),
                      "knn_normalised": knn["normalised"], "knn_raw": knn["raw"]})
    if not a.keep_checkpoints:  # ~100 MB each; the last stays for resume and export
        for step_dir in sorted((run_dir / "checkpoints").glob("step_*"))[:-1]:
            shutil.rmtree(step_dir)

    log_k = math.log(cfg.ssl.prototypes)
    first_rankme = next((r["diag/teacher_rankme_batch"] for r in rows if "diag/teacher_rankme_batch" in r), None)
    results = {"config": str(a.config), "overrides": a.overrides, "steps": cfg.train.steps, "train_seconds": train_s,
               "threads": torch.get_num_threads(), "ln_k": log_k, "first_rankme": first_rankme,
               "first_loss_dino": next(r["loss/dino"] for r in rows if "loss/dino" in r),
               "baselines": baselines, "table": table}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{cfg.train.steps} steps in {train_s / 60:.1f} min ({torch.get_num_threads()} threads); ln K = {log_k:.3f}; "
             f"first DINO loss {results['first_loss_dino']:.3f}, teacher RankMe at step 1 (batch) {fmt(first_rankme, '.2f')}",
             "", "| step | DINO loss | teacher entropy / ln K | held-out RankMe | kNN, colour-normalised | kNN, raw colour |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {fmt(r['loss_dino'], '.3f')} | {fmt(r['teacher_entropy'], '.3f')} | "
              f"{fmt(r['rankme_heldout'], '.1f')} | {r['knn_normalised']:.3f} | {r['knn_raw']:.3f} |" for r in table]
    lines += [f"| 0 (random init) | | | | {baselines['random_init']['normalised']:.3f} | {baselines['random_init']['raw']:.3f} |",
              f"| raw pixels (best pooling) | | | | {pixels['normalised']:.3f} | {pixels['raw']:.3f} |"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, table, baselines, log_k, out / "curves.png")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
