"""Distributed set-up in two functions and no module state.

    env = init_distributed()                 # torchrun, else SLURM, else one process
    student = wrap_model(student, env, fsdp=True, ac="none", compile=False, precision="bf16")

Order inside `wrap_model` (as torchtitan): activation checkpointing, then torch.compile, then FSDP2
`fully_shard` per transformer block and at the root. The model code itself holds no distributed code.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    source: str  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'n[3-5,7],m1' -> 'n3', 'gpu-a12' -> 'gpu-a12'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_vars(environ) -> dict | None:
    """torch.distributed variables from SLURM's, or None when not inside an srun task."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ or "SLURM_JOB_NODELIST" not in environ:
        return None
    job_id = int(environ.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_slurm_host(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(20000 + job_id % 20000),  # per job, so two jobs on one node do not collide
    }


def init_distributed(device: str = "auto", timeout_min: int = 30) -> DistEnv:
    """Initialise from torchrun's variables first, then SLURM's, else a single process.

    NCCL on CUDA, gloo on CPU. Under SLURM the SLURM variables win over RANK/WORLD_SIZE/MASTER_*
    left in the environment by whoever ran sbatch (they are exported into the job).
    """
    environ = os.environ
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ and "SLURM_PROCID" not in environ):
        source = "torchrun"
    elif (slurm := _slurm_vars(environ)) is not None and int(slurm["WORLD_SIZE"]) > 1:
        environ.update(slurm)
        source = "slurm"
    else:
        source = "single"

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if source == "single":
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, 0, dev, source)

    rank, world, local = int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank, world, local, dev, source)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def _all_reduce_number(x: float, env: DistEnv, op) -> float:
    if env.world_size == 1:
        return x
    t = torch.tensor([float(x)], device=env.device)
    dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_max(x: float, env: DistEnv) -> float:
    """The largest value of a Python number over all ranks (flags that every rank must agree on)."""
    return _all_reduce_number(x, env, dist.ReduceOp.MAX)


def mean_over_ranks(values: dict, env: DistEnv) -> dict:
    """{name: tensor or number} -> {name: float}, averaged over ranks (one all-reduce)."""
    t = torch.tensor([float(v) for v in values.values()], device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t)
        t /= env.world_size
    return dict(zip(values, t.tolist()))


def all_reduce_sum(x: float, env: DistEnv) -> float:
    return _all_reduce_number(x, env, dist.ReduceOp.SUM)


def wrap_model(model: nn.Module, env: DistEnv, *, fsdp: bool = True, ac: str = "none", compile: bool = False,
               precision: str = "fp32", reshard_after_forward: bool = True) -> nn.Module:
    """Activation checkpointing, then compile, then FSDP2, each per transformer block.

    ac: none | full (recompute each block in backward) | selective (every second block: about half
    the activation memory for about a third of full recompute's cost).
    precision: fp32 | bf16 (bf16 parameters for compute, fp32 gradient reductions; CUDA only).
    """
    vit = model.backbone if hasattr(model, "backbone") else model
    if ac != "none":
        vit.set_grad_checkpointing(1 if ac == "full" else 2)  # torch.utils.checkpoint per block
    if compile:
        for blk in vit.blocks:
            blk.compile()
    if fsdp and env.world_size > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if precision == "bf16" and env.device.type != "cuda":
            raise ValueError("train.precision=bf16 needs CUDA; use fp32 on CPU")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
        for blk in vit.blocks:
            fully_shard(blk, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
