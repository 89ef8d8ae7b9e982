"""Probes beside training (pathfm/probes.py, eval/watch.py, launch/eval.py): a real local run on the labelled tiles
of ../shared/data with its probe process killed mid-probe, keep_last=1, then --watch on the finished run; bad
specs refused before anything is written; the SLURM path on the real local cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TILES = ROOT.parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"
SMALL = ["data.num_workers=0", "train.rankme_every=0", "train.log_every=1", "optim.batch_size=4", "probes.img_size=64"]


def task(name="crc", protocols=""):
    return f"{name}{'@' + protocols if protocols else ''}={TILES},{TILES}"  # 9 classes, one tile each: train = test


def launch(args, cwd=ROOT, timeout=540):
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/smoke.yaml", *SMALL, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def rows(run):
    return [json.loads(line) for line in (run / "eval" / "probes.jsonl").read_text().splitlines()]


def scalars(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def wait_unlocked(run, timeout_s=600):
    """Until no probe process holds the run's watch lock (it has finished its queue)."""
    import fcntl

    deadline = time.time() + timeout_s
    with open(run / "eval" / "watch.lock", "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.time() < deadline, (run / "eval" / "watch.log").read_text()[-3000:]
                time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Training with probes on every checkpoint and keep_last=1; the probe process is killed with SIGKILL in the
    middle of its first probe. Returns (training process, run folder, the step being probed when killed)."""
    if not TILES.is_dir():
        pytest.skip(f"labelled tiles not found at {TILES}")
    out = tmp_path_factory.mktemp("probes")
    run = out / "runs" / "p"
    current, killed, stop = run / "eval" / "probes.current", {}, threading.Event()

    def kill_first_probe():  # also after training ended: the probe process then still works through its queue
        while not stop.is_set() and not killed:
            try:
                cur = json.loads(current.read_text())
                os.kill(cur["pid"], signal.SIGKILL)
                killed.update(cur)
            except (OSError, ValueError, KeyError):
                time.sleep(0.02)

    killer = threading.Thread(target=kill_first_probe, daemon=True)
    killer.start()
    proc = launch(["--local", "--name", "p", f"train.output_dir={out / 'runs'}", "train.steps=6", "train.ckpt_every=2",
                   "train.keep_last=1", f"probes.tasks={task()}"])
    killer.join(timeout=300)
    wait_unlocked(run)  # a probe process the trainer restarted finishes its queue after the trainer has gone
    stop.set()  # never past here: the test's own --watch writes probes.current with this process's pid
    killer.join()
    assert killed, "no probe was seen in progress: nothing was killed"
    return proc, run, killed.get("step")


def test_probes_beside_a_run_survive_kill_9_keep_last_1_and_watch_stops(killed_run, capsys):
    proc, run, killed_step = killed_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "status.json").read_text()) == {"status": "finished", "step": 6}
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss/total" in line]
    assert logged == [1, 2, 3, 4, 5, 6]  # the kill did not touch training
    assert killed_step in (2, 4, 6)
    # --watch on the finished run, with a second task: records a death nobody saw yet, probes what is left and the
    # checkpoint that exists for the new task, and stops by itself
    from launch.eval import main as watch

    threads = torch_threads()
    assert watch(["--watch", str(run), "--task", task(), "--task", task("crc2"), "--img-size", "64", "--poll", "0.2"]) == 0
    torch_threads(threads)
    by_step = {r["step"]: r for r in rows(run) if r["task"] == "crc"}
    assert sorted(by_step) == [2, 4, 6] and len(by_step) == 3  # every checkpoint once, keep_last=1 notwithstanding
    dead = by_step[killed_step]
    assert dead["status"] == "failed" and ("SIGKILL" in dead["reason"] or "ended" in dead["reason"]), dead
    ok = {s: r for s, r in by_step.items() if s != killed_step}
    assert all(r["status"] == "ok" and r["metric"] == "test/k20/balanced_accuracy" for r in ok.values()), ok
    for s, r in ok.items():  # results.json in the eval/ layout, the same number in the table and in TensorBoard
        results = json.loads((run / "eval" / f"step_{s:07d}" / "crc" / "knn" / "results.json").read_text())
        assert results["headline"]["mean"] == r["value"] and results["model"]["step"] == s
    tb = scalars(run, "probe/crc/knn/balanced_accuracy")
    assert sorted(tb) == sorted(ok) and all(abs(tb[s] - ok[s]["value"]) < 1e-6 for s in ok)
    best = json.loads((run / "eval" / "best.json").read_text())["crc"]["knn"]
    assert best["value"] == max(r["value"] for r in ok.values()) and best["step"] in ok
    # the new task gets what exists now: the last checkpoint, and any snapshot a probe process had not yet used up
    # (how many remain depends on timing), each once
    crc2 = [(r["step"], r["status"]) for r in rows(run) if r["task"] == "crc2"]
    assert (6, "ok") in crc2 and len({s for s, _ in crc2}) == len(crc2) and {s for s, _ in crc2} <= {2, 4, 6}, crc2
    assert all(status == "ok" for _, status in crc2), crc2
    assert "run ended" in capsys.readouterr().err
    from eval.report import main as report

    report([str(run / "eval"), "--out", str(run.parent / "report")])
    assert (run.parent / "report" / "curves_p.png").stat().st_size > 0  # the curves across checkpoints
    # pruning waited for the probes' copies only: keep_last=1 full checkpoint, no holds, no snapshots left
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000006"]
    assert not list(run.glob("checkpoints/*/probe.hold")) and not list(run.glob("eval/snapshots/*.pt"))


def torch_threads(n=None):
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def test_keep_last_keeps_held_checkpoints_until_released_at_most_max_held(tmp_path):
    """A checkpoint a probe has not copied yet survives keep_last pruning; a released one goes; a dead probe
    process cannot make held folders pile up beyond MAX_HELD."""
    import torch

    from pathfm.checkpoint import MAX_HELD, PROBE_HOLD, save_checkpoint

    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(student.parameters())
    kw = dict(student=student, ema=teacher, optimizer=opt, loss_state=torch.nn.ModuleDict(), meta={}, keep_last=1)
    names = lambda: sorted(p.name for p in tmp_path.glob("step_*"))  # noqa: E731
    save_checkpoint(tmp_path, 1, hold=True, **kw)
    save_checkpoint(tmp_path, 2, hold=False, **kw)
    assert names() == ["step_0000001", "step_0000002"]  # 1 is held: not pruned by keep_last=1
    (tmp_path / "step_0000001" / PROBE_HOLD).unlink()  # the probe copied it
    save_checkpoint(tmp_path, 3, hold=True, **kw)
    assert names() == ["step_0000003"]
    for step in range(4, 8):  # nobody releases anything: at most MAX_HELD beyond keep_last
        save_checkpoint(tmp_path, step, hold=True, **kw)
    assert names() == [f"step_{s:07d}" for s in range(7 - MAX_HELD, 8)]


@pytest.mark.parametrize("spec, says", [
    (f"crc=crx:{TILES}:train,{TILES}", "unknown dataset kind 'crx'"),
    (f"crc={TILES},/no/such/folder", "'/no/such/folder' does not exist"),
    (f"crc@svm={TILES},{TILES}", "unknown protocol 'svm'"),
    (f"crc={TILES}", "give a train and a test set"),
])
def test_bad_probe_spec_is_refused_before_anything_is_written(tmp_path, spec, says):
    from launch.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/smoke.yaml", "--local", f"train.output_dir={tmp_path / 'runs'}",
              f"probes.tasks={spec}"])
    msg = str(e.value)
    assert says in msg and "probes.tasks" in msg and "\n" not in msg, msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch not on PATH: no SLURM cluster here "
                    "(start one with ../shared/slurm-ci/up.sh)")
def test_slurm_probe_job_beside_training_survives_a_requeue(tmp_path):
    """The training job and its probe job side by side in squeue; USR2 requeues training mid-run; every
    checkpoint is probed exactly once and the probe job ends after the training job."""
    import submitit

    if not TILES.is_dir():
        pytest.skip(f"labelled tiles not found at {TILES}")
    out = tmp_path / "runs"
    proc = launch(["--profile", "cpu-ci", "--nodes", "1", f"train.output_dir={out}", "train.steps=8",
                   "train.ckpt_every=2", "train.keep_last=1", f"probes.tasks={task()}"], timeout=90)
    assert proc.returncode == 0, proc.stderr
    train_id = proc.stdout.split("submitted job ")[1].split(":")[0]
    probe_id = proc.stdout.split("submitted probe job ")[1].split(":")[0]
    run = out / "smoke"
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    assert f"{train_id} pathfm-smoke" in queued and f"{probe_id} pathfm-probes-smoke" in queued, queued
    deadline = time.time() + 150
    while not (run / "checkpoints" / "step_0000002").exists() and not (run / "checkpoints" / "step_0000004").exists():
        assert time.time() < deadline, "training did not reach its first checkpoint"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", train_id], check=True)  # what SLURM sends before a time limit
    train = submitit.SlurmJob(folder=run / "slurm", job_id=train_id)
    probes = submitit.SlurmJob(folder=run / "eval" / "slurm", job_id=probe_id)
    deadline = time.time() + 300
    while not (train.done(force_check=True) and probes.done(force_check=True)):
        if time.time() > deadline:
            subprocess.run(["scancel", train_id, probe_id])
            pytest.fail("jobs not done: " + "\n".join(p.read_text()[-1500:] for p in run.rglob("*_log.err")))
        time.sleep(2)
    assert train.result()["status"] == "finished" and probes.result() == 0
    assert json.loads((run / "env.json").read_text())["slurm_restart_count"] >= 1  # it was requeued
    seen = [(r["step"], r["task"], r["protocol"]) for r in rows(run)]
    regular = sorted({s for s, _, _ in seen if s % 2 == 0})
    assert regular == [2, 4, 6, 8] and len(seen) == len(set(seen)), seen  # every checkpoint, each exactly once
    assert all(r["status"] == "ok" for r in rows(run)), rows(run)
