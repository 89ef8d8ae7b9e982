"""Run a function on N gloo ranks in processes forked from the test process.

    results = run_ranks(fn, 2, arg)     # fn(rank, world, arg) in 2 processes; their return values, by rank

A fork shares the test process's imports, so a rank starts in milliseconds instead of the 4-5 s of CPU
that a fresh interpreter spends importing torch: a 4-rank check costs its compute alone. Each rank sets
torchrun's variables (RANK, WORLD_SIZE, MASTER_*), so pathfm.dist.init_distributed and pathfm.train.main
run unchanged. A rank that raises fails the test with its traceback; ranks still alive after `timeout`
seconds (a hang: ranks that disagree on a collective) are killed and the test fails saying so.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, queue, args):
    drop = ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE")  # launcher variables of an outer job
    for k in [k for k in os.environ if k.startswith("SLURM_") or k in drop]:
        del os.environ[k]
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    if world > 1:  # world 1: a plain single process, no process group (as `python -m pathfm.train`)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # one thread per rank: no OpenMP pool inherited across the fork is entered
    try:
        # plain pickle: tensors travel by value (torch's queue reduction shares them through the sender, which exits)
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # noqa: BLE001 -- SystemExit too: the test reads what each rank ended with
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 120.0, expect_errors: bool = False) -> list:
    """fn(rank, world, *args) on `world` forked ranks -> [return value of rank 0, 1, ...].

    expect_errors: return ("error", traceback) for a rank that raised instead of failing the test."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, queue, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} of {world} still running "
                                     f"after {timeout:.0f} s (a hang: ranks disagreeing on a collective?)")
            try:
                rank, kind, value = queue.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty; a rank that died without reporting is caught here
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead and queue.empty():
                    raise AssertionError(f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            if kind == "error" and not expect_errors:
                raise AssertionError(f"rank {rank} raised:\n{value}")
            results[rank] = ("error", value) if kind == "error" else pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]


def _train_rank(rank: int, world: int, overrides: list) -> dict:
    from pathfm.config import load_config
    from pathfm.train import main

    return main(load_config(str(ROOT / "configs" / "smoke.yaml"), overrides))


def train_ranks(run_dir, world: int, overrides, timeout: float = 240.0) -> dict[int, dict]:
    """pathfm.train.main on `world` forked ranks (configs/smoke.yaml + overrides) into run_dir; {step: logged metrics}."""
    import json

    run_ranks(_train_rank, world, [*overrides, f"train.output_dir={run_dir.parent}", f"train.name={run_dir.name}"],
              timeout=timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in rows if "loss/total" in m}
