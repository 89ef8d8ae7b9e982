"""pathfm.memory: the estimate on fake tensors against the same step on real ones, and the launcher's refusal.

The heavy evidence (ViT-S/16, ViT-B/16, a distillation pair, 1 and 2 gloo ranks; ViT-g/14 at 64 ranks) is
bench/memory_check.py and BENCHMARKS.md "Will it fit"; here the smallest config, one rank, one estimate each."""

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import train as launch_train  # noqa: E402
from pathfm import memory  # noqa: E402
from pathfm.config import load_config  # noqa: E402
from pathfm.dist import DistEnv  # noqa: E402
from pathfm.train import memory_step  # noqa: E402

TINY = ["train.precision=fp32", "dist.compile=false", "optim.batch_size=4", "data.source=random"]


def test_estimate_equals_the_real_steps_peak():
    cfg = load_config(ROOT / "configs/smoke.yaml", TINY)
    estimate = memory.estimate(partial(memory_step, cfg), world_size=1)
    torch.manual_seed(0)
    tracked, allocator = memory.measure(partial(memory_step, cfg), DistEnv(0, 1, 0, torch.device("cpu"), "single"))
    # the allocator's running total sees every byte the CPU allocator hands out, kernels' buffers included
    assert 0.9 < estimate.peak / allocator < 1.1, (estimate.peak, allocator)
    assert 0.9 < estimate.peak / tracked.peak < 1.1, (estimate.peak, tracked.peak)
    parts = estimate.by_category
    assert parts["parameters"] > 0 and parts["optimizer state"] > 0 and parts["activations"] > 0
    assert sum(parts.values()) == estimate.peak


def test_a_config_that_cannot_fit_is_refused_before_any_job_or_folder(tmp_path):
    profile = tmp_path / "gpu-1.yaml"
    profile.write_text("partition: gpu\ngpus_per_node: 1\ngpu_memory_gib: 80\n")
    argv = ["--config", str(ROOT / "configs/smoke.yaml"), "--profile", str(profile), "--nodes", "1",
            "--gpu-memory", "0.05", *TINY[:3], f"train.output_dir={tmp_path / 'runs'}", "optim.batch_size=16"]
    with pytest.raises(SystemExit) as e:
        launch_train.main(argv)
    line = str(e.value)
    assert line.startswith("error: one step needs ") and "GiB per GPU at optim.batch_size=16" in line, line
    assert "the GPUs have 0.05 GiB; the largest batch that fits is " in line and "--force" in line, line
    assert "\n" not in line
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted
