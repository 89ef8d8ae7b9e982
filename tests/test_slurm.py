"""launch/train.py against a real SLURM cluster (../shared/slurm-ci/up.sh: nodes n1, n2 on this host).

Each test submits the smoke config with the cpu-ci profile into its own tmp_path run folder, so
job ids restarting on a fresh cluster cannot return a stale submitit result.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="sbatch not on PATH: no SLURM cluster here (start one with ../shared/slurm-ci/up.sh)"),
]
SMALL = ["data.num_workers=0", "train.rankme_every=0", "train.log_every=1"]


def launch(tmp_path, *args):
    """Run the launcher as a user would; returns (completed process, run folder)."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--profile", "cpu-ci", "--config", "configs/smoke.yaml",
           f"train.output_dir={tmp_path / 'runs'}", *SMALL, *args]
    # cwd = the checkout: the job shares the synthetic-slide cache (data.cache_dir) with the other tests
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60), tmp_path / "runs" / "smoke"


def job_of(proc, run_dir, ntasks):
    import submitit

    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split(":")[0]
    return submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id, tasks=tuple(range(ntasks)))


def wait(job, run_dir, timeout_s):
    deadline = time.time() + timeout_s
    while not job.done(force_check=True):
        if time.time() > deadline:
            subprocess.run(["scancel", job.job_id])
            logs = "\n".join(p.read_text()[-2000:] for p in sorted((run_dir / "slurm").glob("*_log.err")))
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s; logs:\n{logs}")
        time.sleep(2)
    return job.results()


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]


def test_two_node_job_is_interrupted_requeues_resumes_and_finishes(tmp_path):
    """A job on 2 nodes (world size 2) gets USR2 (what SLURM sends before the time limit) mid-run: checkpoint,
    requeue, resume, finish with the run folder complete. One job for both: a job of its own for the plain
    2-node run would repeat the submission, start-up and training this one does."""
    steps = 10
    proc, run_dir = launch(tmp_path, "--nodes", "2", "--tasks-per-node", "1", f"train.steps={steps}",
                           "train.ckpt_every=100")
    assert (run_dir / "config.yaml").exists() and (run_dir / "submit.sbatch").exists()  # written before the job ran
    job = job_of(proc, run_dir, 2)
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and logged_steps(run_dir) and logged_steps(run_dir)[-1] >= 2):
        assert time.time() < deadline, "training did not reach step 2"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    results = wait(job, run_dir, 180)

    assert [r["status"] for r in results] == ["finished", "finished"] and results[0]["step"] == steps
    err = (run_dir / "slurm" / f"{job.job_id}_0_log.err").read_text()
    saved = int(err.split("checkpoint saved at step ")[1].split()[0])
    resumed = int(err.split("resuming from ")[1].split(" at step ")[1].split()[0])
    assert 2 <= saved < steps and resumed == saved  # checkpoint_every=100: only the interrupt saved one
    steps_logged = logged_steps(run_dir)
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps  # continues, never restarts
    assert steps_logged.count(1) == 1 and saved + 1 in steps_logged
    # the same job id ran again: SLURM counted a restart (written into env.json by the resumed run)
    env = json.loads((run_dir / "env.json").read_text())
    assert env["slurm_restart_count"] >= 1
    assert env["world_size"] == 2 and env["launcher"] == "slurm"
    assert (run_dir / "checkpoints" / "last").exists() and (run_dir / "export" / "model.json").exists()
    assert (run_dir / "tb").is_dir()
    # sacct's database is sometimes slow to answer on this one-machine cluster: ask until it lists the job's
    # records (bounded), then the requeue must be among them
    deadline, states = time.time() + 60, ""
    while not states.strip() and time.time() < deadline:
        states = subprocess.run(["sacct", "-D", "-X", "-n", "-o", "State", "-j", job.job_id], capture_output=True,
                                text=True).stdout
        if not states.strip():
            time.sleep(2)
    assert "REQUEUED" in states, f"sacct -D -j {job.job_id} after 60 s: {states!r}"


def test_rejected_partition_shows_slurm_error_and_leaves_nothing(tmp_path):
    proc, run_dir = launch(tmp_path, "--partition", "nosuchpartition", "train.steps=2")
    assert proc.returncode != 0
    assert "invalid partition" in proc.stderr.lower(), proc.stderr  # sbatch's own words
    assert not run_dir.exists() and not (tmp_path / "runs" / "smoke").exists()


def test_index_build_runs_as_an_array_job_and_a_merge(tmp_path):
    """launch/index.py on the real cluster: 2 array tasks, each a share of the manifest, then the merge job;
    the result is the index a local build makes."""
    import pickle

    from pathfm.data.index import IndexParams, build_index
    from pathfm.data.slides import read_manifest
    from pathfm.data.synthetic import write_synthetic_slide

    for i in range(3):
        write_synthetic_slide(tmp_path / f"s{i}.svs", 1024, seed=i)
    (tmp_path / "m.csv").write_text("path\ns0.svs\ns1.svs\nnot-there.svs\ns2.svs\n")
    out = tmp_path / "index"
    cmd = [sys.executable, str(ROOT / "launch" / "index.py"), str(tmp_path / "m.csv"), "-o", str(out), "--tasks", "2",
           "--profile", "cpu-ci", "--tile-size", "64", "--wait"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "(2 tasks)" in p.stdout and "3 usable slides of 4 (1 unusable" in p.stdout
    array_id = p.stdout.split("array job ")[1].split()[0]
    described = [pickle.loads((out / "slurm" / f"{array_id}_{t}_0_result.pkl").read_bytes()) for t in (0, 1)]
    assert described == [("success", 2), ("success", 2)]  # rows 0, 2 and rows 1, 3
    local = build_index(read_manifest(tmp_path / "m.csv"), tmp_path / "local", IndexParams(64, (0.25, 0.5, 1.0, 2.0), 0.4),
                        workers=1, mask_dir=out / "masks", progress=False)
    for name in ("slides.npy", "plans.npy", "segments.npy", "runs.npy", "ends.npy", "paths.bin", "unusable.csv"):
        assert (out / name).read_bytes() == (local.folder / name).read_bytes(), name


def test_a_job_that_cannot_start_is_named_at_submission(tmp_path):
    """--nodes 4 on the 2-node partition: SLURM accepts it and keeps it pending (PartitionNodeLimit)."""
    proc, run_dir = launch(tmp_path, "--nodes", "4", "train.steps=2")
    job_id = proc.stdout.split("submitted job ")[1].split(":")[0]
    subprocess.run(["scancel", job_id])
    assert proc.returncode == 0, proc.stderr
    assert f"job {job_id} is pending with reason Partition" in proc.stderr  # NodeLimit or Config, by request
    assert "lower --nodes" in proc.stderr and "will not start by waiting" in proc.stderr
