"""Distil and continue, measured with bench/learn.py's held-out tissue probe on 2 CPU cores.

    python bench/learn.py --out runs/learn_teacher --steps 300 --probe-every 100     # the teacher (learn_cpu recipe)
    python bench/distill.py --teacher runs/learn_teacher/run --out runs/distill --steps 200 --seeds 0 1

Jobs (each a training run of configs/learn_cpu.yaml on the two real slides, then the kNN probe of its EMA backbone;
--jobs picks some, results.json collects them across invocations):
  distill    the student (vit_tiny_d6: half of ViT-Ti's blocks, half its FLOPs per image) distilled from the teacher
             checkpoint (its DINO and iBOT heads give the targets), --steps steps, per seed
  scratch    the same student trained from scratch with the same recipe and steps, per seed
  features   the student distilled from the teacher's backbone-only export (feature targets, no heads)
  fitheads   the teacher's heads fitted first (a head-warm-up-only run of --fit-steps from the backbone-only export:
             the backbone frozen, fresh heads trained by self-distillation), then the student distilled from that
  cont_warm  the teacher (ViT-Ti) continued --cont-steps from its backbone-only export with fresh heads and the
             head warm-up (train.head_warmup_steps auto: cont-steps / 10), probed every --cont-probe steps
  cont_none  the same without the warm-up (train.head_warmup_steps=0)
Trailing arguments are dotted config overrides for every job.
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

JOBS = ("distill", "scratch", "features", "fitheads", "cont_warm", "cont_none")
STUDENT = "vit_tiny_d6"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher's run folder (bench/learn.py's OUT/run)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--steps", type=int, default=200, help="student steps (distill, scratch, features, fitheads)")
    p.add_argument("--fit-steps", type=int, default=100, help="head-fitting steps of the fitheads job")
    p.add_argument("--cont-steps", type=int, default=200, help="continued-pretraining steps")
    p.add_argument("--cont-probe", type=int, default=50, help="probe the continued runs every N steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    import torch

    from bench.learn import probe, probe_sets, write_manifest
    from bench.learn_probe import cls_features
    from pathfm.config import load_config
    from pathfm.export import export_checkpoint
    from pathfm.flops import step_flops
    from pathfm.train import main as train_main
    from pathfm.weights import load_ema_backbone

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

    def knn(step_dir) -> dict:
        vit, meta = load_ema_backbone(step_dir)
        return probe(lambda x: cls_features(vit, x, meta["mean"], meta["std"]), sets)

    # the teacher: its probe, its compute per image, and a backbone-only export (no heads.safetensors)
    headless = out / "teacher_headless"
    if not (headless / "model.json").exists():
        export_checkpoint(teacher, headless)
        (headless / "heads.safetensors").unlink(missing_ok=True)
    if "teacher" not in results:
        cfg_t = load_config(teacher / "config.yaml")
        results["teacher"] = {"run": str(teacher), "knn": knn(teacher), "flops_forward_2_globals": step_flops(cfg_t)["teacher_forward"]}
        cfg_s = load_config("learn_cpu", [f"model.arch={STUDENT}", f"data.manifest={manifest}"])
        results["student_flops_forward_2_globals"] = step_flops(cfg_s)["teacher_forward"]
        save()

    base = ["data.source=manifest", f"data.manifest={manifest}", f"train.output_dir={out / 'runs'}", *a.overrides]

    def run(name: str, seed: int, overrides: list, probe_every: int = 0) -> dict:
        key = f"{name}_s{seed}"
        if any(r["name"] == key for r in results["runs"]):
            print(f"{key}: done before, skipped", flush=True)
            return next(r for r in results["runs"] if r["name"] == key)
        run_dir = out / "runs" / key
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config("learn_cpu", [*base, f"train.name={key}", f"train.seed={seed}", *overrides])
        if probe_every:
            cfg.train.ckpt_every, cfg.train.keep_last = probe_every, cfg.train.steps // probe_every + 2
        t0 = time.perf_counter()
        train_main(cfg)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = {int(d.name.split("_")[1]): knn(d)["normalised"] for d in sorted((run_dir / "checkpoints").glob("step_*"))}
        final = knn(run_dir)
        rec = {"name": key, "job": name, "seed": seed, "overrides": overrides, "train_seconds": seconds,
               "knn": final, "curve": curve, "last_losses": {k: v for k, v in [r for r in rows if "loss/total" in r][-1].items()
                                                             if k.startswith("loss/")}}
        results["runs"].append(rec)
        save()
        print(f"{key}: kNN {final['normalised']:.3f} (normalised) {final['raw']:.3f} (raw) in {seconds / 60:.1f} min", flush=True)
        for d in sorted((run_dir / "checkpoints").glob("step_*"))[:-1]:
            shutil.rmtree(d)
        return rec

    student = [f"model.arch={STUDENT}", f"train.steps={a.steps}"]
    for seed in a.seeds:
        for job in a.jobs:
            if job == "distill":
                run(job, seed, [*student, f"distill.teacher={teacher}"])
            elif job == "scratch":
                run(job, seed, student)
            elif job == "features":
                run(job, seed, [*student, f"distill.teacher={headless}"])
            elif job == "fitheads":
                fit = run("fit", seed, [f"model.init_weights={headless}", f"train.steps={a.fit_steps}",
                                        f"train.head_warmup_steps={a.fit_steps}"])
                run(job, seed, [*student, f"distill.teacher={out / 'runs' / fit['name']}"])
            elif job == "cont_warm":
                run(job, seed, [f"model.init_weights={headless}", f"train.steps={a.cont_steps}"], a.cont_probe)
            elif job == "cont_none":
                run(job, seed, [f"model.init_weights={headless}", f"train.steps={a.cont_steps}",
                                "train.head_warmup_steps=0"], a.cont_probe)
    report(results, out)
    return results


def report(results: dict, out: Path) -> None:
    """results.md: one row per job, mean +- spread (half the range) over seeds."""
    def stats(vals):
        if not vals:
            return "-"
        mean = statistics.fmean(vals)
        return f"{mean:.3f}" + (f" ± {(max(vals) - min(vals)) / 2:.3f} (n={len(vals)})" if len(vals) > 1 else " (n=1)")

    t = results["teacher"]
    lines = [f"teacher kNN (colour-normalised / raw): {t['knn']['normalised']:.3f} / {t['knn']['raw']:.3f}; "
             f"forward FLOPs of 2 global crops, teacher {t['flops_forward_2_globals'] / 1e9:.2f} G vs student "
             f"{results['student_flops_forward_2_globals'] / 1e9:.2f} G per step", "",
             "| job | kNN, colour-normalised | kNN, raw colour | train minutes | curve (step: kNN normalised) |",
             "|---|---|---|---|---|"]
    jobs = []
    for r in results["runs"]:
        if r["job"] not in jobs:
            jobs.append(r["job"])
    for job in jobs:
        rs = [r for r in results["runs"] if r["job"] == job]
        curves = "; ".join(", ".join(f"{s}: {v:.3f}" for s, v in sorted(r["curve"].items(), key=lambda kv: int(kv[0])))
                           for r in rs if len(r["curve"]) > 1)
        lines.append(f"| {job} | {stats([r['knn']['normalised'] for r in rs])} | {stats([r['knn']['raw'] for r in rs])} | "
                     f"{stats([r['train_seconds'] / 60 for r in rs])} | {curves} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
