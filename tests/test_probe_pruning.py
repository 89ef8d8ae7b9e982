"""keep_last beside a probe process killed at any moment (issue 25): whoever next touches the run folder (the
trainer's next save, a new probe process, `launch/eval.py --watch` on the ended run) leaves only what keep_last and
the probe holds allow. keep_last is the user's promise about disk: a ViT-g/14 checkpoint is tens of GB.

A run with train.keep_last=1 and probes on every checkpoint (steps 2, 4, 6). Each moment is made exactly, without
sleeps or a race: a SIGKILL leaves the run folder as it was at that moment, so the test writes that state with the
files the trainer and the watcher read (probe.hold, eval/snapshots/, eval/probes.current, status.json), then runs
the next actor for real. The trainer's save that lands while the watcher copies a checkpoint is made to land there
through the function the copy calls. Tiny checkpoints (a 6-block ViT-Ti at 32 px), no training.

What each moment left behind before the fix (eval/watch.py pruned with the list of folders it read before its copy,
and skipped the hold of a checkpoint whose snapshot existed):
  killed copying step 2 or 4 (hold kept, snapshot half-written)        nothing left
  killed after the copy of step 2 or 4, before releasing its hold      that checkpoint, held for good
  killed after releasing the hold, before pruning, after the last save that checkpoint, for good
  killed while probing step 2 or 4                                     nothing left
  the trainer's last save landing while the watcher copies step 4      step 4, for good (issue 25's failure)
  the trainer's last save, then the watcher's start (or --watch)       nothing left
"""

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TILES = ROOT.parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"
TASK = f"crc={TILES},{TILES}"

from eval import watch  # noqa: E402
from pathfm import checkpoint as ckpt  # noqa: E402
from pathfm.vit import ViTArgs, build_vit  # noqa: E402


@functools.cache
def trainer_state():
    """What the trainer checkpoints, as small as the watcher allows: it copies the EMA's ViT backbone."""
    torch.manual_seed(0)
    args = ViTArgs(arch="vit_tiny_d6", img_size=32)
    student = nn.Linear(2, 2)
    ema = nn.ModuleDict({"backbone": build_vit(args)})
    return dict(student=student, ema=ema, optimizer=torch.optim.AdamW(student.parameters()),
                loss_state=nn.ModuleDict()), {"vit_args": vars(args), "mean": [0.5] * 3, "std": [0.5] * 3}


def save(run, step) -> None:
    """The trainer's checkpoint of `step`: keep_last=1, held for a probe (every checkpoint is probed)."""
    models, meta = trainer_state()
    ckpt.save_checkpoint(run / "checkpoints", step, meta=meta, keep_last=1, hold=True, **models)


@pytest.fixture
def run(tmp_path):
    """A run folder: keep_last=1, 6 steps, a checkpoint every 2, probes on each."""
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "train": {"steps": 6, "ckpt_every": 2, "keep_last": 1},
        "probes": {"tasks": [TASK], "img_size": 32, "protocol": "knn"}}))
    return folder


def watcher(run, **kw) -> watch.Watcher:
    """A probe process's Watcher on `run`, as eval/watch.py's main makes it (--once unless told otherwise)."""
    p = argparse.ArgumentParser()
    watch.add_task_args(p)
    args = p.parse_args([])
    args.once, args.pid, args.job, args.poll = kw.get("once", True), None, None, 0.01
    return watch.Watcher(run, watch.settings(run, args), args)


def left(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def held(run) -> list[str]:
    return sorted(p.parent.name for p in (run / "checkpoints").glob(f"step_*/{ckpt.PROBE_HOLD}"))


def snapshots(run) -> list[str]:
    return sorted(p.name for p in (run / "eval" / "snapshots").glob("*"))


def save_up_to(run, last: int, first: int = 2) -> None:
    for step in range(first, last + 1, 2):
        save(run, step)



def hold(run, step) -> None:
    """The probe.hold the trainer wrote, back in place: the state before the probe process removed it."""
    (run / "checkpoints" / f"step_{step:07d}" / ckpt.PROBE_HOLD).write_text("")


@pytest.mark.parametrize("step", [2, 4])
@pytest.mark.parametrize("moment", ["copying", "copied"])
def test_a_probe_killed_holding_a_checkpoint_leaves_nothing_once_a_new_one_starts(run, step, moment):
    save(run, 2)
    if step == 4:  # the probe process copied step 2, then the trainer's save of 4 pruned it
        watcher(run).snapshot_new()
        save(run, 4)
    snaps = run / "eval" / "snapshots"
    if moment == "copying":  # killed inside torch.save of the snapshot: the hold is there, the copy half-written
        snaps.mkdir(parents=True, exist_ok=True)
        (snaps / f"step_{step:07d}.tmp").write_bytes(b"half a snapshot")
    else:  # killed after renaming its snapshot into place, before removing the hold
        watcher(run).snapshot_new()
        hold(run, step)
    save_up_to(run, 6, step + 2)  # the trainer goes on to its last save, then restarts the probe process
    assert held(run) == [f"step_{s:07d}" for s in range(step, 7, 2)]  # the holds kept them from keep_last=1
    watcher(run).snapshot_new()  # the new probe process's first look: it copies what it still needs, and prunes
    assert left(run) == ["step_0000006"] and held(run) == []
    assert snapshots(run) == [f"step_{s:07d}.pt" for s in (2, 4, 6)]  # each still to probe, no half copy


@pytest.mark.parametrize("next_one", ["the trainer's next save", "a new probe process"])
def test_a_probe_killed_between_releasing_a_hold_and_pruning_leaves_nothing(run, next_one):
    save(run, 2)
    watcher(run).snapshot_new()
    save(run, 4)
    watcher(run).snapshot_new()  # step 4 copied and released; the newest, so kept
    hold(run, 4)  # ... made as if the trainer's save of 6 came before the release: it then keeps 4 for the probe
    save(run, 6)
    assert left(run) == ["step_0000004", "step_0000006"]
    (run / "checkpoints" / "step_0000004" / ckpt.PROBE_HOLD).unlink()  # released; killed before it could prune
    if next_one == "the trainer's next save":  # a longer run: the save of 8 prunes 4 (6 is still held)
        save(run, 8)
        assert left(run) == ["step_0000006", "step_0000008"] and held(run) == ["step_0000006", "step_0000008"]
    else:  # 6 was the last save: only a probe process (restarted by the trainer, or --watch) comes after
        watcher(run).snapshot_new()
        assert left(run) == ["step_0000006"] and held(run) == []


def test_the_trainers_last_save_landing_during_a_copy_leaves_nothing(run):
    """The probe copies step 4 while the trainer writes step 6 (its last) and prunes: 4 still held then, so the
    trainer keeps it; the probe releases it once copied and must prune it then, knowing that 6 exists."""
    save_up_to(run, 4)
    w = watcher(run)
    asked = w.wanted

    def wanted(step):  # asked once per checkpoint, after the folder was listed and before the copy
        if step == 4:
            save(run, 6)
            assert left(run) == ["step_0000004", "step_0000006"] and "step_0000004" in held(run)  # kept for the probe
        return asked(step)

    w.wanted = wanted
    w.snapshot_new()
    w.wanted = asked
    w.snapshot_new()  # its next look copies step 6
    assert left(run) == ["step_0000006"] and held(run) == []


@pytest.mark.skipif(not TILES.is_dir(), reason=f"labelled tiles not found at {TILES}")
def test_killed_while_probing_then_the_run_ends_and_watch_probes_the_rest_and_prunes(run, capsys):
    """Killed while probing step 2 (its marker names a pid that is gone); the trainer saves 4 and 6 and ends with
    no probe process after it; `launch/eval.py --watch` on the ended run records the death, probes 4 and 6, prunes
    4 and stops by itself."""
    from launch.eval import main as watch_command

    save(run, 2)
    watcher(run).snapshot_new()  # copied and released; the probe of step 2 began
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "eval" / "probes.current").write_text(json.dumps({"pid": gone.pid, "step": 2, "task": "crc",
                                                            "protocols": ["knn"]}))
    save_up_to(run, 6, 4)
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 6}))  # the run has ended
    assert left(run) == ["step_0000004", "step_0000006"] and held(run) == ["step_0000004", "step_0000006"]
    threads = torch.get_num_threads()
    assert watch_command(["--watch", str(run), "--img-size", "32", "--poll", "0.01"]) == 0
    torch.set_num_threads(threads)
    rows = {r["step"]: r for r in map(json.loads, (run / "eval" / "probes.jsonl").read_text().splitlines())}
    assert sorted(rows) == [2, 4, 6] and rows[2]["status"] == "failed" and "ended" in rows[2]["reason"]
    assert rows[4]["status"] == rows[6]["status"] == "ok", rows
    assert left(run) == ["step_0000006"] and held(run) == [] and snapshots(run) == []
    assert "run ended" in capsys.readouterr().err
