"""The main job: README command, run folder, exact resume, non-finite losses, atomic checkpoints, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathfm import checkpoint as ckpt
from pathfm.config import load_config
from pathfm.weights import load_ema_backbone

ROOT = Path(__file__).resolve().parents[1]


def smoke(tmp_path, *overrides):
    # a shared synthetic-slide cache keeps every test from regenerating slides
    cache = ROOT / ".cache" / "pathfm-tests"
    return load_config("smoke", [f"train.output_dir={tmp_path}", f"data.cache_dir={cache}", "train.name=run",
                                 "train.log_every=1", "data.num_workers=0", *overrides])


# a quarter of smoke's model and a sixteenth of its pixels: for tests whose point is the loop's bookkeeping
# (resume, skipped steps, refusals), not what smoke's model computes
TINY = ["model.arch=vit_tiny_d6", "optim.batch_size=2", "crops.global_size=32", "crops.local_size=16"]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def run(cfg):
    from pathfm.train import main

    return main(cfg)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's first command, run once for this module: the tests that only read a finished smoke run share
    it. Returns (the finished launcher process, its run folder)."""
    out = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/smoke.yaml", "--local"]
    # the README runs it from the checkout; here the run folder goes to tmp_path, the slide cache is shared
    cmd += [f"train.output_dir={out}", f"data.cache_dir={ROOT / '.cache' / 'pathfm-tests'}"]
    # the deadline only ends a hang: at load average 18 on 2 cores this run took 298 s of wall clock (74 s of CPU)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, out / "smoke"


def test_readme_first_command_leaves_a_complete_run_folder(readme_run):
    p, run_dir = readme_run
    assert "img/s" in p.stderr and "eta" in p.stderr  # the progress line
    assert "warning" not in p.stderr.lower(), p.stderr  # a warning must mean something to act on
    assert load_config(run_dir / "config.yaml").train.steps == 12
    env_json = json.loads((run_dir / "env.json").read_text())
    assert env_json["torch"] == torch.__version__ and env_json["world_size"] == 1 and "git_revision" in env_json
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss/total" in r][-1]
    for key in ("loss/dino", "loss/ibot", "loss/koleo", "lr", "weight_decay", "teacher_momentum", "teacher_temp",
                "grad_norm", "images_per_s", "time/data_s", "time/forward_s", "time/backward_s", "time/optimizer_s", "memory_gib", "data/usable_slides",
                "data/read_failures", "data/mpp_share/0.5"):
        assert key in last, key
    assert last["step"] == 12
    assert any("rankme/teacher_cls" in r for r in rows)
    tb = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert tb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb[0])).Reload()
    assert "crops/first_batch" in acc.Tags()["images"]
    assert "loss/total" in acc.Tags()["scalars"]
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last", "step_0000006", "step_0000012"]

    # the export loads strictly in timm and computes what the checkpoint's teacher computes
    import timm

    side = json.loads((run_dir / "export" / "model.json").read_text())
    model = timm.create_model(side["timm_name"], num_classes=0, **side["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(run_dir / "export" / "model.pth"), strict=True)
    teacher, meta = load_ema_backbone(run_dir)
    assert meta["step"] == 12
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - teacher(x)).abs().max() < 1e-5


def test_resume_refuses_a_new_trajectory_and_logs_each_step_once(tmp_path):
    first = run(smoke(tmp_path, *TINY, "train.steps=4", "train.ckpt_every=2", "train.stop_after=3"))
    assert first["status"] == "interrupted"  # checkpoints at 2 and 3; logged 1..3
    folder = Path(first["run_dir"])
    # pretend the stopped launch logged two steps past its last checkpoint (killed after logging, before saving)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss/total": 123.0}) + "\n" + '{"step": 5, "lo')
    with pytest.raises(SystemExit, match=r"train.steps: 4 -> 8\).*train.allow_resume_changes=true"):
        run(smoke(tmp_path, *TINY, "train.steps=8"))
    assert not list(folder.glob("config.restart_*.yaml"))  # refused before anything was written
    done = run(smoke(tmp_path, *TINY, "train.steps=8", "train.allow_resume_changes=true"))
    assert done["status"] == "finished" and done["step"] == 8
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert steps == sorted(set(steps)) == list(range(1, 9)) and 123.0 not in [r.get("loss/total") for r in rows]
    (restart,) = [r for r in rows if "restart" in r]
    assert restart["step"] == 3 and restart["resume_changes"] == {"train.steps": [4, 8]}
    assert "allow_resume_changes: train.steps: 4 -> 8" in (folder / "config.restart_1.yaml").read_text()


def losses_spoiled_on(calls, spoil):
    """train.compute_losses whose result `spoil(losses, student)` changes on its calls numbered in `calls` (1 = the
    first step): the loop sees exactly what a real non-finite step gives it."""
    import pathfm.train as train

    real, n = train.compute_losses, {"calls": 0}

    def compute_losses(plan, student, *args, **kwargs):
        n["calls"] += 1
        losses = real(plan, student, *args, **kwargs)
        return spoil(losses, student) if n["calls"] in calls else losses

    return compute_losses


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import pathfm.train as train

    nan_dino = lambda losses, student: losses | {"dino": losses["dino"] * float("nan")}  # noqa: E731
    monkeypatch.setattr(train, "compute_losses", losses_spoiled_on(range(5, 100), nan_dino))
    cfg = smoke(tmp_path, *TINY, "train.steps=12", "train.ckpt_every=3", "train.max_nonfinite=3", "train.rankme_every=0")
    ckpts = Path(cfg.train.output_dir) / "run" / "checkpoints"
    with pytest.raises(FloatingPointError, match=r"step 6: 3 consecutive non-finite steps \(last: loss dino\)"):
        run(cfg)
    # steps 1-4 trained and checkpointed at 3; 5, 6, 7 (index 4-6) skipped; nothing saved after the failure
    assert (ckpts / "last").read_text().strip() == "step_0000003"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003"]
    teacher, meta = load_ema_backbone(ckpts / "last")
    assert meta["step"] == 3
    rows = [json.loads(line) for line in (ckpts.parent / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("nonfinite_steps", 0) for r in rows) == 3


def test_a_single_nonfinite_step_changes_nothing(tmp_path, monkeypatch):
    import pathfm.train as train

    nan_koleo = lambda losses, student: losses | {"koleo": losses["koleo"] * float("nan")}  # noqa: E731
    monkeypatch.setattr(train, "compute_losses", losses_spoiled_on({2}, nan_koleo))
    result = run(smoke(tmp_path, *TINY, "train.steps=3", "train.rankme_every=0"))
    assert result["status"] == "finished"
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 1
    assert all(r["step"] != 2 or "loss/total" not in r for r in rows)  # step 2 was skipped, not logged as trained


def test_a_finite_loss_with_a_nonfinite_gradient_is_skipped(tmp_path, monkeypatch):
    import pathfm.train as train

    def nan_gradient(losses, student):  # sqrt'(0) = inf: the loss stays finite (+ 0), its gradient is 0 * inf = NaN
        w = student.dino_head.mlp[0].weight
        return losses | {"dino": losses["dino"] + 0.0 * (w - w.detach()).abs().sqrt().sum()}

    monkeypatch.setattr(train, "compute_losses", losses_spoiled_on({2}, nan_gradient))
    result = run(smoke(tmp_path, *TINY, "train.steps=3", "train.rankme_every=0"))
    assert result["status"] == "finished"
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] == 1
    assert all(r["step"] != 2 or "loss/total" not in r for r in rows)  # step 2 skipped, not applied
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    teacher, _ = load_ema_backbone(result["run_dir"])
    assert all(torch.isfinite(p).all() for p in teacher.state_dict().values())


# the child process: the trainer as `python -m pathfm.train` runs it, except that the save of step 2 pauses
# after DCP has written its shards (before meta.json and the rename), so the kill lands inside that write
_SLOW_SECOND_SAVE = """
import sys, time
import pathfm.checkpoint as c
real = c.dcp.save
def save(state, checkpoint_id):
    real(state, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith("step_0000002.tmp"):
        time.sleep(600)
c.dcp.save = save
from pathfm.train import cli
cli(sys.argv[1:])
"""


def test_kill_9_while_a_checkpoint_is_written_resumes_exactly(tmp_path):
    """A real SIGKILL mid-checkpoint, then a relaunch: the previous checkpoint is the last complete one, the resumed
    run computes the uninterrupted run's losses, and the run folder records both launches."""
    import signal
    import time

    args = ["data.source=random", "model.arch=vit_tiny_d6", "optim.batch_size=2", "crops.global_size=32",
            "crops.local_size=16", "train.steps=4", "train.ckpt_every=1",
            "train.rankme_every=0"]
    overrides = [f"train.output_dir={tmp_path / 'killed'}", f"data.cache_dir={ROOT / '.cache' / 'pathfm-tests'}",
                 "train.name=run", "train.log_every=1", "data.num_workers=0", *args]  # as smoke() sets them
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", _SLOW_SECOND_SAVE, "--config", "smoke", *overrides], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "killed" / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (folder / "step_0000002.tmp" / ".metadata").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    # the write was cut: shards there, no meta.json, never renamed; the last complete checkpoint is step 1, and loads
    assert (folder / "step_0000002.tmp").is_dir() and not (folder / "step_0000002").exists()
    assert ckpt.latest_checkpoint(folder).name == "step_0000001"
    assert load_ema_backbone(folder)[1]["step"] == 1
    # the relaunch resumes from step 1 and rewrites step 2 cleanly; an override that changes no number, to see the
    # second launch's config recorded beside the first's
    resumed = run(smoke(tmp_path / "killed", *args, "train.max_nonfinite=7"))
    assert resumed["status"] == "finished" and resumed["step"] == 4
    run_dir = Path(resumed["run_dir"])
    assert load_config(run_dir / "config.yaml").train.max_nonfinite == 5  # the first launch, as it ran
    assert load_config(run_dir / "config.restart_1.yaml").train.max_nonfinite == 7  # the second
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["restart"]) for r in rows if "restart" in r] == [(1, "config.restart_1.yaml")]
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_0000003", "step_0000004"]  # keep_last 2, no .tmp
    full = run(smoke(tmp_path / "full", *args))
    a, b = losses(full["run_dir"]), losses(resumed["run_dir"])
    assert sorted(b) == [1, 2, 3, 4]  # the step count continued; step 2, logged by the killed process, once
    for step in a:
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


def test_missing_manifest_fails_before_any_folder_is_made(tmp_path):
    cfg = smoke(tmp_path, "data.source=manifest", f"data.manifest={tmp_path / 'nope.csv'}")
    with pytest.raises(SystemExit, match=r"'data.manifest'.*nope.csv.*does not exist"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"cannot create run folder"):
        run(smoke(tmp_path, f"train.output_dir={blocker}"))


def test_resume_folder_of_another_architecture_is_refused_and_kept(tmp_path):
    run(smoke(tmp_path, *TINY, "train.steps=2", "train.rankme_every=0"))
    folder = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"another model \(patch_size: 16 -> 8\)"):
        run(smoke(tmp_path, *TINY, "train.steps=4", "model.patch_size=8"))
    after = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != "env.json"} == {p: t for p, t in before.items() if p.name != "env.json"}


def test_high_resolution_post_training_starts_from_a_checkpoint(readme_run, tmp_path):
    base = readme_run[1]  # the README's smoke run, 64 px crops
    # larger crops from larger tiles, weights from the base run; lr 0 and momentum 1 keep the teacher as loaded
    post = run(smoke(tmp_path / "post", "train.steps=1", "train.rankme_every=0", "crops.global_size=96",
                     "crops.local_size=48", "data.tile_size=128", "optim.base_lr=0.0", "optim.min_lr=0.0",
                     "optim.batch_size=2", "ssl.momentum_teacher=1.0", f"train.init_checkpoint={base}/checkpoints/last"))
    a, _ = load_ema_backbone(base)
    b, _ = load_ema_backbone(post["run_dir"])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_and_stops(tmp_path, sig):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/smoke.yaml", "--local",
           f"train.output_dir={tmp_path}", f"data.cache_dir={ROOT / '.cache' / 'pathfm-tests'}", "train.steps=10000",
           "train.log_every=1", "train.rankme_every=0", "data.num_workers=0", *TINY]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "smoke" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 75, err[-2000:]  # STOPPED_EXIT: stopped with a checkpoint, not finished
    assert f"stopping on {sig}" in err
    last = ckpt.latest_checkpoint(tmp_path / "smoke" / "checkpoints")
    step = json.loads((last / "meta.json").read_text())["step"]
    assert 2 <= step < 10000
    assert not (tmp_path / "smoke" / "export").exists()  # interrupted, not finished: no export yet


def test_device_side_augmentation_trains_on_the_same_views(tmp_path):
    # workers only read tiles; the crops, colour ops and masks run in the training process, drawn from
    # the same per-step generator, so the losses are those of the CPU-worker mode
    args = (*TINY, "train.steps=2", "train.rankme_every=0", "train.ckpt_every=100")
    cpu = run(smoke(tmp_path / "cpu", *args))
    dev = run(smoke(tmp_path / "dev", *args, "data.device_augment=true"))
    a, b = losses(cpu["run_dir"]), losses(dev["run_dir"])
    assert a.keys() == b.keys() == {1, 2}
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a)


def test_readme_two_process_command_runs_a_gloo_group(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS")  # as a user starts it: the launcher shares the cores out (torchrun would warn)
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/smoke.yaml", "--local", "--nproc", "2",
           f"train.output_dir={tmp_path}", f"data.cache_dir={ROOT / '.cache' / 'pathfm-tests'}", "train.steps=2",
           "train.rankme_every=0", "data.num_workers=0", *TINY]
    # stopped after one step: the launcher says so with the documented status, not torchrun's 1
    stopped = subprocess.run([*cmd, "train.stop_after=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "smoke" / "status.json").read_text()) == {"status": "interrupted", "step": 1}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # resumes on 2 ranks
    assert p.returncode == 0, p.stderr[-3000:]
    for out in (stopped, p):  # neither torchrun's report of the stop nor any warning on the console
        assert "warning" not in out.stderr.lower() and "ChildFailedError" not in out.stderr, out.stderr
    assert json.loads((tmp_path / "smoke" / "status.json").read_text()) == {"status": "finished", "step": 2}
    run_dir = tmp_path / "smoke"
    meta = json.loads((run_dir / "env.json").read_text())
    assert meta["world_size"] == 2 and meta["launcher"] == "torchrun"
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_0000002"
    assert (run_dir / "export" / "model.pth").is_file()
