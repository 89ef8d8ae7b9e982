#!/usr/bin/env python
"""Probe the checkpoints of a run, beside it: every existing one, then each new one until the run ends.

    python launch/eval.py --watch runs/<run>                      # tasks from the run's config (probes.tasks)
    python launch/eval.py --watch runs/<run> --task crc=crc:/data/crc:train,crc:/data/crc:val --max-tiles 2000
    python launch/eval.py --watch runs/<run> --once               # what is there now, then stop
    python launch/eval.py --watch runs/<run> --slurm --profile gpu-8x      # the same as a 1-GPU SLURM job

Works on any run folder, also one trained without probes or by an older pathfm. Results: runs/<run>/eval/probes.jsonl
(one row per checkpoint, task and protocol), eval/<step>/<task>/<protocol>/results.json, TensorBoard probe/* in the
run's tb/, eval/best.json; `python eval/report.py runs/<run>/eval` draws the curves. A watcher stops when the run
has ended: status.json newer than its metrics, or, with --job, when that SLURM job has left the queue (a
requeued training job keeps it watching). No torch import here: --help stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None):
    from eval.watch import add_task_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--watch", required=True, metavar="RUN", help="run folder (runs/<name>)")
    add_task_args(p)
    p.add_argument("--once", action="store_true", help="probe the checkpoints there are now, then stop")
    p.add_argument("--job", help="the run ends when this SLURM job (its training) leaves the queue")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between looks for new checkpoints")
    s = p.add_argument_group("SLURM (flags override the profile's probe job)")
    s.add_argument("--slurm", action="store_true", help="run the watcher as a SLURM job (submitit)")
    from launch import slurm

    slurm.add_resource_flags(s)
    return p.parse_args(argv)


def watch_argv(args, run: Path, job: str | None, device: str | None, workers: int | None) -> list[str]:
    """The eval.watch command line of this launch."""
    out = [str(run), "--poll", str(args.poll), "--batch-size", str(args.batch_size)]
    out += [a for t in args.task for a in ("--task", t)]
    for flag in ("protocol", "every", "max_tiles", "embedding", "img_size", "threads"):
        if getattr(args, flag) is not None:
            out += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    out += ["--device", device] if device else []
    out += ["--num-workers", str(workers if workers is not None else args.num_workers)]
    return out + (["--once"] if args.once else []) + (["--job", job] if job else [])


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.watch).resolve()
    if not (run / "checkpoints").is_dir() and not (run / "config.yaml").is_file():  # a launcher writes config.yaml first
        raise SystemExit(f"error: '{args.watch}' is not a pathfm run folder (no checkpoints/ or config.yaml in it)")
    from eval.datasets import DatasetError
    from eval.watch import check_tasks, settings
    from pathfm.config import ConfigError

    try:  # the tasks as the watcher will read them: refused here, in one line, not in a job an hour from now
        opts = settings(run, args)
        if not opts["tasks"]:
            raise ConfigError(f"no probe tasks: the run's config has no probes.tasks; give --task NAME=TRAIN,TEST")
        check_tasks(opts["tasks"])
    except (ConfigError, DatasetError) as e:
        raise SystemExit(f"error: {e}") from None
    if not args.slurm:
        from eval.watch import main as watch

        return watch(watch_argv(args, run, args.job, args.device, None))
    from launch import slurm

    try:
        return submit_watch(args, run, opts)
    except slurm.LaunchError as e:
        raise SystemExit(f"error: {e}") from None


def submit_watch(args, run: Path, opts: dict):
    from launch import slurm

    profile = slurm.load_profile(args.profile) if args.profile else {}
    train = slurm.resources(profile)
    res = slurm.probe_resources(train)
    flags = {k: getattr(args, k) for k in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time",
                                           "partition", "account", "qos", "constraint")}
    res = slurm.resources(vars(res), **flags)
    job = args.job
    if job is None:  # the run's own training job, while it is queued or running
        env = json.loads((run / "env.json").read_text()) if (run / "env.json").is_file() else {}
        job = env.get("slurm_job_id") or None
    device = args.device or ("cuda" if res.gpus_per_node else "cpu")
    sub = submit_probe_job(run, res, watch_argv(args, run, job, device, max(res.cpus_per_task - 1, 0)))
    print(f"submitted probe job {sub.job_id} for {run} ({len(opts['tasks'])} task(s)); log: {sub.paths.stderr}")
    return sub


def submit_probe_job(run: Path, res, argv: list[str]):
    """Submit eval.watch on `run` as its own SLURM job; logs in runs/<run>/eval/slurm/."""
    from launch import slurm

    return slurm.submit(slurm.WatchJob(argv), res, f"pathfm-probes-{run.name}", run / "eval" / "slurm")


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
