"""What an eval user sees: probes on a handful of embeddings in seconds, collapse named, results never colliding."""

import argparse

import pytest
import torch

from eval.common import checkpoint_place, collapse_warnings, default_out, embeddings_folder
from eval.linear import DINOV2_LRS, LinearGrid, _seed_slice, run_probe, train_linear_grid
from pathfm.metrics import collapse_warning, rankme, spread


def _nine(dim=192):
    g = torch.Generator().manual_seed(0)
    return {"embeddings": torch.randn(9, dim, generator=g), "labels": torch.arange(9), "classes": list("abcdefghi")}


def test_grid_probe_on_nine_embeddings_takes_seconds(monkeypatch):
    # before: 12,500 autograd steps x 5 seeds, 2 threads fighting over tiny ops: 9 min 20 s on the 9 CRC tiles. Now
    # the 5 seeds' 13 heads are one grid: 12,500 steps of a few tensor ops in all, no autograd. That work is what is
    # asserted (counted), not the seconds it takes: a loaded machine's clock decides nothing
    from eval import linear

    grid_steps = []
    step = LinearGrid.step
    monkeypatch.setattr(LinearGrid, "step", lambda grid, *a: (grid_steps.append(len(grid.lrs)), step(grid, *a))[1])
    monkeypatch.setattr(linear, "train_linear", lambda *a, **k: pytest.fail("an autograd probe ran"))
    d = _nine()
    # val and test: four noisy copies of each training point (noise 6x the signal), each split its own noise, so
    # the 13 heads score differently on val (0.7-0.86) and the choice of lr matters
    g = torch.Generator().manual_seed(1)
    noisy = lambda: dict(d, embeddings=torch.cat([d["embeddings"] + 6 * torch.randn(9, 192, generator=g) for _ in range(4)]),
                         labels=d["labels"].repeat(4))  # noqa: E731
    r = run_probe({"train": d, "val": noisy(), "test": noisy()}, grid=True, runs=5)
    assert len(grid_steps) == 12_500 and set(grid_steps) == {5 * len(DINOV2_LRS)}  # one pass, every seed's heads
    for run in r["per_run"]:  # each seed reports the head that scored best on val, and that head's test score
        assert run["val"]["accuracy"] == max(run["val_scores"]) > min(run["val_scores"])
        assert run["lr"] == pytest.approx(DINOV2_LRS[run["val_scores"].index(max(run["val_scores"]))])
    assert r["metrics"]["test"]["accuracy"]["mean"] > 0.5  # chance: 1/9


def test_seeds_stacked_in_one_grid_equal_separate_grids_on_a_full_batch():
    d = _nine(16)
    stacked = train_linear_grid(d["embeddings"], d["labels"], 9, lrs=(1e-3, 0.1), max_steps=30, seeds=range(3))
    for s in range(3):
        alone = train_linear_grid(d["embeddings"], d["labels"], 9, lrs=(1e-3, 0.1), max_steps=30, seed=s)
        assert torch.allclose(_seed_slice(stacked, s, 3).params, alone.params, atol=1e-6)
    assert isinstance(stacked, LinearGrid) and stacked.weight.shape == (6, 16, 9)


def test_collapse_is_named_by_trainer_and_eval_alike():
    same = torch.ones(32, 64) + 1e-6 * torch.randn(32, 64)
    assert spread(same) < 1e-6 and spread(torch.randn(256, 64)) > 0.9
    assert collapse_warning(spread(torch.randn(64, 8)), 8.0, "x") is None
    w = collapse_warning(spread(same), rankme(same), "the teacher's CLS")
    assert "collapsed" in w and "cosine similarity 1.0000" in w
    (msg,) = collapse_warnings({"train": {"embeddings": same}, "test": {"embeddings": torch.randn(9, 64)}})
    assert "train embeddings (32 x 64)" in msg and "chance level" in msg


def _args(**kw):
    base = dict(task=None, train="crc:/d:train", embeddings=None, ckpt=None, timm=None, out=None, embedding="cls",
                img_size=224)
    return argparse.Namespace(**{**base, **kw})


def test_eval_layout_per_checkpoint_dataset_protocol(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000012").mkdir(parents=True)
    (run / "checkpoints" / "step_0000012" / "meta.json").write_text("{}")
    (run / "checkpoints" / "last").write_text("step_0000012\n")
    # `last` names the step it points to, so a later step's results land elsewhere
    assert checkpoint_place(str(run / "checkpoints" / "last")) == (run, "step_0000012")
    out = default_out(_args(ckpt=str(run / "checkpoints" / "last")), "knn")
    assert out == run / "eval" / "step_0000012" / "crc" / "knn"
    assert embeddings_folder(_args(), out) == run / "eval" / "step_0000012" / "crc" / "embeddings" / "cls-224px"
    # two evals with their own --out never share embeddings
    a, b = (embeddings_folder(_args(out=str(tmp_path / n)), tmp_path / n) for n in "ab")
    assert a != b and a.parent.parent == tmp_path / "a"
    assert default_out(_args(timm="hf/vit"), "linear").parts[:2] == ("eval_results", "hf_vit")
