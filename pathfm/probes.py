"""Probes beside training: the run-folder record they share, and the low-priority process the trainer starts.

The probes themselves (extraction, kNN, linear) are eval/'s code, run by eval/watch.py in a process of its own;
the trainer never waits for them and never imports eval/. They talk only through the run folder:

    runs/<run>/checkpoints/step_X/probe.hold   the trainer: not read by a probe yet (pruning keeps it)
    runs/<run>/eval/probes.jsonl              one row per (step, task, protocol): ok, failed or skipped, with
                                              the metric, value, reason and time; the record of what is done
    runs/<run>/eval/probes.current            the probe in progress (pid, step, task): a killed probe is found
    runs/<run>/eval/best.json                 {task: {protocol: best step, value, checkpoint}}
    runs/<run>/eval/<step_X>/<task>/<protocol>/results.json, and TensorBoard scalars probe/<task>/<protocol>/*
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: eval/ lives beside pathfm/


def table_path(run_dir) -> Path:
    return Path(run_dir) / "eval" / "probes.jsonl"


def read_table(run_dir) -> list[dict]:
    path = table_path(run_dir)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            pass
    return rows


def done(run_dir) -> set:
    """(step, task, protocol) that have a row: each is probed once, whatever happened to it."""
    return {(r["step"], r["task"], r["protocol"]) for r in read_table(run_dir)}


def add_row(run_dir, step: int, task: str, protocol: str, status: str, **fields) -> dict:
    """Append one row (one write of one line, so a reader never sees half of it)."""
    row = {"step": step, "task": task, "protocol": protocol, "status": status, **fields,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = table_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def current_path(run_dir) -> Path:
    return Path(run_dir) / "eval" / "probes.current"


def alive(pid: int) -> bool:
    """Whether process `pid` runs (an exited child its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def record_dead_probe(run_dir, reason: str) -> list[dict]:
    """The probe that was in progress when its process died: a failed row for each of its protocols not done."""
    path = current_path(run_dir)
    if not path.is_file():
        return []
    try:
        cur = json.loads(path.read_text())
    except ValueError:
        cur = {}
    if cur.get("pid") and alive(cur["pid"]):  # another watcher's probe, running
        return []
    have, rows = done(run_dir), []
    for protocol in cur.get("protocols", []):
        if (cur["step"], cur["task"], protocol) not in have:
            rows.append(add_row(run_dir, cur["step"], cur["task"], protocol, "failed",
                                reason=f"{reason} while probing (pid {cur.get('pid')})"))
    path.unlink(missing_ok=True)
    return rows


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ProbeProcess:
    """The trainer's side: start `python -m eval.watch RUN --pid <trainer>` at nice 19 with `threads` torch threads,
    and notice at each checkpoint whether it died (record why, start another, at most `restarts` times).
    It ends by itself once the trainer has gone and every checkpoint it holds is probed."""

    def __init__(self, run_dir, threads: int = 1, restarts: int = 3):
        self.run_dir, self.threads, self.restarts_left = Path(run_dir), threads, restarts
        self.log = self.run_dir / "eval" / "watch.log"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "eval.watch", str(self.run_dir), "--pid", str(os.getpid()),
               "--threads", str(self.threads), "--nice", "19"]
        with open(self.log, "a") as log:  # the child keeps its own handle
            # own session: a Ctrl-C or SLURM signal to the trainer is the trainer's; the probes finish their queue
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def poll(self) -> str | None:
        """At a checkpoint: None while the probe process lives; else a warning (recorded, and a new one started)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        how = describe_exit(self.proc.returncode)
        record_dead_probe(self.run_dir, f"probe process {how}")
        if self.restarts_left <= 0:
            self.proc = None
            return f"probe process {how}; not restarted again (see {self.log})"
        self.restarts_left -= 1
        self.start()
        return f"probe process {how}; failure recorded in {table_path(self.run_dir)}, a new one started"


def start_probes(cfg, run_dir, say):
    """The probe process of a run whose config asks for one here (probes.runner local); else None."""
    if not cfg.probes.tasks or cfg.probes.runner != "local":
        return None
    if not (ROOT / "eval" / "watch.py").is_file():
        say(f"WARNING: probes.tasks is set but {ROOT / 'eval'} is missing (pathfm installed without its eval/ "
            "folder); no probes run. Run them from a checkout: python launch/eval.py --watch RUN")
        return None
    probes = ProbeProcess(run_dir, cfg.probes.threads)
    say(f"probes: {len(cfg.probes.tasks)} task(s) on each checkpoint in a low-priority process (pid {probes.proc.pid}, "
        f"log {probes.log}); results in {table_path(run_dir)} and TensorBoard probe/*")
    return probes


def holds(cfg, step: int) -> bool:
    """Whether the trainer marks this checkpoint for a probe (pruning then waits until the probe has copied it)."""
    from pathfm.config import probe_wanted

    p, t = cfg.probes, cfg.train
    return bool(p.tasks) and p.runner != "none" and probe_wanted(step, t.steps, t.ckpt_every, p.every)


def check_paths(cfg) -> None:
    """Every probe dataset's file or folder exists: refused at launch in one line, not found at the first checkpoint.
    (launch/train.py also opens them with eval/'s readers: layout, splits and classes.)"""
    from pathfm.config import probe_tasks

    for task in probe_tasks(cfg):
        for root in task.roots():
            if not Path(root).exists():
                raise SystemExit(f"config key 'probes.tasks': task '{task.name}' reads '{root}', which does not exist")
