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


def _manifests(tmp_path):
    """Two manifests users write: one whose every slide is unusable, one whose mpp column holds a word."""
    (tmp_path / "notes.svs").write_text("not a slide")
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "unusable.csv").write_text(f"path\n{tmp_path / 'notes.svs'}\n{tmp_path / 'empty.svs'}\n")
    (tmp_path / "bad_mpp.csv").write_text(f"path,mpp\n{tmp_path / 'notes.svs'},half\n")
    return {"unusable": (tmp_path / "unusable.csv", r"no usable slide among 2 manifest entries: .*notes.svs.*empty.svs"),
            "bad mpp": (tmp_path / "bad_mpp.csv", r"bad_mpp.csv.*row 2.*'half' is not a number")}


def _launch(tmp_path, manifest, *extra):
    return ["--config", "configs/smoke.yaml", "--local", *extra, f"train.output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.source=manifest", f"data.manifest={manifest}",
            "data.index_workers=1"]


def test_launcher_user_errors_are_one_line_and_leave_no_run_folder(tmp_path):
    # errors raised inside the trainer's start, after it made the run folder: main_for_user turns them into one line
    # and removes the folder it made. As users meet them: the launcher in its own process, its stderr, its exit status
    import re

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for case, (manifest, words) in _manifests(tmp_path).items():
        p = subprocess.run([sys.executable, "launch/train.py", *_launch(tmp_path, manifest)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "Traceback" not in p.stderr, (case, p.stderr)
        *before, line = p.stderr.strip().splitlines()
        # one line naming what is wrong; before it at most the index build's progress bar
        assert line.startswith("error: ") and re.search(words, line), (case, p.stderr)
        assert all("indexing slides" in ln for ln in before), (case, p.stderr)
        assert not (tmp_path / "runs" / "smoke").exists(), case


def test_debug_shows_the_error_itself_and_config_errors_are_one_line(tmp_path):
    from launch.train import main as launch
    from pathfm.data.slides import SlideError

    for case, (manifest, words) in _manifests(tmp_path).items():
        with pytest.raises(SlideError, match=words):  # raised, not turned into a line: python prints the traceback
            launch(_launch(tmp_path, manifest, "--debug"))
    # refused before the trainer starts (config values, files that are not weights): one line, no folder either
    not_weights = tmp_path / "w.pth"
    not_weights.write_text("hello")
    for override, words in (("model.arch=vit_huge", "'model.arch' is 'vit_huge'; expected one of"),
                            (f"model.init_weights={not_weights}", "not a PyTorch state dict")):
        with pytest.raises(SystemExit) as e:
            launch(["--config", "configs/smoke.yaml", "--local", f"train.output_dir={tmp_path / 'other'}", override])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and words in e.value.code, e.value.code
        assert not (tmp_path / "other").exists()


def test_weights_that_are_a_folder_or_text_are_named(tmp_path):
    from pathfm.weights import read_state_dict

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
                               "train.steps=2", "train.rankme_every=0", "data.num_workers=0", "optim.batch_size=2",
                               "crops.global_size=32", "crops.local_size=16"]))
    err = capsys.readouterr().err
    for phase in ("models: vit_tiny/16", "training steps 1-2", "checkpoint saved:", "export written:"):
        assert err.count(phase) == 1, (phase, err)
