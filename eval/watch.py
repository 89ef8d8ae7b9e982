"""Probe every checkpoint of a run as it appears, beside training (never inside its step), until the run ends.

    python -m eval.watch runs/<run>                       # tasks from the run's config (probes.tasks)
    python -m eval.watch runs/<run> --task crc=crc:/data/crc:train,crc:/data/crc:val --once
    python launch/eval.py --watch runs/<run> [--slurm --profile gpu-8x]   # the same, as a user or SLURM job

For each checkpoint it wants (probes.every), it first copies the teacher backbone out of the checkpoint into
eval/snapshots/ (seconds; a thread does this as soon as a checkpoint appears, so keep_last pruning waits for the
copy, not for the probes) and releases the trainer's hold on it. Then, one checkpoint at a time, in step order:
embeddings of each task's train and test set (eval/extract.py), each protocol (eval/knn.py, eval/linear.py, run
on those embeddings), and the records: results.json in eval/<step>/<task>/<protocol>/, a row in eval/probes.jsonl,
TensorBoard scalars probe/<task>/<protocol>/<metric> at the checkpoint's step in the run's tb/, eval/best.json.
The table is the record of what is done: a probe is never repeated, and one that failed or was killed has a row
that says why. One watcher per run (a lock); a second one waits for the first.

Slide-level tasks (NAME@abmil+meanpool=LABELS.csv,SLIDES) and dense ones (NAME@seg=TRAIN,TEST) run beside the tile
tasks, start to end on a budget (probes.max_slides, probes.max_tiles), with the same records (eval/slide_dense.py).

The run has ended when the process given by --pid is gone (the trainer that started us), the SLURM job given by
--job has left the queue, or else when status.json is newer than the run's metrics (a launch wrote it on leaving).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/watch.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathfm import probes as pprobes  # noqa: E402  (the run-folder record shared with the trainer; no torch)
from pathfm.config import ProbeTask, parse_probe_task, probe_wanted  # noqa: E402

SQUEUE_LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The probe settings, shared with launch/eval.py; each defaults to the run's config (probes.*)."""
    g = p.add_argument_group("probes (default: the run's probes.* config)")
    g.add_argument("--task", action="append", default=[], metavar="NAME[@knn+linear]=TRAIN,TEST",
                   help="a labelled task, eval/'s dataset specs (repeat for several); replaces probes.tasks")
    g.add_argument("--protocol", help="protocols of tasks without @...: knn, linear or knn+linear")
    g.add_argument("--every", type=int, help="probe every k-th checkpoint (and the final one)")
    g.add_argument("--max-tiles", type=int, help="a fixed random subset of this many tiles per split (0 = all)")
    g.add_argument("--embedding", help="cls, cls_mean or lastN")
    g.add_argument("--img-size", type=int)
    g.add_argument("--threads", type=int, help="torch threads")
    g.add_argument("--device", help="cpu or cuda (default: cpu; cuda in a SLURM probe job with a GPU)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image decoding")


def latest_config(run_dir: Path) -> dict:
    """The run's resolved config as its newest launch wrote it (config.yaml or config.restart_N.yaml), as a dict;
    read leniently, so runs of older pathfm versions load too."""
    import yaml

    files = sorted(run_dir.glob("config.restart_*.yaml"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    files = files or [run_dir / "config.yaml"]
    return (yaml.safe_load(files[-1].read_text()) or {}) if files[-1].is_file() else {}


def settings(run_dir: Path, args) -> dict:
    """Tasks and options: the command line over the run's probes section over the defaults."""
    from pathfm.config import ProbesConfig

    cfg = latest_config(run_dir)
    section = {**vars(ProbesConfig()), **cfg.get("probes", {})}
    for key in ("protocol", "every", "max_tiles", "embedding", "img_size", "threads"):
        if getattr(args, key) is not None:
            section[key] = getattr(args, key)
    texts = args.task or section["tasks"]
    texts = [texts] if isinstance(texts, str) else texts
    tasks = [parse_probe_task(t, section["protocol"], "--task" if args.task else f"probes.tasks[{i}]")
             for i, t in enumerate(texts)]
    train = cfg.get("train", {})
    return {**section, "tasks": tasks, "final_step": train.get("steps", 0), "ckpt_every": train.get("ckpt_every", 1)}


def run_keep_last(run_dir: Path) -> int | None:
    """train.keep_last of the run's newest config, read at each use (pathfm's default where an older config lacks
    the key); None for a folder without a config: its promise about disk is unknown, so nothing is pruned."""
    from pathfm.config import TrainConfig

    cfg = latest_config(run_dir)
    return cfg.get("train", {}).get("keep_last", TrainConfig.keep_last) if cfg else None


def check_tasks(tasks: list[ProbeTask]) -> None:
    """Open every dataset as the probes will (train, then test with the train set's classes); a wrong folder,
    layout, split or class is a DatasetError naming it, before anything is submitted or written."""
    from eval.datasets import DatasetError, open_dataset
    from eval.slide_dense import check_task

    for t in tasks:
        if t.level != "tile":  # slide-level and dense tasks: their labels, slides or image / mask folders
            check_task(t)
            continue
        try:
            train = open_dataset(t.train)
            open_dataset(t.test, classes=train.classes)
        except DatasetError as e:
            raise DatasetError(f"probe task '{t.name}': {e}") from None


def subset(ds, n: int, seed: str):
    """A fixed random subset of n items (the same at every checkpoint), in the dataset's order."""
    import random

    from eval.datasets import LabelledImages

    if not n or n >= len(ds):
        return ds
    keep = sorted(random.Random(seed).sample(range(len(ds)), n))
    return LabelledImages(ds.name, ds.classes, [ds.items[i] for i in keep], [ds.labels[i] for i in keep], ds.h5_path)


def squeue_state(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""


class Watcher:
    def __init__(self, run_dir: Path, opts: dict, args):
        self.run, self.opts, self.args = run_dir, opts, args
        self.ckpts, self.eval = run_dir / "checkpoints", run_dir / "eval"
        self.snaps = self.eval / "snapshots"
        self.lock = threading.Lock()  # the snapshot thread and the main loop
        self.datasets, self.tb, self.job_gone = {}, None, 0
        # (step, task, protocol) with a row: read once, here, while this process holds the run's watch.lock (made
        # after take_lock), so it is the table's only writer; add_row keeps it current. Not re-read at every poll
        # for every checkpoint: the table grows with the run.
        self.have = pprobes.done(run_dir)

    # --- when to stop
    def ended(self) -> bool:
        a = self.args
        if a.once:
            return True
        if a.pid:
            return not pprobes.alive(a.pid)
        if a.job:
            state = squeue_state(a.job)
            self.job_gone = 0 if state in SQUEUE_LIVE else self.job_gone + 1
            return self.job_gone >= 2  # twice in a row: a requeue passes through states squeue may not list
        status, metrics = self.run / "status.json", self.run / "metrics.jsonl"
        return status.is_file() and (not metrics.is_file() or status.stat().st_mtime >= metrics.stat().st_mtime)

    # --- snapshots: the teacher out of each wanted checkpoint, then the trainer's hold released
    def wanted(self, step: int) -> bool:
        o = self.opts
        return probe_wanted(step, o["final_step"], o["ckpt_every"], o["every"])

    def todo(self, step: int) -> list[tuple[ProbeTask, list[str]]]:
        out = [(t, [p for p in t.protocols if (step, t.name, p) not in self.have]) for t in self.opts["tasks"]]
        return [(t, ps) for t, ps in out if ps]

    def add_row(self, step: int, task: str, protocol: str, status: str, **fields) -> dict:
        """A row in the table, and in the done-set todo() reads."""
        row = pprobes.add_row(self.run, step, task, protocol, status, **fields)
        self.have.add((step, task, protocol))
        return row

    def snapshot_new(self) -> int:
        """Copy the EMA's backbone out of every new wanted checkpoint and release the trainer's hold on it, then apply
        keep_last; returns how many were copied."""
        import torch

        from pathfm.checkpoint import PROBE_HOLD
        from pathfm.weights import load_ema_backbone

        n = 0
        with self.lock:
            folders = sorted(p for p in self.ckpts.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for folder in folders:
                step, snap = int(folder.name.split("_")[1]), self.snaps / f"{folder.name}.pt"
                if not (folder / "meta.json").is_file():
                    continue
                todo = self.todo(step) if self.wanted(step) and not snap.exists() else []
                if todo:
                    try:
                        vit, meta = load_ema_backbone(folder)
                        state = {"vit_args": vars(vit.args), "state_dict": vit.state_dict(), "step": step,
                                 "mean": meta.get("mean", [0.5] * 3), "std": meta.get("std", [0.5] * 3),
                                 "source": str(folder)}
                        self.snaps.mkdir(parents=True, exist_ok=True)
                        torch.save(state, snap.with_suffix(".tmp"))
                        snap.with_suffix(".tmp").rename(snap)
                        n += 1
                    except Exception as e:  # noqa: BLE001  (pruned under us, or unreadable: recorded, never fatal)
                        gone = not folder.exists()
                        for t, protocols in todo:
                            for p in protocols:
                                self.add_row(step, t.name, p, "skipped" if gone else "failed",
                                             checkpoint=str(folder), reason="checkpoint pruned before the probe "
                                             "read it" if gone else f"reading the checkpoint: {type(e).__name__}: {e}")
                        continue
                # copied now, or before by a probe process killed before this line, or not wanted: released
                (folder / PROBE_HOLD).unlink(missing_ok=True)
            self.prune()
        return n

    def prune(self) -> None:
        """keep_last, as the trainer applies it (pathfm.checkpoint.prune_checkpoints): a checkpoint the trainer kept
        only for a copy goes once copied. Listed now, after the releases: the trainer's last save may have come
        during a copy, and after the last save nothing else would prune it."""
        from pathfm.checkpoint import prune_checkpoints

        keep_last = run_keep_last(self.run)
        if keep_last is not None:
            prune_checkpoints(self.ckpts, keep_last)

    def snapshot_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.args.poll):
            try:
                self.snapshot_new()
            except Exception as e:  # noqa: BLE001
                print(f"snapshot thread: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def pending(self) -> list[Path]:
        return sorted(self.snaps.glob("step_*.pt")) if self.snaps.is_dir() else []

    # --- one checkpoint
    def backbone(self, snap: Path):
        import torch

        from eval.backbone import EvalBackbone
        from pathfm.export import timm_name
        from pathfm.vit import ViTArgs, build_vit

        s = torch.load(snap, map_location="cpu", weights_only=True)
        vit = build_vit(ViTArgs(**s["vit_args"]))
        vit.load_state_dict(s["state_dict"])
        a = vit.args
        return EvalBackbone(vit.eval(), tuple(s["mean"]), tuple(s["std"]), s["source"],
                            timm_name(a.arch, a.patch_size, a.num_registers), s["step"]), s["step"]

    def dataset(self, task: ProbeTask, split: str, classes=None):
        from eval.datasets import open_dataset

        key = (task.name, split)
        if key not in self.datasets:  # listed once per process: a big folder takes seconds to list
            spec = task.train if split == "train" else task.test
            self.datasets[key] = subset(open_dataset(spec, classes=classes), self.opts["max_tiles"], f"{task.name}:{split}")
        return self.datasets[key]

    def probe(self, snap: Path) -> None:
        from eval.extract import extract, save_split

        backbone, step = self.backbone(snap)
        label, o, a = snap.stem, self.opts, self.args
        device = a.device or "cpu"
        for task, protocols in self.todo(step):
            pprobes.current_path(self.run).write_text(json.dumps(
                {"pid": os.getpid(), "step": step, "task": task.name, "protocols": protocols}))
            base = self.eval / label / task.name
            if task.level != "tile":  # slide-level and dense tasks run start to end in eval/slide_dense.py
                self.probe_task(step, backbone, task, protocols, base)
                pprobes.current_path(self.run).unlink(missing_ok=True)
                continue
            emb = base / "embeddings" / f"{o['embedding']}-{o['img_size']}px"
            started = time.time()
            try:
                classes = None
                for split in ("train", "test"):
                    ds = self.dataset(task, split, classes)
                    classes = ds.classes
                    result = extract(backbone, ds, o["embedding"], batch_size=a.batch_size, num_workers=a.num_workers,
                                     device=device, img_size=o["img_size"], progress=False)
                    save_split(emb, split, result, {"dataset": task.train if split == "train" else task.test,
                                                    "embedding": o["embedding"], "model": backbone.describe(),
                                                    "img_size": o["img_size"], "max_tiles": o["max_tiles"]})
                extract_s = time.time() - started
            except BaseException as e:  # noqa: BLE001  (a SystemExit from eval/ included; KeyboardInterrupt too)
                for p in protocols:
                    self.add_row(step, task.name, p, "failed", checkpoint=backbone.source,
                                 reason=f"embeddings: {type(e).__name__}: {e}")
                pprobes.current_path(self.run).unlink(missing_ok=True)
                if isinstance(e, KeyboardInterrupt):
                    raise
                continue
            for p in protocols:
                self.run_protocol(step, backbone.source, task, p, emb, base / p, extract_s)
            shutil.rmtree(base / "embeddings", ignore_errors=True)  # a checkpoint's embeddings are not reused
            pprobes.current_path(self.run).unlink(missing_ok=True)
        snap.unlink(missing_ok=True)

    def probe_task(self, step, backbone, task, protocols, base) -> None:
        """A slide-level or dense task on one checkpoint: its rows, scalars and best.json entries, as run_protocol's."""
        from eval.slide_dense import run_task

        a, started, err = self.args, time.time(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                results = run_task(backbone, task, protocols, base, self.opts, device=a.device or "cpu",
                                   num_workers=a.num_workers, batch_size=a.batch_size,
                                   index_dir=self.eval / "slide_index" / task.name)  # a manifest: indexed once a run
        except BaseException as e:  # noqa: BLE001
            for p in protocols:
                self.add_row(step, task.name, p, "failed", checkpoint=backbone.source, reason=f"{type(e).__name__}: {e}")
            if isinstance(e, KeyboardInterrupt):
                raise
            return
        finally:
            sys.stderr.write("".join(line for line in err.getvalue().splitlines(keepends=True) if "\r" not in line))
        for p in protocols:
            head = results[p]["headline"]
            self.add_row(step, task.name, p, "ok", checkpoint=backbone.source, metric=head["metric"], value=head["mean"],
                         seconds=round(time.time() - started, 2), results=str(base / p / "results.json"))
            self.scalars(step, task.name, p, results[p])
            self.best(step, backbone.source, task.name, p, head, base / p)

    def run_protocol(self, step, source, task, protocol, emb, out, extract_s) -> None:
        from eval import knn, linear

        started = time.time()
        argv = ["--embeddings", str(emb), "--task", task.name, "--out", str(out), "--overwrite"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):  # eval/'s progress bars are for people at a terminal, not a log
                (knn if protocol == "knn" else linear).main(argv)
            results = json.loads((out / "results.json").read_text())
        except BaseException as e:  # noqa: BLE001
            self.add_row(step, task.name, protocol, "failed", checkpoint=source,
                         reason=f"{type(e).__name__}: {e}")
            if isinstance(e, KeyboardInterrupt):
                raise
            return
        finally:
            sys.stderr.write("".join(line for line in err.getvalue().splitlines(keepends=True) if "\r" not in line))
        head = results["headline"]
        self.add_row(step, task.name, protocol, "ok", checkpoint=source, metric=head["metric"],
                     value=head["mean"], seconds=round(extract_s + time.time() - started, 2),
                     results=str(out / "results.json"))
        self.scalars(step, task.name, protocol, results)
        self.best(step, source, task.name, protocol, head, out)

    def scalars(self, step, task, protocol, results) -> None:
        """probe/<task>/<protocol>/<metric> for the headline's test metrics (kNN: at the headline k)."""
        from torch.utils.tensorboard import SummaryWriter

        if self.tb is None:  # its own event file in the run's tb/: one TensorBoard view with the losses
            self.tb = SummaryWriter(str(self.run / "tb"), filename_suffix=".probes")
        split, _, name = results["headline"]["metric"].partition("/")
        prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for metric, v in results["metrics"].get(split, {}).items():
            if metric.startswith(prefix):
                self.tb.add_scalar(f"probe/{task}/{protocol}/{metric[len(prefix):]}", v["mean"], step)
        self.tb.flush()

    def best(self, step, source, task, protocol, head, out) -> None:
        path = self.eval / "best.json"
        best = json.loads(path.read_text()) if path.is_file() else {}
        now = best.setdefault(task, {}).get(protocol)
        if now is None or head["mean"] > now["value"]:
            best[task][protocol] = {"step": step, "checkpoint": source, "metric": head["metric"], "value": head["mean"],
                                    "results": str(out / "results.json")}
            path.with_suffix(".tmp").write_text(json.dumps(best, indent=2) + "\n")
            path.with_suffix(".tmp").replace(path)

    # --- the loop
    def run_until_ended(self) -> int:
        """Returns the number of (checkpoint, task, protocol) probes recorded."""
        before = len(pprobes.read_table(self.run))
        stop = threading.Event()
        thread = threading.Thread(target=self.snapshot_loop, args=(stop,), daemon=True)
        thread.start()
        try:
            while True:
                ended = self.ended()  # before the last look: whatever the run wrote is then visible
                self.snapshot_new()
                for snap in self.pending():
                    try:
                        self.probe(snap)
                    except Exception as e:  # noqa: BLE001  (an unreadable snapshot: recorded, the next one goes on)
                        step = int(snap.stem.split("_")[1])
                        for t, protocols in self.todo(step):
                            for p in protocols:
                                self.add_row(step, t.name, p, "failed", reason=f"{type(e).__name__}: {e}")
                        snap.unlink(missing_ok=True)
                if ended and not self.snapshot_new() and not self.pending():
                    break
                time.sleep(self.args.poll)
        finally:
            stop.set()
            if self.tb is not None:
                self.tb.close()
        return len(pprobes.read_table(self.run)) - before


def take_lock(run_dir: Path):
    """One watcher per run; a second waits (a new launch's watcher behind one still finishing the last launch's)."""
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    f = open(run_dir / "eval" / "watch.lock", "a+")
    said = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if not said:
                print(f"another probe process is watching {run_dir}; waiting for it to finish", file=sys.stderr, flush=True)
                said = True
            time.sleep(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (runs/<name>)")
    add_task_args(p)
    p.add_argument("--pid", type=int, help="the run ends when this process ends (the trainer that started us)")
    p.add_argument("--job", help="the run ends when this SLURM job leaves the queue")
    p.add_argument("--once", action="store_true", help="probe the checkpoints there are now, then stop")
    p.add_argument("--poll", type=float, default=3.0, help="seconds between looks for new checkpoints")
    p.add_argument("--nice", type=int, default=0, help="lower this process's priority by this much (trainer: 19)")
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    run_dir = Path(args.run)
    if not (run_dir / "checkpoints").is_dir() and not (run_dir / "config.yaml").is_file():  # a launcher writes config.yaml first
        raise SystemExit(f"error: '{run_dir}' is not a pathfm run folder (no checkpoints/ or config.yaml in it)")
    from pathfm.config import ConfigError

    try:
        opts = settings(run_dir, args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if not opts["tasks"]:
        raise SystemExit(f"error: no probe tasks: the run's config has no probes.tasks; give --task NAME=TRAIN,TEST")
    import torch

    torch.set_num_threads(opts["threads"])
    lock = take_lock(run_dir)
    # a probe process that died in the middle of a probe (kill -9, out of memory) left its marker: record it
    for row in pprobes.record_dead_probe(run_dir, "the probe process ended"):
        print(f"recorded: step {row['step']} {row['task']}/{row['protocol']} failed ({row['reason']})", file=sys.stderr)
    names = ", ".join(f"{t.name} ({'+'.join(t.protocols)})" for t in opts["tasks"])
    print(f"watching {run_dir}: {names}; every {opts['every']} checkpoint(s), pid {os.getpid()}", file=sys.stderr,
          flush=True)
    n = Watcher(run_dir, opts, args).run_until_ended()
    lock.close()
    print(f"run ended; {n} probe(s) recorded in {pprobes.table_path(run_dir)}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
