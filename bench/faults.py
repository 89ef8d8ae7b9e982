"""Faults that are not bad bytes, reproduced with real processes and real kills: one table row each.

    python bench/faults.py build-stall    # a manifest row that never answers (a FIFO) in the index build
    python bench/faults.py build-kill     # an index-build worker killed (SIGKILL) while it describes a slide
    python bench/faults.py loader-stall   # a slide's storage stops answering during training
    python bench/faults.py loader-kill    # a DataLoader worker killed (SIGKILL) during training
    python bench/faults.py data           # the four above
    python bench/faults.py rank-disk-full # 2 ranks checkpointing onto a full tmpfs (root: mounts one)
    python bench/faults.py rank-kill      # rank 2 of 4 SIGKILLed mid-step; then resumed on 2 ranks
    python bench/faults.py ranks          # the two above

Everything runs the command lines a user runs (python -m pathfm.data.index, python -m pathfm.train) on small
synthetic slides in a temporary folder. Each row says what happened, the time from the fault to a clean end
(the process exited with its status), and that nothing was lost: the build keeps every other slide; the
training run keeps its previous checkpoint, and running the same command again resumes from it and finishes.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slides(folder: Path, n: int, size: int = 2048) -> list[Path]:
    from pathfm.data.synthetic import write_synthetic_slide

    paths = [folder / f"s{i}.svs" for i in range(n)]
    for i, p in enumerate(paths):
        if not p.exists():
            write_synthetic_slide(p, size, seed=i)
    return paths


def manifest(folder: Path, paths) -> Path:
    m = folder / "manifest.csv"
    m.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return m


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc; /proc/PID/task/*/children is not always there)."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def unusable(index: Path) -> list[dict]:
    with open(index / "unusable.csv", newline="") as f:
        return list(csv.DictReader(f))


def build_command(m: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pathfm.data.index", str(m), "-o", str(out), "--tile-size", "64", "--mpps", "1", "2",
            *extra]


def row(fault, ranks, happened, seconds, kept):
    print(f"| {fault} | {ranks} | {happened} | {seconds} | {kept} |", flush=True)


# ---------------------------------------------------------------- index build


def build_stall(tmp: Path, limit: float = 10.0):
    paths = slides(tmp, 3)
    os.mkfifo(tmp / "stalled.svs")  # stands in for a stalled mount: opening it waits for a writer forever
    m = manifest(tmp, [*paths, tmp / "stalled.svs"])
    start = time.monotonic()
    p = subprocess.run(build_command(m, tmp / "index", "--workers", "2", "--timeout", str(limit)), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    bad = unusable(tmp / "index")
    assert p.returncode == 0 and len(bad) == 1 and "timed out" in bad[0]["reason"], (p.stderr[-2000:], bad)
    row("stalled slide in the index build (a FIFO in the manifest)", "1 (2 workers)",
        f"listed unusable: \"{bad[0]['reason'].split(': ', 1)[1].split(' (limit')[0]}\"; the build went on",
        f"{wall:.1f} s for the whole build (limit --timeout {limit:g} s)", f"the other {len(paths)} slides indexed")


def build_kill(tmp: Path):
    paths = slides(tmp, 6, size=8192)  # ~70 ms each to describe (was ~1 s): the build lasts long enough to catch a worker
    m = manifest(tmp, paths)
    p = subprocess.Popen(build_command(m, tmp / "index", "--workers", "2"), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    own, victim = b"", None
    while b"pathfm.data.index" not in own:  # read right after Popen, it may still be this script's (before exec) or empty
        own = Path(f"/proc/{p.pid}/cmdline").read_bytes()
    while victim is None and p.poll() is None:
        for c in children(p.pid):
            try:
                if Path(f"/proc/{c}/cmdline").read_bytes() == own:  # a forked build worker
                    time.sleep(0.03)  # into its first slide (sent once every worker has started; ~70 ms each)
                    os.kill(c, signal.SIGKILL)
                    victim = c
                    break
            except (OSError, ProcessLookupError):  # gone already
                pass
        time.sleep(0.01)
    assert victim is not None, "the build ended before a worker could be killed"
    killed = time.monotonic()
    out, err = p.communicate(timeout=600)
    wall = time.monotonic() - killed
    bad = unusable(tmp / "index")
    assert p.returncode == 0 and len(bad) == 1 and "signal 9" in bad[0]["reason"], (err[-2000:], bad)
    row("index-build worker killed (kill -9) while describing a slide", "1 (2 workers)",
        f"listed unusable: \"{bad[0]['reason'].split(': ', 1)[1]}\"; a fresh worker took its place",
        f"{wall:.1f} s from the kill to the end of the build", f"the other {len(paths) - 1} slides indexed")


# ---------------------------------------------------------------- training


def train_command(tmp: Path, m: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "pathfm.train", "--config", str(ROOT / "configs" / "smoke.yaml"),
            f"train.output_dir={tmp}", "train.name=run", "train.rankme_every=0", "data.source=manifest",
            f"data.manifest={m}", f"data.cache_dir={tmp / 'cache'}", "data.tile_size=64", "data.mpps=[1.0,2.0]",
            "data.tiles_per_visit=2", "data.num_workers=2", "data.index_workers=1", "train.steps=8",
            "train.log_every=1", "train.ckpt_every=2", *extra]


def last_checkpoint(run: Path) -> str:
    """The name of a run folder's last complete checkpoint (step_XXXXXXX), after loading it to show it is whole."""
    from pathfm.checkpoint import latest_checkpoint
    from pathfm.weights import load_ema_backbone

    last = latest_checkpoint(run / "checkpoints")
    load_ema_backbone(last)  # it loads
    return last.name


def resume(tmp: Path, m: Path) -> str:
    """Run the same command again: it must resume from the last checkpoint and finish."""
    kept = last_checkpoint(tmp / "run")
    p = subprocess.run(train_command(tmp, m), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and f"resuming from {tmp / 'run' / 'checkpoints' / kept}" in p.stderr, p.stderr[-3000:]
    return f"{kept} kept; the same command again resumed from it and finished (exit 0, step 8)"


def error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("error: "))


def loader_stall(tmp: Path, limit: float = 10.0):
    paths = slides(tmp, 3)
    m = manifest(tmp, paths)
    p = subprocess.run(train_command(tmp, m, "train.stop_after=2"), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 75, p.stderr[-3000:]
    paths[1].rename(tmp / "saved.svs")
    os.mkfifo(paths[1])  # the storage under one slide stops answering
    for stale in (tmp / "run" / "read_failures").glob("*.reading"):  # the first launch's (the trainer drops them
        stale.unlink()  # too, but only once its loader starts)
    start = time.monotonic()
    log = open(tmp / "stderr.txt", "w+")
    p = subprocess.Popen(train_command(tmp, m, f"data.stall_timeout_s={limit:g}"), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=log, text=True)
    stalled = None  # when a loader worker started on the FIFO: what it writes before each read says so
    while p.poll() is None:
        if stalled is None and any(str(paths[1]) in r.read_text(errors="replace")
                                   for r in (tmp / "run" / "read_failures").glob("*.reading")):
            stalled = time.monotonic()
        time.sleep(0.05)
    end = time.monotonic()
    log.seek(0)
    err = log.read()
    assert p.returncode == 75 and stalled, err[-3000:]
    paths[1].unlink()
    (tmp / "saved.svs").rename(paths[1])  # it answers again
    kept = resume(tmp, m)
    row("stalled loader (one slide's storage stops answering: a FIFO)", "1 (2 loader workers)",
        f"exit 75, `{error_line(err)[:150]}...`", f"{end - stalled:.1f} s from the worker's first read of the "
        f"stalled slide (data.stall_timeout_s={limit:g}); {end - start:.1f} s for the launch", kept)


def loader_kill(tmp: Path):
    paths = slides(tmp, 3)
    m = manifest(tmp, paths)
    p = subprocess.Popen(train_command(tmp, m), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not (tmp / "run" / "checkpoints" / "last").exists():
        time.sleep(0.1)
    own = Path(f"/proc/{p.pid}/cmdline").read_bytes()
    workers = [c for c in children(p.pid) if Path(f"/proc/{c}/cmdline").read_bytes() == own]  # forked loader workers
    assert workers, "no loader worker found"
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = p.communicate(timeout=900)
    wall = time.monotonic() - killed
    assert p.returncode == 75, err[-3000:]
    kept = resume(tmp, m)
    row("loader worker killed (kill -9) during training", "1 (2 loader workers)",
        f"exit 75, `{error_line(err)[:160]}...`; the slide is skipped from then on", f"{wall:.1f} s from the kill", kept)


# ---------------------------------------------------------------- ranks (H20b)

RANK_RUN = ["data.source=random", "model.arch=vit_tiny_d6", "ssl.koleo_weight=0", "model.drop_path=0", "train.steps=6",
            "train.log_every=1", "train.ckpt_every=2", "train.keep_last=1", "train.rankme_every=0", "data.num_workers=0",
            "optim.warmup_steps=0"]


def launch(tmp: Path, name: str, nproc: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "smoke.yaml"), "--local",
           "--nproc", str(nproc), "--name", name, *RANK_RUN, f"optim.batch_size={8 // nproc}", f"train.output_dir={tmp}", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(parent: int, rank: int) -> int:
    """The process of `rank` among parent's descendants (its environment says RANK=rank)."""
    todo = [parent]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += kids
            for kid in kids:
                try:
                    if f"RANK={rank}".encode() in Path(f"/proc/{kid}/environ").read_bytes().split(b"\0"):
                        return kid
                except OSError:
                    pass
    raise RuntimeError(f"no process of rank {rank} under {parent}")


def rank_kill(tmp: Path):
    """SIGKILL of rank 2 of 4 in step 3 (its step-2 checkpoint complete); then the same run resumed on 2 ranks."""
    run = tmp / "r"
    p = launch(tmp, "r", 4)
    while not (run / "checkpoints" / "last").is_file():
        if p.poll() is not None:
            raise RuntimeError(p.communicate()[1][-2000:])
        time.sleep(0.05)
    os.kill(rank_pid(p.pid, 2), signal.SIGKILL)
    killed = time.monotonic()
    _, err = p.communicate()
    wall = time.monotonic() - killed
    status = (run / "status.json").read_text().strip()
    kept = last_checkpoint(run)
    r = launch(tmp, "r", 2, "train.allow_resume_changes=true")
    r.communicate()
    row("rank SIGKILL (mid-step)", "4", f"launcher exit {p.returncode}, status.json `{status}`", f"{wall:.1f} s from the kill",
        f"{kept} loads; resumed on 2 ranks: exit {r.returncode}, {(run / 'status.json').read_text().strip()}")


def rank_disk_full(tmp: Path):
    """A real 60 MB tmpfs under the checkpoints: step 2's checkpoint fits, step 4's does not (on whichever rank
    writes last); then the tmpfs enlarged and the same command run again."""
    run = tmp / "d"
    (run / "checkpoints").mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(run / "checkpoints")]).returncode:
        row("disk full on one rank's write", "2", "skipped: mount refused here (needs root)", "", "")
        return
    try:
        p = launch(tmp, "d", 2)
        start = time.monotonic()
        _, err = p.communicate()
        wall = time.monotonic() - start
        lines = sorted({line for line in err.splitlines() if line.startswith("error:")})
        assert (run / "status.json").is_file(), err[-3000:]  # the run ended before it wrote one: say why
        status = (run / "status.json").read_text().strip()
        kept = last_checkpoint(run)
        subprocess.run(["mount", "-o", "remount,size=400m", str(run / "checkpoints")], check=True)
        r = launch(tmp, "d", 2)
        r_err = r.communicate()[1]
        why = "" if r.returncode == 0 else f" ({next((x for x in r_err.splitlines() if 'rror' in x), r_err[-300:])[:300]})"
        row("disk full while checkpointing", "2", f"exit {p.returncode}; every rank: `{lines[0][:200] if lines else '?'}` "
            f"({len(lines)} distinct error line(s)); status.json `{status[:120]}...`", f"{wall:.1f} s for the whole run",
            f"{kept} loads; resumed after freeing space: exit {r.returncode}{why}")
    finally:
        subprocess.run(["umount", str(run / "checkpoints")])


FAULTS = {"build-stall": build_stall, "build-kill": build_kill, "loader-stall": loader_stall, "loader-kill": loader_kill,
          "rank-disk-full": rank_disk_full, "rank-kill": rank_kill}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fault", choices=[*FAULTS, "data", "ranks"])
    a = p.parse_args(argv)
    print("| fault | ranks | what happened | time to a clean end | nothing lost |\n|---|---|---|---|---|", flush=True)
    groups = {"data": [f for f in FAULTS if not f.startswith("rank")], "ranks": ["rank-disk-full", "rank-kill"]}
    for name in groups.get(a.fault, [a.fault]):
        with tempfile.TemporaryDirectory(prefix=f"pathfm-{name}-") as tmp:
            FAULTS[name](Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
