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
        assert r["loss_dino"] is not None and 0.0 <= r["teacher_entropy"] <= 1.0 + 1e-6
    assert set(res["baselines"]) == {"pixels", "random_init"}
    # relative checks. The probe tells classes apart where they differ (raw pixels: one tile per class, mean colour
    # names it) and is at chance on a shuffled control: the same pixels with the training labels permuted
    import torch

    from bench.learn_probe import pixel_features

    sets = learn.probe_sets(DATA, 48)
    raw = sets["raw"]
    perm = torch.randperm(len(raw["train"][1]), generator=torch.Generator().manual_seed(0))
    shuffled = {"raw": {**raw, "train": (raw["train"][0], raw["train"][1][perm])}}
    control = learn.probe(pixel_features, shuffled)["raw"]
    assert res["baselines"]["pixels"]["raw"] > control + 0.3 and control < 0.3, (res["baselines"], control)
    # the table probes each step's teacher, not the random init: the last row, recomputed from its checkpoint
    from bench.learn_probe import cls_features
    from pathfm.config import load_config
    from pathfm.weights import load_ema_backbone

    crops = load_config(out / "run" / "config.yaml").crops
    vit, _ = load_ema_backbone(out / "run" / "checkpoints" / "step_0000004")
    again = learn.probe(lambda x: cls_features(vit, x, crops.mean, crops.std), sets)
    assert again == {"raw": res["table"][-1]["knn_raw"], "normalised": res["table"][-1]["knn_normalised"]}
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
