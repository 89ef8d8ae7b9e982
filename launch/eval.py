#!/usr/bin/env python
"""Probe the checkpoints of a run, beside it: every existing one, then each new one until the run ends.

    python launch/eval.py --watch runs/<run>                      # tasks from the run's config (probes.tasks)
    python launch/eval.py --watch runs/<run> --task crc=crc:/data/crc:train,crc:/data/crc:val --max-tiles 2000
    python launch/eval.py --watch runs/<run> --once               # what is there now, then stop
    python launch/eval.py --watch runs/<run> --slurm --profile gpu-8x      # the same as a 1-GPU SLURM job

    python launch/eval.py --embed --index /data/index/tcga --ckpt runs/<run>/export --mpp 0.5 --out features/x
    python launch/eval.py --embed ... --tasks 16 --profile gpu-8x         # a SLURM array, 1 GPU a task
    (eval/embed_slides.py's options: one HDF5 file per slide; the array's task k embeds index rows i % 16 == k, so
    tasks write disjoint slides; a requeued or resubmitted task skips the slides already written)

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
    if "--embed" in (sys.argv[1:] if argv is None else argv):
        return embed_main([a for a in (sys.argv[1:] if argv is None else argv) if a != "--embed"])
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


# ---------------------------------------------------------------------------------------------
# --embed: slide embeddings of a cohort (eval/embed_slides.py), here or as a SLURM array


class EmbedTask:
    """Array task k of n: eval.embed_slides on index rows i with i % n == k. A requeued task (time limit,
    preemption) starts again and skips the slides it wrote."""

    def __init__(self, argv: list[str], n_tasks: int):
        self.argv, self.n_tasks = argv, n_tasks

    def __call__(self, task: int):
        from eval.embed_slides import main as embed

        r = embed(self.argv, share=(task, self.n_tasks))
        return {k: v for k, v in r.items() if k != "failed"} | {"failed": len(r["failed"])}

    def checkpoint(self, task: int):  # submitit: requeue with the same task on SIGUSR2 / preemption
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def embed_main(argv: list[str]):
    from eval.embed_slides import add_embed_args
    from eval.extract import add_model_args
    from launch import slurm

    p = argparse.ArgumentParser(prog="launch/eval.py --embed", description="Slide embeddings of a cohort "
                                "(eval/embed_slides.py), on this machine or as a SLURM array of --tasks tasks.")
    add_model_args(p)
    add_embed_args(p)
    s = p.add_argument_group("SLURM (flags override the profile's probe job: 1 node, 1 task, at most 1 GPU)")
    s.add_argument("--tasks", type=int, default=0, help="array tasks, each a disjoint share of the slides (0: run here)")
    s.add_argument("--wait", action="store_true", help="wait for the array and print each task's counts")
    slurm.add_resource_flags(s)
    args = p.parse_args(argv)
    embed_argv = task_argv(argv)
    if not args.tasks:
        from eval.embed_slides import main as embed

        return embed(embed_argv)
    index = Path(args.index) if args.index else Path(args.out) / "index"
    if not (index / "index.json").is_file():  # every task must read one finished index, not build its own
        raise SystemExit(f"error: no built slide index at {index}; build it first (python launch/index.py MANIFEST "
                         f"-o {index} --mpps {args.mpp} ...) or give the training run's --index")
    try:
        res = slurm.probe_resources(slurm.resources(slurm.load_profile(args.profile) if args.profile else {}))
        flags = {k: getattr(args, k) for k in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "time",
                                               "partition", "account", "qos", "constraint")}
        res = slurm.resources(vars(res), **flags)
        jobs = submit_embed(embed_argv, args.tasks, res, Path(args.out))
    except slurm.LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"submitted slide embedding: array job {jobs[0].job_id.split('_')[0]} ({args.tasks} tasks) -> {args.out}; "
          f"logs in {Path(args.out) / 'slurm'}", flush=True)
    if args.wait:
        for job in jobs:
            print(job.result())
    return jobs


SLURM_FLAGS = {"--tasks", "--wait", "--profile", "--gpus-per-node", "--tasks-per-node", "--cpus-per-task", "--mem",
               "--time", "--partition", "--account", "--qos", "--constraint"}


def task_argv(argv: list[str]) -> list[str]:
    """The --embed command line minus the SLURM flags (and their values): what each array task runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in SLURM_FLAGS:
            skip = "=" not in a and a != "--wait"
            continue
        out.append(a)
    return out


def submit_embed(embed_argv: list[str], tasks: int, res, out: Path):
    """The array: one task per share, each on the resources of `res` (one node, one task)."""
    import submitit

    from launch import slurm

    if res.cpus_per_task > 1 and "--read-threads" not in embed_argv:
        embed_argv = [*embed_argv, "--read-threads", str(res.cpus_per_task - 1)]  # one core for the main thread
    if res.gpus_per_node and "--device" not in embed_argv:
        embed_argv = [*embed_argv, "--device", "cuda"]
    ex = submitit.SlurmExecutor(folder=out / "slurm", max_num_timeout=res.max_requeues)
    ex.update_parameters(**{**slurm.executor_parameters(res, "pathfm-embed"), "array_parallelism": tasks})
    try:
        return ex.map_array(EmbedTask(embed_argv, tasks), list(range(tasks)))
    except (submitit.core.utils.FailedJobError, OSError) as e:
        raise slurm.LaunchError(f"sbatch refused the embedding array: {str(e).strip().splitlines()[-1]}") from None


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
