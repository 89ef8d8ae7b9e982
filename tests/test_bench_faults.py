"""bench/faults.py stays runnable: no helper shadowed by a later one of the same name (a second `last_checkpoint`
once sent the data rows' resume to the wrong folder), and each scenario's set-up works on real files."""

import ast
import importlib.util
from pathlib import Path

import torch
from torch import nn

from pathfm import checkpoint as ckpt
from pathfm.config import load_config
from pathfm.vit import ViTArgs, build_vit

ROOT = Path(__file__).resolve().parents[1]


def _faults():
    spec = importlib.util.spec_from_file_location("bench_faults", ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_bench_script_defines_a_top_level_name_twice():
    twice = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        seen = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                if node.name in seen:
                    twice.append(f"{path.name}: {node.name}")
                seen.add(node.name)
    assert not twice, twice


def test_each_fault_scenario_sets_up(tmp_path):
    faults = _faults()
    assert set(faults.FAULTS) == {"build-stall", "build-kill", "loader-stall", "loader-kill", "rank-disk-full", "rank-kill"}
    paths = faults.slides(tmp_path, 1, size=512)
    m = faults.manifest(tmp_path, paths)
    assert m.read_text().splitlines() == ["path", str(paths[0])]
    assert faults.build_command(m, tmp_path / "index")[1:4] == ["-m", "pathfm.data.index", str(m)]
    # the training scenarios' command lines: their overrides are keys the config still has
    for extra in ([], ["train.stop_after=2"], ["data.stall_timeout_s=10"]):
        cmd = faults.train_command(tmp_path, m, *extra)
        load_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2:])
    load_config(ROOT / "configs" / "smoke.yaml", [*faults.RANK_RUN, "optim.batch_size=4", f"train.output_dir={tmp_path}"])
    # what resume() and the rank rows read: a run folder's last checkpoint, loaded
    run = tmp_path / "run"
    args = ViTArgs(arch="vit_tiny_d6", patch_size=16, img_size=32, num_registers=0)
    student = nn.ModuleDict({"backbone": build_vit(args)})
    ema = nn.ModuleDict({"backbone": build_vit(args)})
    opt = torch.optim.AdamW(student.parameters())
    for step in (2, 4):
        ckpt.save_checkpoint(run / "checkpoints", step, student=student, ema=ema, optimizer=opt,
                             loss_state=nn.ModuleDict(), meta={"vit_args": vars(args)})
    assert faults.last_checkpoint(run) == "step_0000004"
