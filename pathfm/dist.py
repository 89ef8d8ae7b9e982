"""Distributed set-up in two functions and no module state.

    env = init_distributed()                 # torchrun, else SLURM, else one process
    student = wrap_model(student, env, fsdp=True, ac="none", compile=False, precision="bf16")

Order inside `wrap_model` (as torchtitan): activation checkpointing, then torch.compile, then FSDP2
`fully_shard` per transformer block and at the root(s). The model code itself holds no distributed code.
Parameters stay fp32 shards (DTensors) between steps, so the optimizer and the teacher EMA
(`p_t.lerp_(p_s, 1 - m)` over matching shards) work on each rank's slice without communication.
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
    source: str  # torchrun | slurm | single | fake (pathfm.memory: a fake process group, fake tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'n[3-5,7],m1' -> 'n3', 'gpu[003-005]' -> 'gpu003', 'node7' -> 'node7'."""
    m = re.fullmatch(r"([^,\[\]]+)(\[([0-9,\-]+)\])?(,.*)?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'; expected e.g. 'node7', 'gpu[003-005,010]' or 'a1,b2'")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # keeps zero padding: gpu[003-005] -> gpu003


def slurm_port(job_id: int) -> int:
    """A rendezvous port per job in [20000, 40000), so two jobs sharing a node do not collide."""
    return 20000 + job_id % 20000


def launch_vars(environ) -> tuple[str, dict]:
    """(source, torch.distributed variables) from an environment; reads nothing else.

    torchrun (TORCHELASTIC_RUN_ID, also when torchrun itself runs inside srun) comes first, then SLURM's
    task variables (inside srun), else a single process. Inside srun the SLURM variables win over
    RANK / WORLD_SIZE / MASTER_* that sbatch exported from the submitting shell.
    """
    torch_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun", {k: environ[k] for k in torch_keys if k in environ}
    if all(k in environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")):
        if int(environ["SLURM_NTASKS"]) == 1:
            return "single", {}
        return "slurm", {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": first_slurm_host(environ["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": str(slurm_port(int(environ.get("SLURM_JOB_ID", "0")))),
        }
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun-style variables set by another launcher
        return "torchrun", {k: environ[k] for k in torch_keys if k in environ}
    return "single", {}


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise from torchrun's variables first, then SLURM's, else a single process.

    NCCL on CUDA, gloo on CPU. timeout_s (dist.timeout_s) bounds every collective: when a rank dies or hangs,
    the others end within it (gloo raises; NCCL's watchdog aborts the process, torch's default error handling).
    A rank that dies on gloo usually ends the others at once, as its connections close. Under SLURM the SLURM variables are written into os.environ (over any
    stale RANK / MASTER_ADDR), because init_process_group's env:// rendezvous reads them there.
    """
    environ = os.environ
    source, variables = launch_vars(environ)
    if source == "slurm":
        environ.update(variables)

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if source == "single":
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, 0, dev, source)

    rank, world, local = int(variables["RANK"]), int(variables["WORLD_SIZE"]), int(variables.get("LOCAL_RANK", 0))
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
            timeout=datetime.timedelta(seconds=timeout_s),
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


def long_barrier(env: DistEnv, days: int = 7) -> None:
    """A barrier for work whose length grows with the cohort (building a slide index): the default
    group gives up after 30 min, so this one waits on its own gloo group with a timeout in days.
    A rank that dies still ends it at once (its connections close)."""
    if env.world_size > 1:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=days))
        dist.barrier(group=group)
        dist.destroy_process_group(group)


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
    t = torch.tensor([float(v.detach()) if torch.is_tensor(v) else float(v) for v in values.values()], device=env.device)
    if env.world_size > 1:
        dist.all_reduce(t)
        t /= env.world_size
    return dict(zip(values, t.tolist()))


def all_reduce_sum(x: float, env: DistEnv) -> float:
    return _all_reduce_number(x, env, dist.ReduceOp.SUM)


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers.

    fully_shard keeps, on each rank, its slice of that rank's own tensors; ranks that initialised with
    different seeds would otherwise train a patchwork of several random inits.
    """
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t, src=0)


def mixed_precision(precision: str):
    """FSDP2's policy for train.precision. bf16: blocks compute with bf16 copies of the fp32 shards; gradients
    are reduce-scattered in fp32 so the sum over ranks keeps full precision. The optimizer and the teacher EMA
    see fp32 shards either way."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap_model(model: nn.Module, env: DistEnv, *, fsdp: bool = True, ac: str = "none", compile: bool = False,
               precision: str = "fp32", reshard_after_forward: bool = True) -> nn.Module:
    """Activation checkpointing, then compile, then FSDP2, each per transformer block.

    model: a ViT, or a container of modules (train.py's ModuleDict of backbone + heads) with the ViT
    under `backbone`.
    ac: none | full (recompute each block in backward) | selective (every second block: about half
    the activation memory for about a third of full recompute's cost).
    precision: fp32 | bf16 (bf16 parameters for compute, fp32 gradient reductions; CUDA only).
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision={precision!r} is not one of fp32, bf16")
    if precision == "bf16" and env.device.type != "cuda" and env.source != "fake":  # fake: pathfm.memory's estimate
        raise ValueError(f"train.precision=bf16 needs CUDA but the device is {env.device}; use train.precision=fp32 on CPU")
    if ac not in ("none", "full", "selective"):
        raise ValueError(f"dist.activation_checkpointing={ac!r} is not one of none, full, selective")
    if not fsdp and env.world_size > 1:
        raise ValueError(f"dist.fsdp=false on {env.world_size} ranks would train {env.world_size} unsynchronised models "
                         "(there is no DDP path); set dist.fsdp=true, or run one process")
    vit = model.backbone if hasattr(model, "backbone") else model
    if ac != "none":
        vit.set_grad_checkpointing(1 if ac == "full" else 2)  # torch.utils.checkpoint per block
    if compile:
        for blk in vit.blocks:
            blk.compile()
    if env.world_size > 1:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        broadcast_from_rank0(model)
        mp = mixed_precision(precision)
        for blk in vit.blocks:  # one all-gather per block: peak memory is one unsharded block, not the model
            fully_shard(blk, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # The roots: FSDP2 refuses a container without forward (nn.ModuleDict), so each child that is
        # called on its own (backbone, dino_head, ibot_head) becomes a root that owns its remaining
        # parameters (patch embedding, tokens, final norm; the head's layers).
        roots = list(model.children()) if isinstance(model, (nn.ModuleDict, nn.ModuleList)) else [model]
        for root in roots:
            fully_shard(root, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        # train.py and eval call these methods, not forward(): FSDP must gather the root's parameters for them too
        for name in ("forward_features", "forward_features_list", "get_intermediate_layers"):
            if hasattr(vit, name):  # a timm ViT (a public teacher) has no forward_features_list
                register_fsdp_forward_method(vit, name)
    return model
