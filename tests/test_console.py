"""One-line user errors of the launcher, before anything is written or started (the smoke jobs' clean consoles on 1
and 2 ranks are checked in test_train.py's README-command tests)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _launch(*argv):
    from launch.train import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an accelerator; the check is for machines with none")
def test_gpu_config_on_a_cpu_is_one_line_and_writes_nothing(tmp_path):
    msg = _launch("--config", "configs/vits16.yaml", "--local", "data.source=random", "data.manifest=",
                  f"train.output_dir={tmp_path}")
    assert "train.precision" in msg and "train.precision=fp32" in msg and "\n" not in msg, msg
    assert list(tmp_path.iterdir()) == []  # no run folder left behind


def test_resume_on_another_world_size_is_refused_before_torchrun(tmp_path):
    from pathfm.config import load_config, to_dict, to_yaml

    cfg = load_config("smoke", [f"train.output_dir={tmp_path}", "train.name=run"])
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    meta = {"step": 4, "world_size": 4, "config": to_dict(cfg)}  # as a 4-rank run left it
    (run / "checkpoints" / "step_0000004" / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "last").write_text("step_0000004\n")
    before = sorted(p.name for p in run.rglob("*"))
    msg = _launch("--config", "configs/smoke.yaml", "--local", "--nproc", "2", "--name", "run",
                  f"train.output_dir={tmp_path}")
    assert "world size: 4 -> 2" in msg and "allow_resume_changes" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written, no torchrun report


def test_resume_of_a_run_drawn_at_free_positions_is_refused_under_the_grid_aligned_default(tmp_path):
    """data.grid_aligned became the default in issue 31: a run checkpointed with free positions must not switch
    its data stream silently when resumed with today's defaults."""
    from pathfm import runfolder
    from pathfm.config import load_config, to_dict, to_yaml

    cfg = load_config("smoke", [f"train.output_dir={tmp_path}", "train.name=run"])
    assert cfg.data.grid_aligned
    saved = to_dict(cfg)
    saved["data"]["grid_aligned"] = False  # as the run was launched before
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "checkpoints" / "step_0000004" / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1, "config": saved}))
    (run / "checkpoints" / "last").write_text("step_0000004\n")
    with pytest.raises(SystemExit, match=r"data.grid_aligned: False -> True"):
        runfolder.check_resume(cfg, run, 1)
    cfg.data.grid_aligned = False
    assert runfolder.check_resume(cfg, run, 1) == {}
