"""launch/train.py and launch/slurm.py without a cluster: profiles, time syntax, the sbatch script,
the requeue decision, bad input, and that --help / --dry-run never import torch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import slurm  # noqa: E402
from launch import train as launch_train  # noqa: E402


def run_without_torch(*argv):
    """Run the launcher's main in a fresh interpreter; fail if torch got imported."""
    code = ("import sys; sys.argv = ['train.py', *sys.argv[1:]]; sys.path.insert(0, 'launch'); import train\n"
            "try:\n    train.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'; print('NO_TORCH')")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_help_and_dry_run_do_not_import_torch(tmp_path):
    r = run_without_torch("--help")
    assert r.returncode == 0 and "--gpus-per-node" in r.stdout and "NO_TORCH" in r.stdout, r.stderr
    r = run_without_torch("--config", "configs/smoke.yaml", "--profile", "gpu-8x", "--nodes", "4", "--dry-run",
                          f"train.output_dir={tmp_path}")
    assert r.returncode == 0 and "NO_TORCH" in r.stdout, r.stderr
    assert '"nodes": 4' in r.stdout and '"gpus_per_node": 8' in r.stdout and "#SBATCH --nodes=4" in r.stdout
    assert "world size: 32" in r.stdout and "export NCCL_DEBUG=WARN" in r.stdout
    assert not (tmp_path / "smoke").exists()  # a dry run creates nothing


@pytest.mark.parametrize("t,minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-00:00:00", 1440),
                                       ("2-12", 3600), ("0-00:10", 10), ("00:10:00", 10)])
def test_slurm_time_syntax(t, minutes):
    assert slurm.slurm_minutes(t) == minutes


@pytest.mark.parametrize("t", ["1h", "", "1:2:3:4", "0"])
def test_bad_time_names_the_value(t):
    with pytest.raises(slurm.LaunchError, match=f"time '{t}'"):
        slurm.slurm_minutes(t)


def test_profile_then_flags():
    prof = slurm.load_profile("gpu-8x")  # a bare name finds slurm/profiles/gpu-8x.yaml
    res = slurm.resources(prof, nodes=2, partition="h100", time=None)
    assert (res.nodes, res.partition, res.time, res.gpus_per_node, res.world_size) == (2, "h100", "2-00:00:00", 8, 16)
    assert res.env["NCCL_DEBUG"] == "WARN"
    cpu = slurm.resources(slurm.load_profile(ROOT / "slurm" / "profiles" / "cpu-ci.yaml"), nodes=2)
    assert cpu.ntasks_per_node == 1 and cpu.world_size == 2 and cpu.minutes == 10
    assert slurm.resources({}, gpus_per_node=4).ntasks_per_node == 4  # one task per GPU by default


def test_profile_errors(tmp_path):
    with pytest.raises(slurm.LaunchError, match=r"profile 'nosuch' not found.*cpu-ci.*gpu-8x"):
        slurm.load_profile("nosuch")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 2\ngpu_per_node: 8\n")
    with pytest.raises(slurm.LaunchError, match=r"bad.yaml': unknown key 'gpu_per_node'"):
        slurm.load_profile(bad)
    bad.write_text("nodes: two\n")
    with pytest.raises(slurm.LaunchError, match=r"key 'nodes' expects int, got 'two'"):
        slurm.load_profile(bad)


def test_executor_parameters_and_script():
    res = slurm.resources(slurm.load_profile("gpu-8x"), nodes=3, account="lab", mem=None)
    p = slurm.executor_parameters(res, "pathfm-x")
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"], p["account"]) == (3, 8, 8, 2880, "lab")
    assert p["additional_parameters"] == {"requeue": True, "exclusive": True} and "qos" not in p
    script = slurm.sbatch_script(res, "pathfm-x", ["--config", "/r/x/config.yaml"], Path("/r/x/slurm"))
    for line in ["#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive",
                 "#SBATCH --account=lab", "#SBATCH --signal=B:USR2@180", "set -- --config /r/x/config.yaml",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=3", "-m pathfm.train"]:
        assert line in script, line
    assert "#SBATCH --qos" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_global_batch_must_divide(tmp_path):
    argv = ["--config", "configs/smoke.yaml", "--nodes", "3", "--gpus-per-node", "8", "--dry-run",
            f"train.output_dir={tmp_path}"]
    with pytest.raises(SystemExit, match=r"--global-batch 1000 does not divide over 3 node\(s\) x 8 task\(s\) = 24 ranks"):
        launch_train.main([*argv, "--global-batch", "1000"])
    assert launch_train.main([*argv, "--global-batch", "960"]) == 0  # 40 per rank


def test_failed_submission_leaves_no_run_folder(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise slurm.LaunchError("sbatch refused the job: sbatch: error: invalid partition specified: x")

    monkeypatch.setattr(slurm, "submit", refuse)
    argv = ["--config", "configs/smoke.yaml", f"train.output_dir={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit, match="invalid partition specified: x"):
        launch_train.main(argv)
    assert not (tmp_path / "runs").exists()
    # an existing run folder (a resume) keeps its files exactly
    run = tmp_path / "runs" / "smoke"
    (run / "checkpoints").mkdir(parents=True)
    launch_train.main(argv + ["--dry-run"])
    with pytest.raises(SystemExit):
        launch_train.main(argv)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_requeue_decision(monkeypatch):
    calls = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **k: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    env = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"}
    assert slurm.requeue_if_allowed(3, env) and calls == [["scontrol", "requeue", "42"]]
    assert slurm.requeue_if_allowed(3, {**env, "SLURM_PROCID": "1"}) and len(calls) == 1  # only rank 0 asks
    assert not slurm.requeue_if_allowed(1, env) and len(calls) == 1  # limit reached: the job ends


def test_sbatch_body_forwards_usr2_and_requeues(tmp_path):
    """The template's shell logic with stand-ins for srun/scancel/scontrol: USR2 to the batch
    script reaches the task, which exits 75 (STOPPED_EXIT: checkpoint saved), and the script requeues the job
    and ends with 0."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # the task says it is there (task.pid) only once its trap is set: the test signals it only then
    (bin_ / "srun").write_text(f"#!/bin/bash\ntrap 'echo stopped > {tmp_path}/task; exit 75' USR2\necho $$ > {tmp_path}/task.pid\n"
                               "while :; do sleep 0.1; done\n")
    (bin_ / "scancel").write_text(f"#!/bin/bash\nkill -USR2 $(cat {tmp_path}/task.pid)\n")
    (bin_ / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/scontrol\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = slurm.sbatch_script(slurm.resources({}), "t", ["--config", "x.yaml"], tmp_path)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    p = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # only ends a hang: the signal waits for the task, however slow its start
    while not (tmp_path / "task.pid").exists() or not (tmp_path / "task.pid").read_text().strip():
        assert p.poll() is None and time.monotonic() < deadline, "the stand-in srun never started"
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR2)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0, out
    assert (tmp_path / "task").read_text().strip() == "stopped"
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "7"] and "requeuing job 7" in out


@pytest.mark.parametrize("arch,ffn,registers", [("vit_large", "mlp", 4), ("vit_giant2", "swiglu", 4), ("vit_small", "mlp", 0)])
def test_scaling_model_counts_the_real_model(arch, ffn, registers):
    """launch/scaling_model.py counts parameters on paper; pathfm.vit and pathfm.heads build them."""
    import torch

    from launch import scaling_model as sm
    from pathfm.heads import DINOHead
    from pathfm.vit import ARCHS, ViTArgs, build_vit

    assert sm.ARCHS[arch] == ARCHS[arch]
    with torch.device("meta"):
        vit = build_vit(ViTArgs(arch=arch, patch_size=14, img_size=224, num_registers=registers, ffn=ffn))
        head = DINOHead(vit.embed_dim, 1000, 256, 64, 3)
    assert sm.backbone_params(arch, 14, 224, registers) == sum(p.numel() for p in vit.parameters())
    assert sm.head_params(vit.embed_dim, 256, 64, 3, 1000) == sum(p.numel() for p in head.parameters())


def test_scaling_model_hand_numbers():
    """ViT-L/14, 1 node vs 2: every GPU moves (W-1)/W of the 3 gathers (bf16) + 1 reduce (fp32)."""
    from types import SimpleNamespace

    from launch import scaling_model as sm

    st = sm.Step("x", params=10**9, flops=4e14, gathered_bytes=6e9, reduced_bytes=4e9, collectives=100)
    a = SimpleNamespace(tflops=1000, mfu=0.5, nvlink_gbs=100, net_gbs=10, latency_us=1.0)
    t8 = sm.step_time(st, 8, 8, a)
    assert t8["compute"] == pytest.approx(0.8) and t8["comm"] == pytest.approx(10e9 * 7 / 8 / 100e9 + 100 * 7e-6)
    t16 = sm.step_time(st, 16, 8, a)
    assert t16["comm"] == pytest.approx(10e9 * 15 / 16 / 10e9 + 100 * 15e-6)
    assert t16["overlap"] == pytest.approx(t16["comm"]) and t16["serial"] == pytest.approx(0.8 + t16["comm"])
