"""Run diagnostics on hand-computed cases: teacher entropy / ln K, student-teacher KL, the plateau warning."""

import math

import pytest
import torch

from pathfm.losses import dino_loss
from pathfm.metrics import PlateauWatch, relative_entropy, student_teacher_kl


def test_relative_entropy_uniform_one_hot_and_half():
    assert relative_entropy(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    assert relative_entropy(torch.eye(4)) == pytest.approx(0.0)
    # two of four prototypes at 1/2: ln 2 / ln 4 = 0.5
    assert relative_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]])) == pytest.approx(0.5)


def test_student_teacher_kl_by_hand():
    # teacher [1/2, 1/2] on both global crops; every student crop softmax(logits / 0.1) = [0.8, 0.2]
    teacher = torch.full((2, 1, 2), 0.5)
    logits = (0.1 * torch.tensor([math.log(0.8), math.log(0.2)])).expand(3, 1, 2)
    ce = float(dino_loss(logits, teacher, 0.1))
    assert ce == pytest.approx(-0.5 * math.log(0.8) - 0.5 * math.log(0.2), abs=1e-6)
    # KL = 1/2 ln(0.5/0.8) + 1/2 ln(0.5/0.2) = 0.22314
    kl = student_teacher_kl(ce, teacher.flatten(0, 1))
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2), abs=1e-6)
    assert kl == pytest.approx(0.22314, abs=1e-5)


def test_plateau_watch_fires_once_after_warmup():
    log_k = math.log(1024)  # 6.931
    watch = PlateauWatch(1024, patience=3, after_step=10)
    fired = [s for s in range(30) if watch.update(s, log_k if s != 14 else 5.0)]
    # steps < 10 ignored; 10..13 would fire at 12, but: run 10, 11, 12 -> fires at 12, and only once
    assert fired == [12]
    watch = PlateauWatch(1024, patience=3, after_step=0)
    # 6.90 is within 1% of ln K (0.069), 6.80 is not: the run of plateau steps restarts after it
    values = [6.90, 6.95, 6.80, 6.93, 6.92, 6.94]
    assert [s for s, v in enumerate(values) if watch.update(s, v)] == [5]
    assert not any(PlateauWatch(1024, patience=0, after_step=0).update(s, log_k) for s in range(10))


def test_trainer_logs_the_diagnostics_and_warns_once(tmp_path, monkeypatch, capsys):
    import json

    from pathfm import train
    from pathfm.config import load_config

    class Loose(PlateauWatch):  # any loss counts as "at ln K", so the warning must fire after warm-up
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, tol=10.0)

    monkeypatch.setattr(train, "PlateauWatch", Loose)
    cfg = load_config("smoke", [f"train.output_dir={tmp_path}", "train.name=run", "data.source=random", "train.steps=5",
                                "train.log_every=1", "train.rankme_every=0", "train.plateau_warn_steps=2",
                                "optim.warmup_steps=2"])
    train.main(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "diag/teacher_entropy" in r]
    assert len(logged) == 5
    for r in logged:
        assert 0.0 <= r["diag/teacher_entropy"] <= 1.0 + 1e-6 and r["diag/student_teacher_kl"] >= -1e-5
        assert 1.0 <= r["diag/teacher_rankme_batch"] <= 16.0  # 2 global crops x batch 8
    warnings = [r for r in rows if "warning" in r]
    assert len(warnings) == 1 and warnings[0]["step"] == 3  # steps 2 and 3 after a 2-step warm-up
    assert capsys.readouterr().err.count("WARNING: step 3: the DINO loss") == 1
