"""Errors a user causes: one line naming the file / key / value, non-zero exit, no run folder left behind."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathfm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override,words", [
    ("model.arch=vit_huge", "'model.arch' is 'vit_huge'; expected one of vit_tiny"),
    ("crops.n_local=-1", "'crops.n_local' must be >= 0"),

])
def test_bad_config_values_fail_at_load(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config("smoke", [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arch: vit_tiny\n optim: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(bad)


def test_launcher_user_errors_are_one_line_and_leave_no_run_folder(tmp_path):
    not_weights = tmp_path / "w.pth"
    not_weights.write_text("hello")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for override in ("model.arch=vit_huge", f"model.init_weights={not_weights}"):
        p = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", "--local",
                            f"train.output_dir={tmp_path / 'runs'}", override], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and ("vit_huge" in p.stderr or "not a PyTorch state dict" in p.stderr)
        assert not (tmp_path / "runs" / "smoke").exists()


def test_weights_that_are_a_folder_or_text_are_named(tmp_path):
    from pathfm.export import read_state_dict

    (tmp_path / "t.pth").write_text("not weights")
    for bad, words in ((tmp_path, "is a folder"), (tmp_path / "t.pth", "is not a PyTorch state dict")):
        with pytest.raises(ValueError, match=words):
            read_state_dict(bad)


def test_export_refuses_to_overwrite(tmp_path):
    from pathfm.export import main

    (tmp_path / "model.pth").write_bytes(b"x")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main([str(tmp_path / "ckpt"), "-o", str(tmp_path)])


def test_sixteen_bit_grayscale_is_scaled_and_empty_class_folder_named(tmp_path):
    from eval.datasets import DatasetError, image_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.full((8, 8), 16384, dtype=np.uint16)).save(tmp_path / "a" / "x.tif")  # a quarter of 65535
    with pytest.raises(DatasetError, match=r"/b: class folder with no images"):
        image_folder(tmp_path)
    (tmp_path / "b" / "y.png").write_bytes((tmp_path / "a" / "x.tif").read_bytes())
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "b" / "y.png")
    rgb = np.asarray(image_folder(tmp_path).load(0))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 64) <= 1  # not 255 (white)


def test_dry_run_warns_about_a_manifest_that_is_not_here(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", "--nodes", "1",
                        "--dry-run", "data.source=manifest", f"data.manifest={tmp_path}/nope.csv"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "warning: data.manifest" in p.stderr and "does not exist on this machine" in p.stderr


def test_trainer_says_each_phase_once(tmp_path, capsys):
    from pathfm.train import main

    main(load_config("smoke", [f"train.output_dir={tmp_path}", "train.name=run", "data.source=random",
                               "train.steps=2", "train.rankme_every=0", "data.num_workers=0"]))
    err = capsys.readouterr().err
    for phase in ("models: vit_tiny/16", "training steps 1-2", "checkpoint saved:", "export written:"):
        assert err.count(phase) == 1, (phase, err)
