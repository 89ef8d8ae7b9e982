"""Gram anchoring on CPU: what its inputs cost the data path, and what it does to a run's probes.

    python bench/gram.py data --out bench/out/gram                      # CPU time per sample, gram.scale 1 vs 2
    python bench/gram.py step --out bench/out/gram                      # CPU time of the step without / with Gram
    python bench/gram.py probe --out bench/out/gram RUN_DIR...          # tile and dense probes of each checkpoint
    python bench/gram.py runs --out bench/out/gram --seeds 0 1 --weights 2 40   # the runs, then their probes

data: the loader's work for one sample (read the tile from the real slides in ../shared/data, make the views), in
CPU seconds of this process (time.process_time: not wall time, so a loaded machine slows it but does not bias the
ratio much), without and with the tiles read again at twice the pixels and cut into the Gram teacher's crops. The two
are interleaved batch by batch. One torch thread, no read-ahead threads, no loader workers.

step: the training step of configs/learn_cpu.yaml (batch 16, random crops) as the loop runs it (targets, Gram teacher,
losses, backward), CPU seconds per step without Gram anchoring and with it at gram.scale 1 and 2, interleaved in one
process; and the Gram teacher's parameter memory.

runs: configs/learn_cpu.yaml (batch 16) for --steps steps per seed, checkpointed every --every, on the two real
slides; then, per Gram weight, the same run resumed from its checkpoint at --anchor with Gram anchoring from there
(anchor = the EMA at that step, ramped in over 20 steps, negatives removed): both arms share every step before the
anchor, bit for bit. Then `probe` on every run folder. One process per run, all at once, one thread each.

probe: every checkpoint of the given run folders, its EMA backbone probed as bench/learn.py does (kNN on the nine
held-out CRC tiles' sub-tiles, colour-normalised and raw) and densely (eval/seg_probe.py on bench/planted.py's
segmentation fixture: 64 px images of real CRC tissue sources, a linear head per patch token, mean Dice and IoU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name: (tile px, global crop px, mpps, the config whose crops it mirrors)
    "learn_cpu": (96, 64, [0.5, 1.0, 2.0], "learn_cpu.yaml"),
    "vitg14": (256, 224, [0.5, 1.0, 2.0], "vitg14.yaml"),
}


def loadavg() -> str:
    return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()


def data_cost(out: Path, data: Path, batches: int, batch_size: int) -> dict:
    import torch

    from bench.learn import write_manifest
    from pathfm.config import load_config
    from pathfm.data.index import IndexParams, build_index
    from pathfm.data.loader import Views
    from pathfm.data.sampler import SlideTileDataset
    from pathfm.data.slides import read_manifest
    from pathfm.distill import step_plan

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(data, out)
    results = {}
    for name, (tile, size, mpps, config) in SIZES.items():
        cfg = load_config(config, [f"crops.global_size={size}", f"data.tile_size={tile}"])
        index = build_index(read_manifest(str(manifest)), out / f"index-{tile}", IndexParams(tile, tuple(mpps), 0.4),
                            workers=1, progress=False)
        views = Views(cfg, step_plan(cfg))
        datasets = {scale: SlideTileDataset(index, batch_size=batch_size, tile_size=tile, mpps=mpps, mpp_weights=None,
                                            seed=0, rank=0, world_size=1, transform=views,
                                            fine_from_step=0 if scale == 2 else None) for scale in (1, 2)}
        cpu = {1: 0.0, 2: 0.0}
        for step in range(batches + 1):
            for scale, ds in datasets.items():
                start = time.process_time()
                ds.batch(step)
                if step:  # the first batch opens the slides: not counted
                    cpu[scale] += time.process_time() - start
        per = {s: cpu[s] / (batches * batch_size) * 1e3 for s in cpu}
        results[name] = {"tile_px": tile, "global_px": size, "mpps": mpps, "samples": batches * batch_size,
                         "cpu_ms_per_sample_scale1": round(per[1], 2), "cpu_ms_per_sample_scale2": round(per[2], 2),
                         "extra_cpu_ms_per_sample": round(per[2] - per[1], 2), "ratio": round(per[2] / per[1], 2)}
        print(name, results[name], "load", loadavg(), flush=True)
    results["loadavg"] = loadavg()
    (out / "data_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def step_cost(out: Path, steps: int) -> dict:
    import torch

    from pathfm import train
    from pathfm.config import load_config
    from pathfm.dist import DistEnv
    from pathfm.gram import build_gram_teacher, copy_backbone, gram_patches
    from pathfm.plan import make_plan

    torch.set_num_threads(1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    variants = {"none": [], "gram scale 1": ["gram.weight=2"], "gram scale 2": ["gram.weight=2", "gram.scale=2"]}
    setups = {}
    for name, extra in variants.items():
        cfg = load_config("learn_cpu.yaml", ["optim.batch_size=16", *extra])
        student, ema, loss_state = train.build_models(cfg, env)
        plan, gram = make_plan(cfg), build_gram_teacher(cfg, env)
        if gram is not None:
            copy_backbone(gram, ema)
        g = torch.Generator().manual_seed(0)
        B, c = cfg.optim.batch_size, cfg.crops
        crops = {"global": torch.randn(2 * B, 3, c.global_size, c.global_size, generator=g),
                 "local": torch.randn(c.n_local * B, 3, c.local_size, c.local_size, generator=g),
                 "gram": torch.randn(2 * B, 3, 2 * c.global_size, 2 * c.global_size, generator=g),
                 "masks": torch.rand(2 * B, (c.global_size // cfg.model.patch_size) ** 2, generator=g) < 0.3}
        setups[name] = (cfg, student, ema, loss_state, plan, gram, crops)

    def one_step(cfg, student, ema, loss_state, plan, gram, crops):
        targets = train.compute_targets(plan, ema, crops["global"], crops["masks"], 0.04, loss_state)
        if gram is not None:
            images = crops["gram"] if plan.gram_scale == 2 else crops["global"]
            targets.gram = gram_patches(gram, images, c.global_size // cfg.model.patch_size)
        losses = train.compute_losses(plan, student, crops["global"], crops["local"], crops["masks"], targets)
        sum(plan.weights[k] * v for k, v in losses.items()).backward()
        student.zero_grad(set_to_none=True)

    cpu = {name: [] for name in setups}
    for i in range(steps + 1):
        for name, setup in setups.items():
            start = time.process_time()
            one_step(*setup)
            if i:  # the first step of each warms up
                cpu[name].append(time.process_time() - start)
    base = sum(cpu["none"]) / steps
    results = {name: {"cpu_s_per_step": round(sum(v) / steps, 4), "ratio": round(sum(v) / steps / base, 3)}
               for name, v in cpu.items()}
    gram = setups["gram scale 1"][5]
    results["gram_teacher_parameters_mb"] = round(sum(p.numel() * p.element_size() for p in gram.parameters()) / 1e6, 1)
    results["steps"], results["loadavg"] = steps, loadavg()
    print(json.dumps(results, indent=2), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def probe_runs(out: Path, data: Path, runs: list[str], seg_images: int) -> dict:
    import torch

    from bench.learn import probe, probe_sets
    from bench.learn_probe import cls_features
    from bench.planted import source_images, write_seg_fixture
    from eval.backbone import load_eval_backbone
    from eval.seg_probe import SegFolder, extract_patches, run_seg_probe

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    sources = source_images()
    for split, n in (("train", seg_images), ("test", seg_images // 2)):
        write_seg_fixture(out / "seg", n, split, 64, 16, seed=0, sources=sources)
    sets = probe_sets(data)
    path = out / "probes.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for run in runs:
        for step_dir in sorted((Path(run) / "checkpoints").glob("step_*")):
            key = f"{Path(run).name}/{step_dir.name}"
            if key in results:
                continue
            start = time.process_time()
            bb = load_eval_backbone(str(step_dir))
            seg = {split: extract_patches(bb, SegFolder(out / "seg" / split, 64), progress=False) for split in ("train", "test")}
            s = run_seg_probe(seg["train"], seg["test"], len(sources), runs=3, steps=300)
            knn = probe(lambda x: cls_features(bb.model, x, bb.mean, bb.std), sets)
            results[key] = {"seg_mean_dice": s["metrics"]["test"]["mean_dice"], "seg_mean_iou": s["metrics"]["test"]["mean_iou"],
                            "knn_normalised": knn["normalised"], "knn_raw": knn["raw"],
                            "cpu_s": round(time.process_time() - start, 1), "loadavg": loadavg()}
            print(key, json.dumps(results[key]), flush=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def runs(out: Path, data: Path, seeds: list[int], weights: list[float], steps: int, every: int, anchor: int,
         seg_images: int) -> dict:
    import shutil
    import subprocess

    from bench.learn import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(data, out)
    common = [sys.executable, "-m", "pathfm.train", "--config", str(ROOT / "configs" / "learn_cpu.yaml"),
              f"data.manifest={manifest}", f"data.cache_dir={out / 'cache'}", f"train.output_dir={out}",
              "optim.batch_size=16", f"train.steps={steps}", f"train.ckpt_every={every}",
              f"train.keep_last={steps // every + 1}", "train.rankme_every=0", "train.log_every=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run_all(jobs: dict) -> None:
        procs = {name: subprocess.Popen([*common, f"train.name={name}", *args], env=env, cwd=out,
                                        stdout=open(out / f"{name}.log", "w"), stderr=subprocess.STDOUT)
                 for name, args in jobs.items()}
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"run {name} failed: see {out / f'{name}.log'}")

    run_all({f"none_s{s}": [f"train.seed={s}"] for s in seeds})  # the no-Gram arm, and the shared first part
    gram_jobs = {}
    for s in seeds:
        for w in weights:
            name = f"gram{w:g}_s{s}"
            shutil.rmtree(out / name, ignore_errors=True)
            src = out / f"none_s{s}" / "checkpoints" / f"step_{anchor:07d}"
            shutil.copytree(src, out / name / "checkpoints" / src.name)
            gram_jobs[name] = [f"train.seed={s}", f"gram.weight={w}", f"gram.start_step={anchor}", "gram.ramp_steps=20",
                               "gram.remove_negatives=true"]
    run_all(gram_jobs)
    return probe_runs(out, data, [str(out / n) for n in [*(f"none_s{s}" for s in seeds), *gram_jobs]], seg_images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="CPU time per sample of the data path, gram.scale 1 vs 2")
    d.add_argument("--out", required=True)
    d.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    d.add_argument("--batches", type=int, default=6)
    d.add_argument("--batch-size", type=int, default=16)
    st = sub.add_parser("step", help="CPU time of the training step without / with Gram anchoring")
    st.add_argument("--out", required=True)
    st.add_argument("--steps", type=int, default=5)
    pr = sub.add_parser("probe", help="tile and dense probes of every checkpoint of the given run folders")
    pr.add_argument("--out", required=True)
    pr.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    pr.add_argument("--seg-images", type=int, default=96)
    pr.add_argument("runs", nargs="+")
    r = sub.add_parser("runs", help="learn_cpu runs with and without Gram anchoring from a mid-run anchor, then probe")
    r.add_argument("--out", required=True)
    r.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--weights", type=float, nargs="+", default=[2.0, 40.0])
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--every", type=int, default=50)
    r.add_argument("--anchor", type=int, default=150, help="the step Gram anchoring starts at (a checkpoint step)")
    r.add_argument("--seg-images", type=int, default=96)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.what == "runs":
        return runs(Path(a.out), Path(a.data), a.seeds, a.weights, a.steps, a.every, a.anchor, a.seg_images)
    if a.what == "data":
        return data_cost(Path(a.out), Path(a.data), a.batches, a.batch_size)
    if a.what == "step":
        return step_cost(Path(a.out), a.steps)
    return probe_runs(Path(a.out), Path(a.data), a.runs, a.seg_images)


if __name__ == "__main__":
    main()
