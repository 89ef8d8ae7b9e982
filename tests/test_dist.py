"""Launch detection (torchrun, SLURM, single process) and wrap_model's argument checks.

The parsing tests need no process group; one test starts two real gloo ranks from SLURM variables alone.
"""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathfm.dist import DistEnv, first_slurm_host, init_distributed, launch_vars, slurm_port, wrap_model
from pathfm.vit import ViTArgs, build_vit

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_KEYS = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict:
    """This process's environment without any launcher variables (the tests may run inside a SLURM job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_KEYS}


@pytest.mark.parametrize("nodelist, host", [
    ("n[1-2]", "n1"),
    ("gpu[003-005,010],cpu1", "gpu003"),  # zero padding kept, later groups ignored
    ("node7", "node7"),
    ("gpu-a12,gpu-b3", "gpu-a12"),
    ("n[7,3-5]", "n7"),  # SLURM lists the first task's node first
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "[1-2]", "n[1-2"])
def test_first_slurm_host_rejects_garbage_naming_it(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_slurm_host(bad)


def test_slurm_port_is_per_job_and_in_range():
    assert slurm_port(123456) == 23456  # 20000 + 123456 % 20000
    assert slurm_port(0) == 20000
    assert slurm_port(39999) == 39999 and slurm_port(40000) == 20000
    assert slurm_port(7) != slurm_port(8)


SRUN_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]",
             "SLURM_JOB_ID": "987654"}


def test_slurm_variables_inside_srun():
    source, v = launch_vars(SRUN_TASK)
    assert source == "slurm"
    assert v == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003", "MASTER_PORT": "27654"}


def test_stale_torch_variables_lose_to_slurm_inside_srun():
    # sbatch exports the submitting shell's environment into the job: a RANK / WORLD_SIZE / MASTER_ADDR
    # left over from an earlier torchrun session must not decide the rendezvous
    stale = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "laptop", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}
    source, v = launch_vars({**stale, **SRUN_TASK})
    assert source == "slurm" and v["RANK"] == "5" and v["WORLD_SIZE"] == "8" and v["MASTER_ADDR"] == "gpu003"
    # a one-task SLURM job is a single process, whatever the stale variables say (no hang waiting for 2 ranks)
    source, v = launch_vars({**stale, **SRUN_TASK, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (source, v) == ("single", {})


def test_torchrun_comes_first_also_inside_srun():
    # `srun torchrun ...`: one SLURM task per node, torchrun's workers carry their own ranks
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                "MASTER_ADDR": "gpu003", "MASTER_PORT": "29400"}
    source, v = launch_vars({**SRUN_TASK, **torchrun})
    assert source == "torchrun" and v["RANK"] == "3" and v["WORLD_SIZE"] == "16" and v["MASTER_PORT"] == "29400"
    assert launch_vars({"RANK": "1", "WORLD_SIZE": "2"})[0] == "torchrun"  # other launchers setting torch's variables


def test_single_process_without_launcher_variables(monkeypatch):
    assert launch_vars({"PATH": "/bin"}) == ("single", {})
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in LAUNCH_KEYS:
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node7")
    monkeypatch.setenv("WORLD_SIZE", "4")  # stale
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.source, env.device.type) == (0, 1, "single", "cpu")
    assert not torch.distributed.is_initialized()


def _free_slurm_port() -> int:
    """A job id whose derived port is free on this machine (tests may run in parallel)."""
    for _ in range(100):
        job_id = random.randrange(1, 10**6)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in [20000, 40000)")


def test_two_gloo_ranks_rendezvous_from_slurm_variables_alone():
    # what srun gives each task, plus stale torch variables that must be overwritten
    job_id = _free_slurm_port()
    code = ("from pathfm.dist import init_distributed, mean_over_ranks, teardown; e = init_distributed(device='cpu'); "
            "m = mean_over_ranks({'r': e.rank}, e)['r']; print(e.rank, e.world_size, e.source, m); teardown()")
    procs = []
    for rank in range(2):
        env = {**clean_env(), "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job_id), "RANK": "7", "WORLD_SIZE": "9", "MASTER_ADDR": "nowhere"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    # the last line: torch 2.9's gloo prints its own "[Gloo] Rank 0 is connected to 1 peer ranks" line first
    assert [o.strip().splitlines()[-1].split() for o, _ in outs] == [["0", "2", "slurm", "0.5"], ["1", "2", "slurm", "0.5"]]


def test_wrap_model_refuses_bf16_on_cpu():
    vit = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32))
    cpu = DistEnv(0, 1, 0, torch.device("cpu"), "single")
    with pytest.raises(ValueError, match="train.precision=bf16 needs CUDA.*use train.precision=fp32"):
        wrap_model(vit, cpu, precision="bf16")
    with pytest.raises(ValueError, match="dist.activation_checkpointing='half'"):
        wrap_model(vit, cpu, ac="half")
    assert wrap_model(vit, cpu) is vit  # one process: nothing to shard
    two = DistEnv(0, 2, 0, torch.device("cpu"), "torchrun")
    with pytest.raises(ValueError, match="dist.fsdp=false on 2 ranks"):
        wrap_model(vit, two, fsdp=False)  # checked before any collective, so no process group is needed
