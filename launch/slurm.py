"""SLURM submission shared by the launchers: cluster profiles, the sbatch script, the requeuing job.

    res = resources(load_profile("slurm/profiles/cpu-ci.yaml"), nodes=2, tasks_per_node=1)
    executor_parameters(res, "pathfm-smoke")   # what submitit's SlurmExecutor gets
    sbatch_script(res, "pathfm-smoke", ["--config", "runs/smoke/config.yaml"], log_dir)  # the same job, plain sbatch
    job = submit(TrainJob("runs/smoke/config.yaml"), res, "pathfm-smoke", folder)

Cluster specifics (partition, GPUs per node, NCCL variables) are data in slurm/profiles/*.yaml;
this module turns them into a job. No torch or pathfm import at module level: the launcher's
--help and --dry-run stay fast; the job imports the training stack when it runs.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import submitit
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "train.sbatch"
BODY_MARKER = "# ---- job body"  # in TEMPLATE: everything below it is reused by the generated scripts



def add_resource_flags(group) -> None:
    """The SLURM flags both launchers take (each adds its own --nodes); they override the profile."""
    group.add_argument("--profile", help="cluster profile: slurm/profiles/NAME.yaml, or a path")
    group.add_argument("--gpus-per-node", type=int)
    group.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 on CPU-only nodes)")
    group.add_argument("--cpus-per-task", type=int)
    group.add_argument("--mem", help="SLURM syntax: 0 (whole node), 64G")
    group.add_argument("--time", help="SLURM syntax: minutes, H:MM:SS, D-HH:MM:SS")
    for flag in ("--partition", "--account", "--qos", "--constraint"):
        group.add_argument(flag)

class LaunchError(ValueError):
    """Bad launcher input or a refused submission; the message says what to change."""


@dataclass
class Resources:
    """What one job asks SLURM for. Field names are the keys of a profile YAML."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU-only cluster
    tasks_per_node: int = 0  # 0: one task per GPU (1 on CPU-only nodes)
    cpus_per_task: int = 1
    mem: str = ""  # SLURM syntax: "0" (all of the node), "64G"; "" = partition default
    time: str = "24:00:00"  # SLURM syntax: minutes, H:M:S, D-H[:M[:S]]
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    gpu: str = ""  # the GPU model (H100, A100, ...): its bf16 peak for the step time on paper (pathfm.flops)
    gpu_memory_gib: int = 0  # memory per GPU; launch/train.py refuses a config whose estimated step does not fit it
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: time to save a checkpoint
    max_requeues: int = 20  # time limits + preemptions before the job gives up
    sbatch: dict = field(default_factory=dict)  # other sbatch options, e.g. {exclusive: true, reservation: x}
    setup: list = field(default_factory=list)  # shell lines run before srun (module load ..., source ...)
    env: dict = field(default_factory=dict)  # environment of every task (NCCL_*, OMP_NUM_THREADS, ...)
    probe: dict = field(default_factory=dict)  # the probe job's own keys (gpus_per_node, cpus_per_task, time, partition,
                                               # ...) over probe_resources' defaults: 1 node, 1 task, at most 1 GPU

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def minutes(self) -> int:
        return slurm_minutes(self.time)


def load_profile(path: str | os.PathLike) -> dict:
    """A profile YAML -> {field: value}, every key checked against Resources."""
    p = Path(path)
    if not p.is_file() and not p.suffix and (ROOT / "slurm" / "profiles" / f"{p}.yaml").is_file():
        p = ROOT / "slurm" / "profiles" / f"{p}.yaml"  # a bare name, as for configs
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in (ROOT / "slurm" / "profiles").glob("*.yaml")))
        raise LaunchError(f"profile '{path}' not found; profiles in {ROOT / 'slurm' / 'profiles'}: {known}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise LaunchError(f"profile '{p}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(Resources))}")
    valid = {f.name: f for f in dataclasses.fields(Resources)}
    for k, v in data.items():
        if k not in valid:
            raise LaunchError(f"profile '{p}': unknown key '{k}'; valid keys: {', '.join(valid)}")
        want = {"int": int, "str": str, "dict": dict, "list": list}[valid[k].type]
        if want is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            data[k] = v = str(v)  # mem: 0, time: 60
        if not isinstance(v, want) or isinstance(v, bool):
            raise LaunchError(f"profile '{p}': key '{k}' expects {want.__name__}, got {v!r}")
    return data


def resources(profile: dict, **overrides) -> Resources:
    """Defaults <- profile <- command line (overrides that are None are not given)."""
    res = Resources(**{**profile, **{k: v for k, v in overrides.items() if v is not None}})
    for k in ("nodes", "cpus_per_task"):
        if getattr(res, k) < 1:
            raise LaunchError(f"{k.replace('_', '-')} must be at least 1, got {getattr(res, k)}")
    if res.gpus_per_node < 0 or res.tasks_per_node < 0:
        raise LaunchError("gpus-per-node and tasks-per-node must not be negative")
    res.minutes  # noqa: B018  (parse now: a bad --time fails before anything is created)
    return res


def probe_resources(res: Resources) -> Resources:
    """The probe job of a training job: one task on one node with at most one GPU, on the training's partition,
    account and QOS unless the profile's `probe:` section says otherwise (a CPU partition, a shorter time)."""
    base = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=min(res.gpus_per_node, 1), probe={}, mem="",
                               sbatch={k: v for k, v in res.sbatch.items() if k != "exclusive"})
    unknown = set(res.probe) - {f.name for f in dataclasses.fields(Resources)}
    if unknown:
        raise LaunchError(f"profile key 'probe' has unknown key(s) {sorted(unknown)}; it takes the keys of a profile")
    out = dataclasses.replace(base, **res.probe)
    out.minutes  # noqa: B018  (a bad probe time fails now)
    return out


def slurm_minutes(t: str) -> int:
    """SLURM's --time syntax -> whole minutes (rounded up): '90', '1:30:00', '2-00:00:00', '2-12'."""
    try:
        days, rest = (t.split("-", 1) if "-" in t else ("0", t))
        parts = [int(x) for x in rest.split(":")]
        if "-" in t:  # days-hours[:minutes[:seconds]]
            h, m, s = (parts + [0, 0])[:3]
        else:  # minutes | minutes:seconds | hours:minutes:seconds
            h, m, s = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
        minutes = int(days) * 1440 + h * 60 + m + (s > 0)
    except (ValueError, KeyError, TypeError):
        raise LaunchError(f"time '{t}' is not SLURM time syntax; use minutes, H:MM:SS or D-HH:MM:SS") from None
    if minutes <= 0:
        raise LaunchError(f"time '{t}' must be positive")
    return minutes


def env_lines(res: Resources) -> list[str]:
    """Shell lines that prepare every task: the checkout importable, then the profile's variables."""
    lines = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in res.env.items()]
    return lines + list(res.setup)


def executor_parameters(res: Resources, job_name: str) -> dict:
    """Keyword arguments of submitit.SlurmExecutor.update_parameters for this job."""
    params = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.minutes,
        "signal_delay_s": res.signal_delay_s,
        "setup": env_lines(res),
        "additional_parameters": {"requeue": True, **res.sbatch},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for k in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(res, k):
            params[k] = getattr(res, k)
    return params


def sbatch_script(res: Resources, job_name: str, train_args: list[str], log_dir: Path, python: str = sys.executable) -> str:
    """The job as a plain sbatch script (no submitit): the profile as #SBATCH lines, then the
    body of slurm/train.sbatch (srun python -m pathfm.train, requeue on time limit / preemption)."""
    opts = {"job-name": job_name, "nodes": res.nodes, "ntasks-per-node": res.ntasks_per_node,
            "cpus-per-task": res.cpus_per_task, "time": res.time, "signal": f"B:USR2@{res.signal_delay_s}",
            "requeue": True, "open-mode": "append", "output": f"{log_dir}/%j.out"}
    if res.gpus_per_node:
        opts["gpus-per-node"] = res.gpus_per_node
    for k in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(res, k):
            opts[k] = getattr(res, k)
    opts.update({k.replace("_", "-"): v for k, v in res.sbatch.items()})
    header = [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not False]
    body = TEMPLATE.read_text().split(BODY_MARKER, 1)[1]
    return "\n".join([
        "#!/bin/bash",
        "# Written by launch/train.py. Resubmit this exact job without submitit: sbatch <this file>",
        *header,
        "",
        *env_lines(res),
        f"export PATHFM_MAX_REQUEUES={res.max_requeues}",
        f"PYTHON={shlex.quote(python)}",
        f"set -- {shlex.join(train_args)}",
        f"cd {shlex.quote(os.getcwd())}",
        BODY_MARKER + body,
    ])


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: train from a resolved config file; requeue when interrupted.

    pathfm.train.main installs its own SIGTERM/SIGUSR1/SIGUSR2 handlers (they replace submitit's):
    on a time-limit or preemption signal it saves a checkpoint and returns status "interrupted".
    Then rank 0 requeues the job (as submitit would) and every rank leaves without a result, so
    submitit keeps waiting; the requeued job calls main again, which resumes from the checkpoint.
    A signal that arrives before main's handlers are installed reaches submitit's handler, which
    requeues this same callable through `checkpoint` (inherited: same arguments).
    """

    def __init__(self, config_path: str, max_requeues: int = 20):
        self.config_path = str(config_path)
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from pathfm.config import load_config
        from pathfm.train import main

        result = main(load_config(self.config_path))
        if result["status"] == "interrupted" and requeue_if_allowed(self.max_requeues):
            raise SystemExit(0)  # not an Exception: submitit writes no result, the job is not over
        return result


class WatchJob(submitit.helpers.Checkpointable):
    """The probe job: eval/watch.py on a run (its arguments), until the training job it names leaves the queue.
    At its own time limit submitit requeues it (`checkpoint`, inherited); the run's probes.jsonl says what is done."""

    def __init__(self, argv: list[str]):
        self.argv = [str(a) for a in argv]

    def __call__(self) -> int:
        from eval.watch import main

        return main(self.argv)


def requeue_if_allowed(max_requeues: int, environ=os.environ) -> bool:
    """Rank 0 asks SLURM to requeue this job; False when it should end instead (limit, or refused)."""
    restarts = int(environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        print(f"interrupted {restarts + 1} times (max_requeues={max_requeues}): not requeuing", file=sys.stderr)
        return False
    if environ.get("SLURM_PROCID", "0") == "0":
        job = environ["SLURM_ARRAY_JOB_ID"] + "_" + environ["SLURM_ARRAY_TASK_ID"] if "SLURM_ARRAY_JOB_ID" in environ else environ["SLURM_JOB_ID"]
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        # preemption with PreemptMode=REQUEUE requeues the job itself; scontrol then refuses: fine
        print(f"requeue of job {job}: {'ok' if r.returncode == 0 else r.stderr.strip()}", file=sys.stderr, flush=True)
    return True


# Pending reasons that waiting does not cure: the job asks for more than the partition, account or QOS allow
HOPELESS = {
    "PartitionNodeLimit": "more nodes than the partition has or allows: lower --nodes or pick another --partition",
    "PartitionTimeLimit": "a longer --time than the partition allows",
    "PartitionConfig": "more than the partition's nodes offer (nodes, CPUs, GPUs or memory): lower --nodes or the per-task request",
    "QOSMaxNodePerJobLimit": "more nodes than the QOS allows per job",
    "QOSMaxWallDurationPerJobLimit": "a longer --time than the QOS allows",
    "AssocMaxNodesPerJob": "more nodes than your account may use per job",
    "AssocMaxWallDurationPerJob": "a longer --time than your account may use",
    "InvalidAccount": "an account you cannot use: check --account",
    "InvalidQOS": "a QOS you cannot use: check --qos",
    "BadConstraints": "a --constraint no node satisfies",
    "ReqNodeNotAvail": "nodes that are down or reserved (it may start later if they come back)",
}


def pending_reason(job_id: str, seconds: float = 5.0, poll_s: float = 1.0) -> str | None:
    """Watch a submitted job for a few seconds; the warning to print when SLURM keeps it pending for a
    reason that waiting does not cure, else None (running, or pending for resources / priority)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], capture_output=True, text=True)
        state, _, reason = out.stdout.strip().partition("|")
        if state == "PENDING" and reason in HOPELESS:
            return (f"warning: job {job_id} is pending with reason {reason}: it asks for {HOPELESS[reason]}. "
                    f"It will not start by waiting; cancel it with `scancel {job_id}`")
        if state != "PENDING" or time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def submit(fn, res: Resources, job_name: str, folder: Path):
    """Submit `fn()` with submitit; SLURM's refusal (bad partition, ...) becomes a LaunchError with sbatch's words."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_requeues)
    executor.update_parameters(**executor_parameters(res, job_name))
    try:
        return executor.submit(fn)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as e:
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines()[-3:]
        raise LaunchError("sbatch refused the job: " + " | ".join(ln.strip() for ln in lines)) from None
