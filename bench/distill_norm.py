"""What feeding a hub-folder teacher the wrong normalisation costs (issue 27, "Measure"), on bench/learn.py's probe.

The teacher is a learn_cpu run (trained on crops with mean = std = 0.5), re-saved by timm's own save_for_hf as a hub
folder (config.json + model.safetensors, no heads, pretrained_cfg mean/std = 0.5). The student (vit_tiny_d6, as in
bench/distill.py) is trained on crops normalised differently (--student-mean/--student-std, ImageNet's by default),
so the two normalisations really differ. Per seed, two features-mode distillations, otherwise identical:

  own      distill.teacher=local-dir:HUB: the teacher's input normalised as its folder says (the default)
  student  the same with distill.teacher_mean/teacher_std set to the student's: the mistake issue 27 removed

    python bench/distill_norm.py --teacher runs/h28_learn/run --out runs/distill_norm --steps 200 --seeds 0 1 --threads 1
    python bench/distill_norm.py --teacher runs/h28_learn/run --out runs/distill_norm --merge OUT1 OUT2   # runs split over processes

Each run is probed with bench/learn.py's held-out kNN of its EMA backbone under its own (the student's)
normalisation; results.json collects runs across invocations (a run already there is skipped). Trailing arguments
are dotted config overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT = "vit_tiny_d6"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's run folder (bench/learn.py's OUT/run)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modes", nargs="+", default=["own", "student"], choices=["own", "student"])
    p.add_argument("--student-mean", type=floats, default=IMAGENET[0], help="R,G,B")
    p.add_argument("--student-std", type=floats, default=IMAGENET[1], help="R,G,B")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--merge", nargs="+", default=None, help="only write OUT/results.md from these --out folders' results")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.merge:
        parts = [json.loads((Path(m) / "results.json").read_text()) for m in a.merge]
        teacher = max((part["teacher"] for part in parts), key=len)  # the one with the most probes recorded
        merged = {"teacher": teacher, "runs": [r for part in parts for r in part["runs"]]}
        Path(a.out).mkdir(parents=True, exist_ok=True)
        report(merged, Path(a.out))
        return merged

    import torch
    from timm.models import save_for_hf

    from bench.learn import probe, probe_sets, write_manifest
    from bench.learn_probe import cls_features
    from pathfm.config import load_config
    from pathfm.export import export_checkpoint
    from pathfm.train import main as train_main
    from pathfm.weights import build_hub_model, load_ema_backbone

    if a.threads:
        torch.set_num_threads(a.threads)
    out, data, teacher = Path(a.out), Path(a.data), Path(a.teacher).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(data, out)
    sets = probe_sets(data)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}

    def save():
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    # the teacher as a hub folder written by timm itself: its EMA backbone, its training normalisation, no heads
    hub = out / "teacher_hub"
    if not (hub / "model.safetensors").exists():
        export_checkpoint(teacher, out / "teacher_export")
        sidecar = json.loads((out / "teacher_export" / "model.json").read_text())  # its training mean / std
        t_mean, t_std = sidecar["mean"], sidecar["std"]
        model = build_hub_model(out / "teacher_export", "teacher export")
        size = model.patch_embed.img_size[0]
        save_for_hf(model, hub, safe_serialization=True, data_config={"input_size": (3, size, size)},
                    model_config={"pretrained_cfg": {"mean": t_mean, "std": t_std}})
        shutil.rmtree(out / "teacher_export")
    hub_cfg = json.loads((hub / "config.json").read_text())["pretrained_cfg"]
    if "teacher" not in results:
        model = build_hub_model(hub, "teacher hub folder")
        results["teacher"] = {"run": str(teacher), "hub": str(hub), "mean": hub_cfg["mean"], "std": hub_cfg["std"],
                              "knn": probe(lambda x: cls_features(model, x, hub_cfg["mean"], hub_cfg["std"]), sets)}
        save()
    if "knn_student_norm" not in results["teacher"]:  # the same teacher probed through the student's normalisation
        model = build_hub_model(hub, "teacher hub folder")
        results["teacher"]["knn_student_norm"] = probe(lambda x: cls_features(model, x, a.student_mean, a.student_std), sets)
        save()
    print(f"teacher (hub folder, mean {hub_cfg['mean']} std {hub_cfg['std']}): kNN {results['teacher']['knn']}", flush=True)

    s_mean, s_std = ",".join(map(str, a.student_mean)), ",".join(map(str, a.student_std))
    base = ["data.source=manifest", f"data.manifest={manifest}", f"train.output_dir={out / 'runs'}",
            f"model.arch={STUDENT}", f"train.steps={a.steps}", f"distill.teacher=local-dir:{hub}",
            f"crops.mean=[{s_mean}]", f"crops.std=[{s_std}]", *a.overrides]
    mode_overrides = {"own": [], "student": [f"distill.teacher_mean=[{s_mean}]", f"distill.teacher_std=[{s_std}]"]}

    for seed in a.seeds:
        for mode in a.modes:
            key = f"{mode}_s{seed}"
            if any(r["name"] == key for r in results["runs"]):
                print(f"{key}: done before, skipped", flush=True)
                continue
            run_dir = out / "runs" / key
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = load_config("learn_cpu", [*base, f"train.name={key}", f"train.seed={seed}", *mode_overrides[mode]])
            t0, c0 = time.perf_counter(), time.process_time()
            train_main(cfg)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            vit, meta = load_ema_backbone(run_dir)
            knn = probe(lambda x: cls_features(vit, x, meta["mean"], meta["std"]), sets)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in rows if "loss/total" in r][-1]
            results["runs"].append({"name": key, "mode": mode, "seed": seed, "knn": knn, "train_seconds": seconds,
                                    "train_cpu_seconds": cpu, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                                    "probe_mean": meta["mean"], "last_losses": {k: v for k, v in last.items() if k.startswith("loss/")}})
            save()
            print(f"{key}: kNN {knn['normalised']:.3f} (normalised) {knn['raw']:.3f} (raw) in {seconds / 60:.1f} min "
                  f"(CPU {cpu / 60:.1f} min, load {open('/proc/loadavg').read().split()[:3]})", flush=True)
    report(results, out)
    return results


def report(results: dict, out: Path) -> None:
    """results.md: one row per mode, mean and each seed's value."""
    t = results["teacher"]
    lines = [f"teacher (hub folder, its own normalisation) kNN colour-normalised / raw: {t['knn']['normalised']:.3f} / "
             f"{t['knn']['raw']:.3f}" + (f"; fed the student's normalisation: {t['knn_student_norm']['normalised']:.3f}"
                                          f" / {t['knn_student_norm']['raw']:.3f}" if "knn_student_norm" in t else ""), "", "| teacher input | kNN, colour-normalised: mean (seeds) | kNN, raw: mean (seeds) |",
             "|---|---|---|"]
    for mode in ("own", "student"):
        rs = sorted((r for r in results["runs"] if r["mode"] == mode), key=lambda r: r["seed"])
        if rs:
            cell = lambda k: f"{statistics.fmean(r['knn'][k] for r in rs):.3f} (" + ", ".join(  # noqa: E731
                f"s{r['seed']} {r['knn'][k]:.3f}" for r in rs) + ")"
            lines.append(f"| {mode} | {cell('normalised')} | {cell('raw')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
