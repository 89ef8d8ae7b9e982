"""Checkpoints in one process: round trip, atomic writes, the `last` pointer, export.

Saving on N ranks and loading on M is tested with real gloo process groups in test_fsdp.py.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from pathfm import checkpoint as ckpt
from pathfm.export import main as export_main
from pathfm.losses import Centering
from pathfm.vit import ViTArgs, build_vit
from pathfm.weights import load_ema

VIT = ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, layerscale=1e-5)


class TinyBackbone(nn.Module):
    """Stands in for the ViT where only the checkpoint mechanics matter (a ViT save takes seconds)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mask_token = nn.Parameter(torch.zeros(1, 8))  # trainable but never used: no AdamW state

    def forward(self, x):
        return self.proj(x)


def make_state(seed: int, vit: bool = False):
    """Student (backbone + head), its EMA, AdamW with state, loss centre: what train.py checkpoints."""
    torch.manual_seed(seed)
    backbone = build_vit(VIT) if vit else TinyBackbone()
    x = torch.randn(2, 3, 32, 32) if vit else torch.randn(2, 8)
    student = nn.ModuleDict({"backbone": backbone, "dino_head": nn.Linear(backbone(x).shape[-1], 16)})
    ema = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.dino_head(student.backbone(x)).square().mean().backward()
    optimizer.step()  # Adam moments exist, so the optimizer state is not trivially empty
    loss_state = nn.ModuleDict({"dino_center": Centering(16)})
    loss_state.dino_center.center.normal_()
    return dict(student=student, ema=ema, optimizer=optimizer, loss_state=loss_state)


META = {"vit_args": vars(VIT), "mean": [0.5] * 3, "std": [0.5] * 3}


def save(folder, step, state, **kw):
    return ckpt.save_checkpoint(folder, step, meta=META, **state, **kw)


def flat(state) -> dict:
    """Every tensor of a training state, by name, for equality checks."""
    out = {f"student.{k}": v for k, v in state["student"].state_dict().items()}
    out.update({f"ema.{k}": v for k, v in state["ema"].state_dict().items()})
    out.update({f"loss.{k}": v for k, v in state["loss_state"].state_dict().items()})
    for i, s in state["optimizer"].state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in s.items()})
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[k])), k


def test_round_trip_restores_everything(tmp_path):
    saved = make_state(0)
    folder = save(tmp_path, 5, saved)
    assert folder.name == "step_0000005" and (folder / ".metadata").is_file()
    assert (tmp_path / "last").read_text().strip() == "step_0000005"
    after_save = torch.rand(3)  # what the RNG gives next in the saved run

    restored = make_state(1)  # different weights, moments, centre and RNG state
    meta = ckpt.load_checkpoint(folder, **restored)
    assert_same(flat(saved), flat(restored))
    assert meta["step"] == 5 and meta["world_size"] == 1 and meta["vit_args"]["arch"] == "vit_tiny"
    assert restored["student"].backbone.mask_token not in restored["optimizer"].state  # as in the saving run
    assert torch.equal(torch.rand(3), after_save)  # the resumed run continues the same random stream


def test_a_checkpoint_saved_before_the_ema_rename_still_resumes(tmp_path):
    """tests/fixtures/teacher_key_checkpoint was written by save_checkpoint at commit a0f2421, which saved the EMA
    under the key "teacher": make_state(0), its EMA moved off the student (0.5 * w + 1); expected.pt holds every
    tensor it saved, named as flat() named them then."""
    old = shutil.copytree(Path(__file__).parent / "fixtures" / "teacher_key_checkpoint", tmp_path / "checkpoints")
    want = {("ema." + k[len("teacher."):] if k.startswith("teacher.") else k): v
            for k, v in torch.load(old / "expected.pt", weights_only=True).items()}
    assert ckpt.ema_key(old / "step_0000005") == "teacher"
    restored = make_state(1)
    assert ckpt.load_checkpoint(old / "step_0000005", **restored)["step"] == 5
    assert_same(want, flat(restored))
    weights_only = make_state(2)  # train.init_checkpoint: the two models alone
    ckpt.load_weights(old, student=weights_only["student"], ema=weights_only["ema"])
    ema = make_state(3)["ema"]  # what export and the probes read
    assert load_ema(old, ema)["step"] == 5
    for name, model in (("student", weights_only["student"]), ("ema", weights_only["ema"]), ("ema", ema)):
        for k, v in model.state_dict().items():
            assert torch.equal(v, want[f"{name}.{k}"]), (name, k)
    # saved again, it is in the new layout
    assert ckpt.ema_key(save(tmp_path / "again", 6, restored)) == "ema"


def test_killed_write_is_ignored_then_cleaned(tmp_path):
    state = make_state(0)
    save(tmp_path, 2, state)
    # a write killed after rank 0 wrote meta.json but before the rename: still not a checkpoint
    killed = tmp_path / "step_0000004.tmp"
    killed.mkdir()
    (killed / "meta.json").write_text(json.dumps({"step": 4}))
    (tmp_path / "last").unlink()  # also without the pointer, the fallback scan must skip it
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000002"
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_0000002"

    save(tmp_path, 3, state)  # the next save (another step) removes the leftover
    assert not killed.exists()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "step_0000002", "step_0000003"]


def test_existing_step_folder_is_never_overwritten(tmp_path):
    first = make_state(0)
    save(tmp_path, 6, first)
    second = make_state(1)
    save(tmp_path, 6, second)  # e.g. a stop signal right after the periodic save
    restored = make_state(2)
    ckpt.load_checkpoint(tmp_path / "step_0000006", **restored)
    assert_same(flat(first), flat(restored))


def test_keep_last_and_pointer(tmp_path):
    state = make_state(0)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, state, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003", "step_0000004"]
    assert ckpt.resolve_checkpoint(tmp_path / "last") == tmp_path / "step_0000004"
    assert ckpt.resolve_checkpoint(tmp_path.parent / tmp_path.name) == tmp_path / "step_0000004"


def test_missing_checkpoint_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no complete pathfm checkpoint at '{tmp_path}'"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="no complete pathfm checkpoint"):
        export_main([str(tmp_path), "-o", str(tmp_path / "out")])


def test_export_command_writes_the_ema_for_timm(tmp_path):
    state = make_state(0, vit=True)
    with torch.no_grad():  # ema != student, so exporting the wrong one would show
        for p in state["ema"].parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save(tmp_path / "checkpoints", 7, state)
    out = export_main([str(tmp_path / "checkpoints" / "last"), "-o", str(tmp_path / "export")])
    side = json.loads((out.parent / "model.json").read_text())
    assert side["step"] == 7 and side["timm_name"] == "vit_tiny_patch16_224" and side["mean"] == [0.5] * 3

    model = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **side["timm_kwargs"]).eval()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    ema = state["ema"].backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ema(x), atol=1e-5, rtol=1e-5)
        assert (model(x) - state["student"].backbone.eval()(x)).abs().max() > 1e-3


def test_keep_last_zero_is_refused_before_anything_is_deleted(tmp_path):
    state = make_state(0)
    save(tmp_path, 1, state)
    with pytest.raises(ValueError, match="keep_last=0 would delete the checkpoint just written"):
        save(tmp_path, 2, state, keep_last=0)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000001"


def test_rng_state_is_tensors_only_and_round_trips(tmp_path):
    import random

    import numpy as np

    state = make_state(0)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussian halves are part of the state too
    folder = save(tmp_path, 1, state)
    saved = torch.load(folder / "rng_rank0.pt", weights_only=True)  # no pickled numpy / Python objects
    assert all(torch.is_tensor(v) or v == [] for v in saved.values())
    want = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.load_checkpoint(folder, **make_state(1))
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def test_import_leaves_the_process_warning_filters_alone():
    import subprocess
    import sys

    # pathfm's own filter only; torch, numpy and sympy add theirs at import
    code = ("import warnings, pathfm.checkpoint; "
            "ours = [f for f in warnings.filters if f[1] is not None and 'torch.distributed is disabled' in f[1].pattern]; "
            "assert not ours, ours")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full file system (a 140 MB tmpfs: one smoke checkpoint of about 89 MB fits, two do not)."""
    root = Path(__file__).resolve().parents[1]
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=140m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mount refused here")
    try:
        cmd = [sys.executable, "-m", "pathfm.train", "--config", "configs/smoke.yaml", f"train.output_dir={disk}",
               f"data.cache_dir={root / '.cache' / 'pathfm-tests'}", "train.steps=3", "train.ckpt_every=1",
               "train.keep_last=3", "data.num_workers=0", "train.rankme_every=0"]
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(root)})
        assert p.returncode == 1, p.stderr[-2000:]
        last_line = p.stderr.strip().splitlines()[-1]
        assert last_line.startswith("error: no space left on the device of") and "MB are free" in last_line
        assert "the previous checkpoint step_0000001 is intact" in last_line and "Traceback" not in p.stderr
        ckpts = disk / "smoke" / "checkpoints"
        assert sorted(q.name for q in ckpts.iterdir()) == ["last", "step_0000001"]  # no half-written temp folder
        assert json.loads((ckpts / "step_0000001" / "meta.json").read_text())["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)])
