"""bench/learn.py end to end on a few steps: training on the real slides, probes, table, curves."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "tiles").is_dir(), reason="needs ../shared/data (real slides and CRC tiles)")
def test_learn_script_trains_probes_and_writes_its_evidence(tmp_path):
    from bench import learn

    out = tmp_path / "learn"
    res = learn.main(["--out", str(out), "--steps", "4", "--probe-every", "2", "--probe-stride", "48", "data.num_workers=0",
                      "optim.batch_size=8", "train.rankme_every=2", "train.rankme_batch=16", "train.log_every=1",
                      f"data.cache_dir={ROOT / '.cache' / 'pathfm-tests'}"])
    assert [r["step"] for r in res["table"]] == [2, 4]
    for r in res["table"]:
        assert 0.0 <= r["knn_normalised"] <= 1.0 and 0.0 <= r["knn_raw"] <= 1.0
        assert r["loss_dino"] is not None and 0.0 <= r["teacher_entropy"] <= 1.0 + 1e-6
    assert set(res["baselines"]) == {"pixels", "random_init"}
    assert res["baselines"]["pixels"]["raw"] > 0.5  # one tile per class: mean colour alone names it
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == res["table"]
    assert "| raw pixels (best pooling) |" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    assert [p.name for p in (out / "run" / "checkpoints").glob("step_*")] == ["step_0000004"]  # only the last kept


def test_probe_split_is_spatially_disjoint():
    from bench.learn_probe import crc_split

    if not (DATA / "tiles").is_dir():
        pytest.skip("needs ../shared/data")
    d = crc_split(DATA / "tiles" / "nct_crc_he_100k_sample9")
    assert d["train"][0].shape == d["test"][0].shape == (396, 3, 64, 64)  # 9 classes x 4 columns x 11 rows
    assert d["train"][1].bincount().tolist() == [44] * 9
