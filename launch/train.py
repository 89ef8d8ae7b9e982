#!/usr/bin/env python
"""Launch pathfm training: on this machine (--local) or as a SLURM job (submitit).

    python launch/train.py --config configs/smoke.yaml --local              # one process
    python launch/train.py --config configs/smoke.yaml --local --nproc 2    # 2 processes (torchrun, gloo)
    python launch/train.py --nodes 8 --profile gpu-8x --config vitg14.yaml data.manifest=/data/tcga.csv
    python launch/train.py --nodes 2 --profile cpu-ci --config smoke.yaml --dry-run
    python launch/train.py --nodes 8 --profile gpu-8x --config vitg14.yaml --estimate   # will it fit? (no GPU needed)

A SLURM launch creates the run folder first (resolved config.yaml, and submit.sbatch, the same
job as a plain sbatch script), then submits with submitit and prints the job id and the logs.
A time limit or preemption makes the job save a checkpoint and requeue itself; the requeued job
resumes from it. Before submitting to GPUs it estimates one step's peak memory per GPU (launch/estimate.py) and
refuses, in one line, a config that will not fit the profile's gpu_memory_gib (--force submits anyway). Cluster settings come from --profile (slurm/profiles/NAME.yaml); the flags
below override it. No torch import here: --help and --dry-run stay fast and need no GPU stack.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None):
    from launch import slurm  # no torch: --help stays fast

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, or a bare name resolved in configs/")
    p.add_argument("--name", default="", help="run name (folder under train.output_dir); default: config stem")
    p.add_argument("--local", action="store_true", help="run on this machine, no SLURM")
    p.add_argument("--nproc", type=int, default=1, help="with --local: processes (torchrun, gloo on CPU)")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    s = p.add_argument_group("SLURM (flags override the profile)")
    s.add_argument("--nodes", type=int)
    slurm.add_resource_flags(s)
    s.add_argument("--global-batch", type=int, help="images per step over all tasks; sets optim.batch_size")
    s.add_argument("--dry-run", action="store_true", help="print the job (executor parameters, sbatch script); submit nothing")
    e = p.add_argument_group("will it fit (launch/estimate.py: the real step on fake tensors, no GPU needed)")
    e.add_argument("--estimate", action="store_true", help="print the peak memory per GPU by category, the largest batch "
                   "that fits --gpu-memory and the step time on paper; submit nothing")
    e.add_argument("--gpu-memory", type=float, help="GiB per GPU to plan against (default: the profile's gpu_memory_gib)")
    e.add_argument("--teacher-config", default="", help="the config distill.teacher was trained with, when its file is "
                   "not on this machine (the estimate builds that architecture)")
    e.add_argument("--force", action="store_true", help="submit even when the estimate says one step does not fit")
    p.add_argument("overrides", nargs="*", help="dotted config overrides: optim.base_lr=1e-3 train.steps=100")
    return p.parse_known_args(argv)


def main(argv=None):
    args, rest = parse_args(argv)
    from pathfm.config import ConfigError, load_config

    overrides = list(args.overrides) + rest
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    name = args.name or cfg.train.name or Path(args.config).stem
    overrides.append(f"train.name={name}")
    check_probes(cfg, warn_only=args.dry_run or args.estimate)
    if args.estimate and args.local:
        return print_estimate(cfg, args.nproc, args.gpu_memory, "", args.teacher_config)
    if args.local:
        return run_local(args, cfg, name, overrides)
    from launch.slurm import LaunchError

    try:
        return run_slurm(args, cfg, name)
    except LaunchError as e:
        raise SystemExit(f"error: {e}")


def check_probes(cfg, warn_only: bool = False) -> None:
    """Open every probe dataset as the probes will (eval/'s readers): a typo, a missing folder or split is one line
    now, before a run folder or a job exists. A dry run only warns: the data may exist only on the cluster."""
    if not cfg.probes.tasks:
        return
    from eval.datasets import DatasetError
    from eval.watch import check_tasks
    from pathfm.config import probe_tasks

    try:
        check_tasks(probe_tasks(cfg))
    except DatasetError as e:
        if not warn_only:
            raise SystemExit(f"error: config key 'probes.tasks': {e}") from None
        print(f"warning: config key 'probes.tasks': {e}; the probe job will fail unless it exists where it runs",
              file=sys.stderr)


def submit_probes(cfg, res, run_dir: Path, train_job_id: str, dry_run: bool = False):
    """The probe job beside a training job (probes.runner job): eval/watch.py until the training job leaves the
    queue, on the profile's probe resources. A refusal is a warning: the training job is already queued."""
    from launch import slurm
    from launch.eval import submit_probe_job

    pres = slurm.probe_resources(res)
    argv = [str(run_dir), "--job", train_job_id, "--device", "cuda" if pres.gpus_per_node else "cpu",
            "--num-workers", str(max(pres.cpus_per_task - 1, 0)), "--threads", str(max(pres.cpus_per_task, 1)), "--poll", "10"]
    if dry_run:
        print("probe job (submitit.SlurmExecutor parameters):")
        print(json.dumps(slurm.executor_parameters(pres, f"pathfm-probes-{run_dir.name}"), indent=2))
        return None
    try:
        job = submit_probe_job(run_dir, pres, argv)
    except slurm.LaunchError as e:
        print(f"warning: the probe job was not submitted ({e}); the training job runs without probes. Submit them "
              f"with: python launch/eval.py --watch {run_dir} --slurm --job {train_job_id}", file=sys.stderr)
        return None
    print(f"submitted probe job {job.job_id}: {len(cfg.probes.tasks)} task(s) on each checkpoint "
          f"(log {job.paths.stderr})", flush=True)
    return job


def print_estimate(cfg, world_size: int, gpu_memory_gib, gpu: str, teacher_config: str) -> int:
    from launch.estimate import report

    text, _ = report(cfg, world_size, gpu_memory_gib, gpu, teacher_config=teacher_config)
    print(text)
    return 0


def run_local(args, cfg, name, overrides):
    if args.nproc == 1:
        from pathfm.runfolder import STOPPED_EXIT
        from pathfm.train import main_for_user

        cfg.train.name = name
        result = main_for_user(cfg, args.debug)
        print(f"run folder: {result['run_dir']} (step {result['step']}, {result['status']})")
        return STOPPED_EXIT if result["status"] == "interrupted" else 0
    # several local processes: exactly what torchrun does on a node. What can be checked here is checked before
    # torchrun starts (one line, nothing written), as the single-process run does it.
    from pathfm.runfolder import STOPPED_EXIT, check_device, check_inputs, check_resume

    cfg.train.name = name
    run_dir = Path(cfg.train.output_dir) / name
    check_device(cfg)
    check_inputs(cfg)
    if (run_dir / "config.yaml").is_file():
        check_resume(cfg, run_dir, args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "pathfm.train", "--config", str(args.config), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # the cores shared out (torchrun would otherwise set 1 thread per process and print a warning about it)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    status_file = run_dir / "status.json"
    started = time.time()
    rc = run_torchrun(cmd, env, run_dir, name)
    # torchrun reports any worker's non-zero exit as 1: the run folder says whether it was a clean stop
    if rc and status_file.is_file() and status_file.stat().st_mtime >= started:
        if json.loads(status_file.read_text())["status"] == "interrupted":
            return STOPPED_EXIT
    return rc


def run_torchrun(cmd, env, run_dir: Path, name: str) -> int:
    """torchrun with the ranks' stderr passed through as it comes, and torchrun's own report of a failed rank (its
    log lines, ChildFailedError traceback and failure table) moved to <run>/torchrun.log: a rank's one-line error
    stays the last thing on the console. A rank killed by a signal (it could not say why) gets one line."""
    import re
    import signal

    own = re.compile(rb"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/")  # torchrun's logging format
    report, diverting, pending = [], False, b""
    started = time.time()
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    err = sys.stderr.buffer
    while chunk := os.read(p.stderr.fileno(), 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            diverting = diverting or bool(own.match(line) and b"failed (exitcode" in line)  # the report follows
            if diverting or own.match(line):
                report.append(line)
            else:
                err.write(line + b"\n")
        if b"\r" in pending and not diverting:  # progress bars redraw with \r: show them as they come
            shown, _, pending = pending.rpartition(b"\r")
            err.write(shown + b"\r")
        err.flush()
    report.append(pending) if diverting else err.write(pending)
    err.flush()
    rc = p.wait()
    if report:
        log = run_dir / "torchrun.log" if run_dir.is_dir() else Path(tempfile.gettempdir()) / f"pathfm-{name}-torchrun.log"
        with open(log, "ab") as f:
            f.write(b"\n".join(report) + b"\n")
        root = re.search(rb"Root Cause.*?rank\s*: (\d+).*?exitcode\s*: (-\d+)", b"\n".join(report), re.S)
        if root:  # a negative exit code: killed by a signal, nothing printed by the rank itself
            try:
                sig = signal.Signals(-int(root.group(2))).name
            except ValueError:
                sig = f"signal {-int(root.group(2))}"
            hint = " (the kernel's out-of-memory killer sends it)" if sig == "SIGKILL" else ""
            reason = f"rank {root.group(1).decode()} was killed by {sig}{hint}"
            print(f"error: {reason}; torchrun's report: {log}", file=sys.stderr)
            status = run_dir / "status.json"  # the dead rank wrote nothing: say here which rank failed, and why
            if run_dir.is_dir() and not (status.is_file() and status.stat().st_mtime >= started):
                from pathfm.runfolder import write_status  # imported already (run_local's checks): no cost

                write_status(run_dir, status="failed", ranks=[int(root.group(1))], reason=reason)
    return rc


def run_slurm(args, cfg, name):
    import yaml

    from launch import slurm
    from pathfm.config import to_yaml

    profile = slurm.load_profile(args.profile) if args.profile else {}
    res = slurm.resources(profile, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                          cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time, partition=args.partition,
                          account=args.account, qos=args.qos, constraint=args.constraint)
    if args.global_batch is not None:
        if args.global_batch % res.world_size:
            raise slurm.LaunchError(f"--global-batch {args.global_batch} does not divide over {res.nodes} node(s) x "
                                    f"{res.ntasks_per_node} task(s) = {res.world_size} ranks; use a multiple of {res.world_size}")
        cfg.optim.batch_size = args.global_batch // res.world_size
    # absolute, so the job finds the run folder wherever SLURM starts it
    cfg.train.name = name
    cfg.train.output_dir = str(Path(cfg.train.output_dir).resolve())
    if cfg.probes.tasks and cfg.probes.runner == "local":
        cfg.probes.runner = "job"  # a SLURM job of their own (submit_probes), not a process inside the training job
    run_dir = Path(cfg.train.output_dir) / name
    job_name = f"pathfm-{name}"
    config_path = run_dir / "config.yaml"
    gpu_memory = args.gpu_memory or res.gpu_memory_gib
    if args.estimate:
        return print_estimate(cfg, res.world_size, gpu_memory, res.gpu, args.teacher_config)
    if gpu_memory and res.gpus_per_node and not (args.force or args.dry_run):  # before any folder or job exists
        from launch.estimate import refusal

        if why := refusal(cfg, res.world_size, gpu_memory, args.teacher_config):
            raise slurm.LaunchError(why)
    script = slurm.sbatch_script(res, job_name, ["--config", str(config_path)], run_dir / "slurm")

    if args.dry_run:
        if cfg.data.manifest and not Path(cfg.data.manifest).is_file():  # it may exist only on the cluster
            print(f"warning: data.manifest '{cfg.data.manifest}' does not exist on this machine; the job will fail "
                  "unless it exists where the job runs", file=sys.stderr)
        print(f"run folder: {run_dir} (not created)\nsubmitit.SlurmExecutor parameters:")
        print(json.dumps(slurm.executor_parameters(res, job_name), indent=2))
        print(f"world size: {res.world_size}, global batch: {cfg.optim.batch_size * res.world_size}")
        print(f"submit.sbatch:\n{script}")
        if cfg.probes.tasks and cfg.probes.runner == "job":
            submit_probes(cfg, res, run_dir, "<training job>", dry_run=True)
        return 0

    if config_path.exists():  # resuming: refuse a folder that holds another model (train.main would, later)
        old = yaml.safe_load(config_path.read_text()) or {}
        if old.get("model") != yaml.safe_load(to_yaml(cfg))["model"]:
            raise slurm.LaunchError(f"run folder '{run_dir}' holds a run of another model; pick a new --name")
    # what submission failure must undo: the highest folder this launch creates, or, in an existing
    # run folder (a resume), the two files it rewrites
    top = run_dir / "slurm"
    while not top.parent.exists():
        top = top.parent
    top = None if top.exists() else top
    old_files = {p: p.read_bytes() for p in (config_path, run_dir / "submit.sbatch") if p.exists()}
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_yaml(cfg))
    (run_dir / "submit.sbatch").write_text(script)
    try:
        job = slurm.submit(slurm.TrainJob(str(config_path), res.max_requeues), res, job_name, run_dir / "slurm")
    except slurm.LaunchError:
        if top is not None:
            shutil.rmtree(top)
        if run_dir.exists():  # it was there before: put its files back as they were
            for p in (config_path, run_dir / "submit.sbatch"):
                p.write_bytes(old_files[p]) if p in old_files else p.unlink()
        raise
    print(f"submitted job {job.job_id}: {res.nodes} node(s) x {res.ntasks_per_node} task(s)")
    print(f"run folder: {run_dir}")
    print(f"logs: {job.paths.stdout} (and .err, one pair per task)", flush=True)
    if cfg.probes.tasks and cfg.probes.runner == "job":
        submit_probes(cfg, res, run_dir, str(job.job_id))
    warning = slurm.pending_reason(job.job_id)
    if warning:
        print(warning, file=sys.stderr)
    return job


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
