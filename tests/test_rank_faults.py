"""Failures on some ranks only: every rank ends, with the same one-line reason, and nothing is lost.

Ranks are processes forked from the test process (tests/ranks.py) or, where the launcher's view matters, the
launcher itself (launch/train.py --local --nproc N, torchrun). Faults are real: a write past RLIMIT_FSIZE
fails with EFBIG on one rank, a meta.json that cannot be serialised raises on rank 0 alone, a full tmpfs,
SIGKILL.
"""

import contextlib
import copy
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ranks import run_ranks
from torch import nn

from pathfm import checkpoint as ckpt
from pathfm.losses import Centering


def _state():
    torch.manual_seed(0)
    student = nn.ModuleDict({"backbone": nn.Linear(2, 2, bias=False)})  # few tensors: shards smaller than an RNG file
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.backbone(torch.randn(2, 2)).square().mean().backward()
    optimizer.step()
    return dict(student=student, ema=teacher, optimizer=optimizer, loss_state=nn.ModuleDict({"c": Centering(2)}))


def _partial_save_worker(rank: int, world: int, folder: str) -> dict:
    from pathfm.dist import init_distributed, teardown

    init_distributed(device="cpu")
    state, out = _state(), {}

    def save(step, meta, limit=None):
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit:  # this rank's writes past `limit` bytes fail (EFBIG): its RNG file (18 kB), not its 13 kB shard
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        try:
            ckpt.save_checkpoint(folder, step, meta=meta, rank=rank, **state)
            return "saved", "", []
        except ckpt.CheckpointError as e:
            return type(e).__name__, e.strerror, e.ranks
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)

    out["step1"] = save(1, {})
    out["step2"] = save(2, {}, limit=16384 if rank % 2 == 1 else None)  # the odd ranks fail to write their RNG file
    out["step3"] = save(3, {"bad": object()} if rank == 0 else {})  # rank 0 alone raises (meta.json: TypeError)
    out["latest_after_failures"] = ckpt.latest_checkpoint(folder).name
    out["step4"] = save(4, {})  # the ranks are still in step with each other: the next save works
    out["latest"] = ckpt.latest_checkpoint(folder).name
    teardown()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_a_checkpoint_that_fails_on_some_ranks_fails_on_all_with_one_reason(tmp_path, world):
    # before: the ranks whose part failed raised while the others waited for them at the next barrier (30 min):
    # run_ranks' deadline then ends the test saying so (a hang, not a time measured)
    results = run_ranks(_partial_save_worker, world, str(tmp_path / "ckpt"), timeout=300)
    odd = list(range(1, world, 2))
    for r in results:
        assert r["step1"][0] == r["step4"][0] == "saved"
        kind, message, ranks = r["step2"]
        assert kind == "CheckpointError" and ranks == odd
        assert message == results[0]["step2"][1]  # the same line on every rank
        assert "step_0000002 was not written; the previous checkpoint step_0000001 is intact" in message
        assert all(f"rank {r}: RuntimeError" in message for r in odd) and "\n" not in message  # torch.save's EFBIG
        kind, message, ranks = r["step3"]
        assert kind == "CheckpointError" and ranks == [0] and "rank 0: TypeError: Object of type object" in message
        assert message == results[0]["step3"][1]
        assert (r["latest_after_failures"], r["latest"]) == ("step_0000001", "step_0000004")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # half-written folders removed


# --- a rank killed mid-step: 4 ranks through the launcher (torchrun), resumed on 2 ----------------------------

ROOT = Path(__file__).resolve().parents[1]
# Sinkhorn-Knopp, a separate iBOT head and global clipping: ranks must agree on the batch-wide teacher targets
# (SK normalises over every rank's rows), on both heads' gradients and on one norm over everything. KoLeo and KDE
# are per rank by design (DINOv2 computes KoLeo on each GPU's batch), so they are off where runs on different
# numbers of ranks are compared; so is stochastic depth (each rank draws its own). Half a ViT-Ti: the point is
# the ranks' agreement, and every block costs a gather per pass.
SK_RUN = ["data.source=random", "model.arch=vit_tiny_d6", "ssl.koleo_weight=0", "ssl.kde_weight=0", "model.drop_path=0",
          "ssl.centering=sinkhorn_knopp", "ssl.ibot_separate_head=true", "optim.clip_grad_mode=global",
          "train.steps=6", "train.log_every=1", "train.ckpt_every=2", "train.keep_last=3", "train.rankme_every=0",
          "data.num_workers=0", "optim.warmup_steps=0", "optim.base_lr=0.02"]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env and b"pathfm.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    return None


def test_a_rank_killed_mid_step_ends_the_run_and_a_resume_on_two_ranks_continues_it(tmp_path):
    from ranks import train_ranks

    run = tmp_path / "four"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "smoke.yaml"), "--local",
           "--nproc", "4", "--name", "four", *SK_RUN, "optim.batch_size=2", f"train.output_dir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last").is_file():  # step 2's checkpoint is complete: the run is in step 3
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 2)
    os.kill(victim, signal.SIGKILL)
    try:  # the other ranks end by themselves (gloo fails at once, torchrun stops the rest), far sooner than their
        # collectives' dist.timeout_s (600 s): this deadline only tells that hang from a slow machine
        out, err = launcher.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the other ranks were still running 400 s after rank 2 was killed: a hang until dist.timeout_s")
    assert launcher.returncode == 1, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["ranks"] == [2] and "rank 2 was killed by SIGKILL" in status["reason"]
    assert "error: rank 2 was killed by SIGKILL" in err

    # the same run on 1 process, and the killed run resumed on 2 ranks from its last complete checkpoint
    one = train_ranks(tmp_path / "one", 1, [*SK_RUN, "optim.batch_size=8"])
    four = {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss/total" in m}
    resumed_from = int(ckpt.latest_checkpoint(run / "checkpoints").name.split("_")[1])
    assert resumed_from >= 2 and sorted(four)[:2] == [1, 2]
    two = train_ranks(run, 2, [*SK_RUN, "optim.batch_size=4", "train.allow_resume_changes=true"])
    assert max(two) == 6  # metrics.jsonl holds both launches: a step logged twice keeps the resumed run's row
    for got, steps in ((four, range(1, resumed_from + 1)), (two, range(resumed_from + 1, 7))):
        for step in steps:
            for k in ("loss/total", "loss/dino", "loss/ibot", "grad_norm"):
                assert got[step][k] == pytest.approx(one[step][k], rel=1e-4), f"step {step} {k}"
    assert abs(one[6]["loss/total"] - one[1]["loss/total"]) > 0.1  # the weights did move
