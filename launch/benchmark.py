#!/usr/bin/env python
"""Benchmark a config over node counts: images/s per device, step time breakdown, peak memory, MFU, scaling.

    python launch/benchmark.py --config configs/smoke.yaml --local --nproc 1,2             # this machine
    python launch/benchmark.py --config vitl14.yaml --nodes 1,2,4,8 --profile gpu-8x --synthetic-data
    python launch/benchmark.py --config vitl14.yaml --nodes 1,2 --profile gpu-8x --data-only   # loader only
    python launch/benchmark.py --config smoke.yaml --nodes 1,2 --tasks-per-node 1 --profile cpu-ci

Each point (a node count, or with --local a process count) is one job, run after the previous one
ends so that points do not share nodes: pathfm.train.main for --warmup + --measure steps (rates are
medians over the measured steps), or with --data-only the config's DataLoader without a model.
--synthetic-data sets data.source=random: compute and communication only, no I/O.
Results go to --out after every point: results.json, results.md (a table) and scaling.png
(weak scaling: the per-device rate relative to the smallest point). A re-run with the same --out
skips the points that finished (status ok) unless --overwrite. A point that cannot run (more nodes
than the partition has, parameters + optimizer larger than the device, out of memory, refused by
sbatch, past --point-timeout) is recorded with its reason and the other points go on.
No torch import here: --help is fast; the jobs import the training stack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# pending reasons that waiting will not change: give up on the point at once
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "InvalidQOS", "InvalidAccount",
                "QOSMaxNodePerJobLimit", "AssocMaxNodesPerJobLimit"}
FAILED_RANK_GRACE_S = 20  # after one rank recorded a failure, how long the others get before scancel


def parse_args(argv=None):
    from launch import slurm  # no torch: --help stays fast

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, or a bare name resolved in configs/")
    p.add_argument("--out", help="results folder; default runs/benchmark/<config stem>[-synthetic|-data]")
    p.add_argument("--warmup", type=int, default=5, help="steps (batches) not measured: allocator, autotuning, workers")
    p.add_argument("--measure", type=int, default=20, help="steps (batches) measured after the warm-up")
    p.add_argument("--synthetic-data", action="store_true", help="data.source=random: compute only, no I/O")
    p.add_argument("--data-only", action="store_true", help="iterate the config's DataLoader, no model: samples/s")
    p.add_argument("--overwrite", action="store_true", help="rerun points that already have a result in --out")
    p.add_argument("--memory-gib", type=float, help="memory per device to plan against (default: what the device has)")
    p.add_argument("--estimate", action="store_true", help="print each point's peak memory per GPU (the real step on "
                   "fake tensors, launch/estimate.py), the largest batch that fits --memory-gib and the step time on "
                   "paper; run nothing")
    p.add_argument("--point-timeout", type=float, default=3600, help="seconds a point may take, queueing included")
    p.add_argument("--local", action="store_true", help="run on this machine (torchrun), no SLURM")
    p.add_argument("--nproc", default="1", help="with --local: process counts, e.g. 1,2")
    s = p.add_argument_group("SLURM (flags override the profile)")
    s.add_argument("--nodes", default="1", help="node counts, e.g. 1,2,4,8")
    slurm.add_resource_flags(s)
    p.add_argument("overrides", nargs="*", help="dotted config overrides: optim.batch_size=32 dist.compile=true")
    # overrides may come between options (as with launch/train.py): collect the ones argparse left over
    args, rest = p.parse_known_args(argv)
    if [r for r in rest if r.startswith("-")]:
        p.error(f"unrecognized arguments: {' '.join(r for r in rest if r.startswith('-'))}")
    args.overrides += rest
    return args


def parse_counts(text: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"error: {flag} '{text}' must be a comma-separated list of positive integers, e.g. 1,2,4")
    return sorted(set(counts))


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathfm.benchmark import benchmark_overrides
    from pathfm.config import ConfigError, load_config, to_dict

    if args.synthetic_data and args.data_only:
        raise SystemExit("error: --data-only measures the data loader; --synthetic-data removes it. Pick one")
    if args.warmup < 1 or args.measure < 1:
        raise SystemExit(f"error: --warmup ({args.warmup}) and --measure ({args.measure}) must be at least 1")
    # random pixels: no manifest either (the GPU configs name one, and the config refuses one it would ignore)
    overrides = list(args.overrides) + (["data.source=random", "data.manifest="] if args.synthetic_data else [])
    overrides += benchmark_overrides(args.warmup, args.measure)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    mode = "data" if args.data_only else "synthetic" if args.synthetic_data else "train"
    out = Path(args.out or f"runs/benchmark/{Path(args.config).stem}{'' if mode == 'train' else '-' + mode}").resolve()
    cfg.train.output_dir = str(out / "points")
    setup = {"config": to_dict(cfg) | {"train": {k: v for k, v in to_dict(cfg)["train"].items() if k != "name"}},
             "mode": mode, "warmup": args.warmup, "measure": args.measure, "local": args.local}
    results = load_results(out, setup, args.overwrite)

    if args.local:
        points = [(f"local-{n}", 1, n) for n in parse_counts(args.nproc, "--nproc")]
    else:
        from launch import slurm

        try:
            profile = slurm.load_profile(args.profile) if args.profile else {}
            res = [slurm.resources(profile, nodes=n, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                                   cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
                                   account=args.account, qos=args.qos, constraint=args.constraint)
                   for n in parse_counts(args.nodes, "--nodes")]
        except slurm.LaunchError as e:
            raise SystemExit(f"error: {e}")
        points = [(f"nodes-{r.nodes}", r.nodes, r) for r in res]

    if args.estimate:  # will each point fit? no job, no GPU
        from launch.estimate import report

        for key, nodes, how in points:
            world, res_ = (how, None) if args.local else (how.world_size, how)
            memory_gib = args.memory_gib or (res_.gpu_memory_gib if res_ else None) or None
            print(f"{key} ({world} rank(s)):\n" + report(cfg, world, memory_gib, res_.gpu if res_ else "")[0], flush=True)
        return 0
    for key, nodes, how in points:
        if key in results["points"] and results["points"][key]["status"] == "ok":
            print(f"{key}: done before, skipped (--overwrite reruns it)")
            continue
        job_args = {"warmup": args.warmup, "measure": args.measure, "data": args.data_only, "memory_gib": args.memory_gib}
        print(f"{key}: running ({'local' if args.local else 'SLURM'}) ...", flush=True)
        run = (lambda d: run_local(d, how, job_args, args.point_timeout)) if args.local else \
            (lambda d: run_slurm(d, how, job_args, args.point_timeout))
        rec = {"nodes": nodes, **measure_point(out / "points" / key, cfg, run, warmup=args.warmup)}
        rec.setdefault("world_size", how if args.local else how.world_size)
        results["points"][key] = rec
        write_results(out, results)  # after every point: an interrupted benchmark keeps what finished
        print(f"{key}: {rec['status']}" + (f": {rec['error']}" if rec.get("error") else ""), flush=True)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'scaling.png'}")
    return 0 if all(p["status"] == "ok" for p in results["points"].values()) else 1


def load_results(out: Path, setup: dict, overwrite: bool) -> dict:
    """The results so far in `out`, or a fresh record; refuses results of another benchmark."""
    path = out / "results.json"
    if overwrite or not path.exists():
        return {**setup, "points": {}}
    old = json.loads(path.read_text())
    changed = [k for k in setup if k != "config" and old.get(k) != setup[k]]
    changed += [f"{sec}.{k}" for sec, keys in setup["config"].items() for k in keys
                if old.get("config", {}).get(sec, {}).get(k) != keys[k]]
    if changed:
        raise SystemExit(f"error: {path} holds results of a different benchmark (differs in {', '.join(changed[:6])}); "
                         "use --overwrite, or another --out")
    return old


# ---- running one point ------------------------------------------------------------------------


def measure_point(point_dir: Path, cfg, run, *, warmup: int) -> dict:
    """One point from a fresh folder holding cfg: run(point_dir) returns '' when the job ran, else why
    not; then the point's summary (pathfm.benchmark.summarize) and its wall time. train.main's final
    checkpoint and export are removed: GBs for a large model, and not a result."""
    from pathfm.benchmark import summarize
    from pathfm.config import to_yaml

    if point_dir.exists():  # an earlier failed or interrupted attempt: train.main would resume from it
        shutil.rmtree(point_dir)
    point_dir.mkdir(parents=True)
    cfg.train.output_dir, cfg.train.name = str(point_dir.parent), point_dir.name
    (point_dir / "config.yaml").write_text(to_yaml(cfg))
    t0 = time.time()
    failure = run(point_dir)
    rec = {"wall_s": round(time.time() - t0, 1)}
    rec.update({"status": "not_run", "error": failure} if failure else summarize(point_dir, warmup=warmup))
    for folder in ("checkpoints", "export"):
        shutil.rmtree(point_dir / folder, ignore_errors=True)
    return rec


def run_local(point_dir: Path, nproc: int, job_args: dict, timeout_s: float, torchrun: bool = True) -> str:
    """torchrun on this machine; '' when the job ran (its ranks wrote their results), else why not.
    torchrun=False (one process only): plain python, no process group, about 2 s less start-up."""
    if not torchrun and nproc != 1:
        raise ValueError(f"run_local: {nproc} processes need torchrun")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "launch.bench_point", "--point-dir", str(point_dir),
           "--warmup", str(job_args["warmup"]), "--measure", str(job_args["measure"])]
    cmd += ["--data-only"] if job_args["data"] else []
    cmd += ["--memory-gib", str(job_args["memory_gib"])] if job_args["memory_gib"] else []
    returncode = run_logged(cmd, point_dir / "log.txt", timeout_s)
    if returncode is None:
        return f"not finished after {timeout_s:.0f} s (--point-timeout); log: {point_dir / 'log.txt'}"
    if not list((point_dir / "ranks").glob("rank_*.json")):
        tail = (point_dir / "log.txt").read_text().strip().splitlines()[-1:] or ["(empty)"]
        return f"{'torchrun' if torchrun else 'launch.bench_point'} exited {returncode} with no result: {tail[0][:300]}; " \
               f"log: {point_dir / 'log.txt'}"
    return ""


def run_logged(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> int | None:
    """Run cmd with this checkout importable, stdout and stderr into log_path; its exit code, or None when
    it was killed at timeout_s (with every process it started: it runs in its own process group)."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def partition_nodes(partition: str) -> int | None:
    """Nodes in the partition (the default one when ''), from sinfo; None when sinfo cannot tell."""
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = {}
    for line in r.stdout.splitlines():  # "debug* 2": one line per partition and node state
        name, n = line.split()
        if (partition and name.rstrip("*") == partition) or (not partition and name.endswith("*")):
            counts[name] = counts.get(name, 0) + int(n)
    return sum(counts.values()) if counts else None


def run_slurm(point_dir: Path, res, job_args: dict, timeout_s: float) -> str:
    """Submit one point and wait for it; '' when the job ran, else why it could not."""
    from launch import slurm
    from launch.bench_point import BenchJob

    have = partition_nodes(res.partition)
    if have is not None and res.nodes > have:
        return f"{res.nodes} nodes requested, partition '{res.partition or 'default'}' has {have} (sinfo); point skipped"
    try:
        job = slurm.submit(BenchJob(str(point_dir), **job_args), res, f"pathfm-bench-{point_dir.name}", point_dir / "slurm")
    except slurm.LaunchError as e:
        return str(e)
    deadline, failed_at = time.time() + timeout_s, None
    while not job.done(force_check=True):
        reason = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.split()
        if reason[:1] == ["PENDING"] and reason[1] in NEVER_STARTS:
            subprocess.run(["scancel", job.job_id])
            return f"job {job.job_id} cannot start on this cluster (pending reason {reason[1]}); cancelled"
        if failed_at is None and any(json.loads(p.read_text())["status"] in ("oom", "error")
                                     for p in (point_dir / "ranks").glob("rank_*.json")):
            failed_at = time.time()  # the other ranks may wait in a collective forever
        if time.time() > deadline or (failed_at and time.time() - failed_at > FAILED_RANK_GRACE_S):
            subprocess.run(["scancel", job.job_id])
            if failed_at:
                return ""  # the failed rank's record is the result
            return f"job {job.job_id} not finished after --point-timeout {timeout_s:.0f} s (queued or running); cancelled"
        time.sleep(2)
    if not list((point_dir / "ranks").glob("rank_*.json")):
        return f"job {job.job_id} ended ({job.state}) with no result; logs: {point_dir / 'slurm'}"
    return ""


# ---- reporting --------------------------------------------------------------------------------


def per_device_rate(p: dict) -> float | None:
    if p.get("status") != "ok":
        return None
    return p.get("images_per_s_per_device") or p["samples_per_s"] / p["world_size"]


def add_efficiency(results: dict) -> list[dict]:
    """Points ordered by world size, each with weak-scaling efficiency against the smallest finished one."""
    points = sorted(({"key": k, **v} for k, v in results["points"].items()), key=lambda p: (p["world_size"], p["key"]))
    base = next((per_device_rate(p) for p in points if per_device_rate(p)), None)
    for p in points:
        rate = per_device_rate(p)
        p["scaling_efficiency"] = rate / base if rate and base else None
    return points


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: dict) -> str:
    points = add_efficiency(results)
    head = f"Benchmark ({results['mode']}): warm-up {results['warmup']}, measured {results['measure']} steps; " \
           f"model {results['config']['model']['arch']}/{results['config']['model']['patch_size']}, " \
           f"batch {results['config']['optim']['batch_size']} per device\n\n"
    if results["mode"] == "data":
        lines = ["| point | nodes | ranks | status | samples/s | samples/s per node | samples/s per rank | efficiency | note |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for p in points:
            lines.append(f"| {p['key']} | {p['nodes']} | {p['world_size']} | {p['status']} | {fmt(p.get('samples_per_s'))} | "
                         f"{fmt(p.get('samples_per_s_per_node'))} | {fmt(per_device_rate(p))} | "
                         f"{fmt(p['scaling_efficiency'], '.0%')} | {p.get('error', '')} |")
        return head + "\n".join(lines) + "\n"
    columns = ["point", "nodes", "devices", "status", "img/s", "img/s per device", "step s", "data s", "forward s",
               "backward s", "optimizer s", "comm s (alone)", "peak GiB", "TFLOP/s per device", "MFU", "weak scaling", "note"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for p in points:
        t = p.get("time_s", {})
        note = p.get("error") or p.get("note", "")
        if p["status"] == "oom" and "estimate_gib" in p:  # (too_large says it in its error already)
            note += f" (parameters + optimizer: {p['estimate_gib']:.1f} of {p['device_memory_gib']:.1f} GiB)"
        lines.append(
            f"| {p['key']} | {p['nodes']} | {p['world_size']} | {p['status']} | {fmt(p.get('images_per_s'))} | "
            f"{fmt(p.get('images_per_s_per_device'))} | {fmt(p.get('step_s'))} | {fmt(t.get('data'))} | {fmt(t.get('forward'))} | "
            f"{fmt(t.get('backward'))} | {fmt(t.get('optimizer'))} | {fmt(t.get('comm_isolated'))} | {fmt(p.get('memory_gib'))} | "
            f"{fmt(p.get('tflops_per_device'))} | {fmt(p.get('mfu'), '.1%')} | {fmt(p['scaling_efficiency'], '.0%')} | {note} |")
    return head + "\n".join(lines) + "\n"


def plot_scaling(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in add_efficiency(results) if p["scaling_efficiency"] is not None]
    unit = "samples/s per rank" if results["mode"] == "data" else "images/s per device"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [p["world_size"] for p in points]
    ax1.plot(x, [per_device_rate(p) for p in points], "o-")
    ax1.set(xlabel="devices (ranks)", ylabel=unit, title="throughput per device", ylim=(0, None))
    ax2.plot(x, [100 * p["scaling_efficiency"] for p in points], "o-", label="measured")
    ax2.axhline(90, color="gray", ls="--", label="90% target")
    top = max([110] + [100 * p["scaling_efficiency"] + 10 for p in points])  # a noisy CPU run can exceed 100%
    ax2.set(xlabel="devices (ranks)", ylabel="% of the smallest point's rate", title="weak scaling efficiency", ylim=(0, top))
    ax2.legend()
    for ax in (ax1, ax2):
        if x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(v) for v in x])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out / "results.json")  # whole or absent, even if the benchmark is killed here
    (out / "results.md").write_text(markdown_table(results))
    plot_scaling(results, out / "scaling.png")


if __name__ == "__main__":
    sys.exit(main())
