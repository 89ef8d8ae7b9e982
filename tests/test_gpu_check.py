"""bench/gpu_check.py: the CPU smoke runs every section; the clock skips what would overrun; the pytest
plugin picks exactly the tests that skip without CUDA; JUnit outcomes are read right."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def check(out, *args, timeout=300):
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    proc = check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    items = {(r["section"], r["name"]): r for r in results["items"]}
    assert {s for s, _ in items} == set(gpu_check.SECTIONS)

    tests = items["cuda_tests", "pytest"]
    assert tests["status"] == "skipped" and tests["counts"]["skipped"] == len(tests["tests"]) >= 5
    assert any("test_cuda_matches_cpu" in t["test"] for t in tests["tests"])

    r = items["throughput", "vitl14"]
    assert r["status"] == "ok", r
    assert r["images_per_s_per_device"] > 0 and r["memory_gib"] > 0 and r["mfu"] is None  # no peak on a CPU
    assert set(r["time_s"]) >= {"data", "forward", "backward", "optimizer"} and len(r["losses"]) == 3
    assert not (tmp_path / "points" / "vitl14" / "checkpoints").exists()  # the final checkpoint is not a result
    assert items["throughput", "vitg14"]["status"] == "skipped" and "runs only vitl14" in items["throughput", "vitg14"]["reason"]

    base, flash = items["fast_paths", "baseline"], items["fast_paths", "sdpa_flash"]
    assert base["status"] == flash["status"] == "ok"
    assert flash["loss_equal"] and flash["speedup"] > 0  # fp32 on the CPU: the flash kernel computes the same loss
    for name in ("compile", "fused_adamw", "sdpa_cudnn", "sdpa_efficient"):
        assert items["fast_paths", name]["status"] == "skipped" and "CPU smoke" in items["fast_paths", name]["reason"]

    aug = items["device_augment", "multicrop"]
    assert aug["status"] == "ok" and aug["torch_calls_per_batch"]["batched"] < aug["torch_calls_per_batch"]["per_crop"]
    assert aug["max_diff_levels"] < 5 and aug["share_differing"] < 0.01

    table = (tmp_path / "results.md").read_text()
    assert "| vitl14 | ok | 4 |" in table and ">= 150" in table and "| sdpa_flash | model.sdpa_kernels=[flash] | ok |" in table
    assert table in proc.stdout


def test_a_budget_too_short_skips_every_item_and_says_why(tmp_path):
    proc = check(tmp_path, "--budget-s", "1", "--all-items", "--sections", "throughput,device_augment")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = json.loads((tmp_path / "results.json").read_text())["items"]
    assert [r["name"] for r in items] == [*gpu_check.THROUGHPUT, "multicrop"]
    assert all(r["status"] == "skipped" and "would overrun" in r["reason"] for r in items)
    assert "skipped (would overrun" in proc.stdout


def test_bad_sections_and_config_keys_fail_before_anything_runs(tmp_path, monkeypatch):
    proc = check(tmp_path / "out", "--sections", "gpu")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: unknown section(s) gpu; expected some of {', '.join(gpu_check.SECTIONS)}"], proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    monkeypatch.setitem(gpu_check.FAST_PATHS, "fused_adamw", ("optim.fussed=true", ""))
    items = gpu_check.plan("cpu-smoke", ["fast_paths"], {"xformers": False})
    with pytest.raises(SystemExit, match="fast_paths/fused_adamw: .*'optim.fussed'"):
        gpu_check.check_configs(items, "cpu-smoke")


def test_pytest_plugin_keeps_only_the_tests_that_skip_without_cuda():
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "gpu_check", "tests/test_augment.py", "tests/test_vit.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "bench")})
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert collected == ["tests/test_augment.py::test_cuda_matches_cpu",
                         "tests/test_vit.py::test_xformers_and_sdpa_agree_on_cuda"], proc.stdout + proc.stderr


def test_junit_outcomes(tmp_path):
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="t1"/>'
        '<testcase classname="tests.a" name="t2"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="tests.b" name="t3"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.b" name="t4"><error message="fixture failed"/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_outcomes(tmp_path / "r.xml") == [
        {"test": "tests.a::t1", "outcome": "passed", "message": ""},
        {"test": "tests.a::t2", "outcome": "failed", "message": "assert 1 == 2"},
        {"test": "tests.b::t3", "outcome": "skipped", "message": "needs CUDA"},
        {"test": "tests.b::t4", "outcome": "error", "message": "fixture failed"}]
