"""Failures on some ranks only: every rank ends, with the same one-line reason, and nothing is lost.

Ranks are processes forked from the test process (tests/ranks.py) or, where the launcher's view matters, the
launcher itself (launch/train.py --local --nproc N, torchrun). Faults are real: a write past RLIMIT_FSIZE
fails with EFBIG on one rank, a meta.json that cannot be serialised raises on rank 0 alone, a full tmpfs,
SIGKILL.
"""

import copy
import json
import resource
import time

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
    return dict(student=student, teacher=teacher, optimizer=optimizer, loss_state=nn.ModuleDict({"c": Centering(2)}))


def _partial_save_worker(rank: int, world: int, folder: str) -> dict:
    from pathfm.dist import init_distributed, teardown

    init_distributed(device="cpu")
    state, out = _state(), {}

    def save(step, meta, limit=None):
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        if limit:  # this rank's writes past `limit` bytes fail (EFBIG): its RNG file (18 kB), not its 13 kB shard
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        start = time.monotonic()
        try:
            ckpt.save_checkpoint(folder, step, meta=meta, rank=rank, **state)
            return "saved", "", [], time.monotonic() - start
        except ckpt.CheckpointError as e:
            return type(e).__name__, e.strerror, e.ranks, time.monotonic() - start
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
    # before: the ranks whose part failed raised while the others waited for them at the next barrier (30 min)
    results = run_ranks(_partial_save_worker, world, str(tmp_path / "ckpt"), timeout=90)
    odd = list(range(1, world, 2))
    for r in results:
        assert r["step1"][0] == r["step4"][0] == "saved"
        kind, message, ranks, seconds = r["step2"]
        assert kind == "CheckpointError" and ranks == odd and seconds < 20
        assert message == results[0]["step2"][1]  # the same line on every rank
        assert "step_0000002 was not written; the previous checkpoint step_0000001 is intact" in message
        assert all(f"rank {r}: RuntimeError" in message for r in odd) and "\n" not in message  # torch.save's EFBIG
        kind, message, ranks, _ = r["step3"]
        assert kind == "CheckpointError" and ranks == [0] and "rank 0: TypeError: Object of type object" in message
        assert message == results[0]["step3"][1]
        assert (r["latest_after_failures"], r["latest"]) == ("step_0000001", "step_0000004")
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # half-written folders removed
