"""launch/benchmark.py and pathfm/benchmark.py: summaries by hand, failures as results, end to end locally and on SLURM."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import benchmark as launcher
from pathfm import benchmark as bench
from pathfm.config import load_config, to_yaml
from pathfm.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--warmup", "2", "--measure", "3", "data.num_workers=0"]


def run_launcher(*args, timeout=240):
    cmd = [sys.executable, str(ROOT / "launch" / "benchmark.py"), "--config", "configs/smoke.yaml", *SMALL, *args]
    # cwd = the checkout: the synthetic-slide cache (data.cache_dir) is shared with the other tests
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_point(tmp_path, ranks, rows=()):
    (tmp_path / "ranks").mkdir(parents=True)
    for r in ranks:
        (tmp_path / "ranks" / f"rank_{r['rank']}.json").write_text(json.dumps(r))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def rank(r, world, **kw):
    return {"rank": r, "world_size": world, "host": f"n{r}", "device": "cpu", "device_name": "cpu",
            "status": "ok", "error": "", **kw}


def row(step, data, fwd, bwd, opt, batch=16):
    t = data + fwd + bwd + opt
    return {"step": step, "images_per_s": batch / t, "time/data_s": data, "time/forward_s": fwd,
            "time/backward_s": bwd, "time/optimizer_s": opt, "memory_gib": 1.0, "loss/total": 5.0}


# ---- pure parts ---------------------------------------------------------------------------------


def test_memory_estimate_by_hand():
    # ViT-g-sized student, 1.1e9 params: 20 B each = 22e9 B; FSDP over 16 ranks shards all of it
    assert bench.memory_estimate_gib(1_100_000_000, 16, fsdp=True) == pytest.approx(22e9 / 16 / 2**30)
    assert bench.memory_estimate_gib(1_100_000_000, 16, fsdp=False) == pytest.approx(22e9 / 2**30)  # replicated
    assert bench.memory_estimate_gib(1000, 1, fsdp=True) == pytest.approx(20_000 / 2**30)


def test_count_params_on_meta_matches_the_real_student():
    from pathfm.student import build_student

    cfg = load_config("configs/smoke.yaml")
    assert bench.count_params(cfg) == sum(p.numel() for p in build_student(cfg).parameters())


def test_summarize_training_point_by_hand(tmp_path):
    # warm-up 2: steps 1, 2 are left out; world size 2, global batch 16
    rows = [row(1, 9.0, 9.0, 9.0, 9.0), row(2, 5.0, 5.0, 5.0, 5.0),
            row(3, 0.1, 0.3, 0.5, 0.1), row(4, 0.2, 0.4, 0.6, 0.2), row(5, 0.1, 0.2, 0.4, 0.1)]
    ranks = [rank(0, 2, memory_gib=1.5, comm_isolated_s=0.25, flops_per_step=2e12, peak_flops=1e13),
             rank(1, 2, memory_gib=2.5)]
    s = bench.summarize(write_point(tmp_path, ranks, rows), warmup=2)
    assert s["status"] == "ok" and s["measured_steps"] == 3 and s["hosts"] == 2
    assert s["step_s"] == pytest.approx(1.0)  # step totals 1.0, 1.4, 0.8 -> median 1.0
    assert s["time_s"] == pytest.approx({"data": 0.1, "forward": 0.3, "backward": 0.5, "optimizer": 0.1, "comm_isolated": 0.25})
    assert s["images_per_s"] == pytest.approx(16.0) and s["images_per_s_per_device"] == pytest.approx(8.0)
    assert s["memory_gib"] == 2.5 and s["memory_gib_per_rank"] == [1.5, 2.5]
    assert s["tflops_per_device"] == pytest.approx(2.0) and s["mfu"] == pytest.approx(0.2)  # 2e12 / 1 s / 1e13


def test_summarize_without_a_peak_has_no_mfu_and_data_points_add_up(tmp_path):
    s = bench.summarize(write_point(tmp_path / "a", [rank(0, 1, flops_per_step=1e9, peak_flops=None)], [row(2, 0, 1, 0, 0)]), warmup=1)
    assert s["mfu"] is None and s["tflops_per_device"] == pytest.approx(1e-3)
    ranks = [rank(0, 3, samples_per_s=10.0), rank(1, 3, samples_per_s=20.0), rank(2, 3, samples_per_s=30.0)]
    ranks[2]["host"] = "n0"  # ranks 0 and 2 share a node: 2 nodes
    s = bench.summarize(write_point(tmp_path / "b", ranks), warmup=1)
    assert s["samples_per_s"] == 60.0 and s["samples_per_s_per_node"] == 30.0


def test_summarize_reports_failed_and_missing_ranks(tmp_path):
    oom = rank(1, 2, memory_gib=70.0, estimate_gib=3.0, device_memory_gib=80.0)
    oom.update(status="oom", error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    s = bench.summarize(write_point(tmp_path / "a", [rank(0, 2), oom]), warmup=2)
    assert s["status"] == "oom" and "Tried to allocate" in s["error"] and s["memory_gib"] == 70.0
    s = bench.summarize(write_point(tmp_path / "b", [rank(0, 2)]), warmup=2)
    assert s["status"] == "error" and "only 1 of 2 ranks" in s["error"]
    assert bench.summarize(tmp_path / "c", warmup=2)["status"] == "error"


def test_scaling_efficiency_table_and_plot(tmp_path):
    results = {"mode": "train", "warmup": 2, "measure": 3,
               "config": {"model": {"arch": "vit_tiny", "patch_size": 16}, "optim": {"batch_size": 8}},
               "points": {"nodes-1": {"nodes": 1, "world_size": 8, "status": "ok", "images_per_s": 800.0, "images_per_s_per_device": 100.0},
                          "nodes-2": {"nodes": 2, "world_size": 16, "status": "ok", "images_per_s": 1520.0, "images_per_s_per_device": 95.0},
                          "nodes-3": {"nodes": 3, "world_size": 24, "status": "not_run", "error": "3 nodes requested, partition 'gpu' has 2"}}}
    pts = {p["key"]: p["scaling_efficiency"] for p in launcher.add_efficiency(results)}
    assert pts == {"nodes-1": 1.0, "nodes-2": pytest.approx(0.95), "nodes-3": None}
    md = launcher.markdown_table(results)
    assert "| nodes-2 | 2 | 16 | ok | 1.52e+03 | 95 |" in md and "| 95% |" in md and "partition 'gpu' has 2" in md
    launcher.plot_scaling(results, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_node_list_names_the_flag():
    with pytest.raises(SystemExit, match="--nodes '1,x' must be a comma-separated list"):
        launcher.parse_counts("1,x", "--nodes")
    with pytest.raises(SystemExit, match="--nproc '0'"):
        launcher.parse_counts("0", "--nproc")
    assert launcher.parse_counts("4,1,2,2", "--nodes") == [1, 2, 4]


# ---- failures recorded as results (in this process, one rank) -----------------------------------


def point_dir(tmp_path, overrides):
    cfg = load_config("configs/smoke.yaml", ["data.num_workers=0", *overrides, *bench.benchmark_overrides(1, 1)])
    cfg.train.output_dir, cfg.train.name = str(tmp_path), "p"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.yaml").write_text(to_yaml(cfg))
    return tmp_path / "p"


def test_too_large_for_the_device_is_reported_with_the_estimate(tmp_path):
    rec = bench.run_point(point_dir(tmp_path, []), train=train_main, warmup=1, measure=1, memory_gib=0.01)
    assert rec["status"] == "too_large" and rec["estimate_gib"] > 0.01
    assert "parameters + optimizer need" in rec["error"] and "the device has 0.01 GiB" in rec["error"]
    assert json.loads((tmp_path / "p" / "ranks" / "rank_0.json").read_text()) == rec
    assert not (tmp_path / "p" / "metrics.jsonl").exists()  # nothing ran


def test_out_of_memory_in_the_job_is_the_points_result(tmp_path):
    # 200000 px random global crops: the first image asks the allocator for ~1 TB and fails at once
    rec = bench.run_point(point_dir(tmp_path, ["data.source=random", "optim.batch_size=1", "crops.global_size=200000"]),
                          train=train_main, warmup=1, measure=1)
    assert rec["status"] == "oom" and "allocate" in rec["error"], rec
    assert rec["memory_gib"] > 0 and rec["estimate_gib"] < rec["device_memory_gib"]


# ---- end to end --------------------------------------------------------------------------------


def check_finite_positive(p, keys):
    for k in keys:
        assert isinstance(p[k], (int, float)) and math.isfinite(p[k]) and p[k] > 0, (k, p[k])


def test_local_two_ranks_end_to_end_then_rerun_skips(tmp_path):
    out = tmp_path / "bench"
    proc = run_launcher("--local", "--nproc", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    p = results["points"]["local-2"]
    assert p["status"] == "ok" and p["world_size"] == 2 and p["measured_steps"] == 3 and p["ranks_reported"] == 2
    check_finite_positive(p, ["images_per_s", "images_per_s_per_device", "step_s", "memory_gib", "params", "estimate_gib"])
    check_finite_positive(p["time_s"], ["data", "forward", "backward", "optimizer", "comm_isolated"])
    assert len(p["memory_gib_per_rank"]) == 2 and p["mfu"] is None  # no peak FLOP/s on a CPU
    if p["flops_per_step"] is not None:  # pathfm.flops present
        check_finite_positive(p, ["flops_per_step", "tflops_per_device"])
    assert "| local-2 | 1 | 2 | ok |" in (out / "results.md").read_text()
    assert (out / "scaling.png").stat().st_size > 1000
    assert not (out / "points" / "local-2" / "checkpoints").exists()  # train.main's final checkpoint is removed

    again = run_launcher("--local", "--nproc", "2", "--out", str(out))
    assert again.returncode == 0 and "local-2: done before, skipped" in again.stdout, again.stdout + again.stderr
    assert json.loads((out / "results.json").read_text()) == results
    other = run_launcher("--local", "--nproc", "2", "--out", str(out), "optim.batch_size=4")
    assert other.returncode != 0 and "holds results of a different benchmark (differs in optim.batch_size)" in other.stderr


@pytest.mark.slurm
@pytest.mark.skipif(shutil.which("sbatch") is None,
                    reason="sbatch not on PATH: no SLURM cluster here (start one with ../shared/slurm-ci/up.sh)")
def test_slurm_one_and_two_nodes_and_a_point_the_cluster_cannot_hold(tmp_path):
    out = tmp_path / "bench"
    proc = run_launcher("--nodes", "1,2,3", "--tasks-per-node", "1", "--profile", "cpu-ci", "--out", str(out),
                        "--point-timeout", "150", timeout=400)
    results = json.loads((out / "results.json").read_text())
    pts = results["points"]
    assert proc.returncode == 1, proc.stdout + proc.stderr  # not every point ran
    for key, world in (("nodes-1", 1), ("nodes-2", 2)):
        assert pts[key]["status"] == "ok", pts[key]
        assert pts[key]["world_size"] == world and pts[key]["hosts"] == world
        check_finite_positive(pts[key], ["images_per_s", "images_per_s_per_device", "step_s", "memory_gib"])
    check_finite_positive(pts["nodes-2"]["time_s"], ["comm_isolated"])
    assert pts["nodes-3"]["status"] == "not_run" and "3 nodes requested" in pts["nodes-3"]["error"]
    assert "| nodes-3 | 3 | 3 | not_run |" in (out / "results.md").read_text()
