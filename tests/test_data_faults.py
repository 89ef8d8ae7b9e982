"""Faults of the data path that are not bad bytes: a slide that never answers (a stalled mount, here a FIFO),
a reader process that dies (SIGKILL, as the OOM killer sends it), in the index build and in training."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from pathfm.data import index as I
from pathfm.data.slides import SlideEntry
from pathfm.data.synthetic import write_synthetic_slide

PARAMS = I.IndexParams(64, (1.0, 2.0), 0.4)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    write_synthetic_slide(d / "a.svs", 1024, seed=1, tile=128, min_level_size=256)
    os.symlink(d / "a.svs", d / "b.svs")  # a second manifest row at the cost of one slide
    return d


def test_index_build_lists_a_stalled_and_a_killing_slide_and_goes_on(two_slides, tmp_path, monkeypatch):
    """One worker: its process is killed on the first slide, the second never answers; fresh processes
    describe the rest, and both faults are listed in unusable.csv with what happened."""
    os.mkfifo(tmp_path / "stalled.svs")  # opening it waits for a writer that never comes
    os.symlink(two_slides / "a.svs", tmp_path / "kills.svs")
    real = I.describe_slide

    def describe(row, entry, *a):
        if entry.path.endswith("kills.svs"):
            os.kill(os.getpid(), signal.SIGKILL)  # a reader that really dies (this runs in the forked worker)
        return real(row, entry, *a)

    monkeypatch.setattr(I, "describe_slide", describe)
    entries = [SlideEntry(str(tmp_path / "kills.svs")), SlideEntry(str(tmp_path / "stalled.svs")),
               SlideEntry(str(two_slides / "a.svs")), SlideEntry(str(two_slides / "b.svs"))]
    index = I.build_index(entries, tmp_path / "index", PARAMS, workers=1, mask_dir=two_slides / "masks",
                          progress=False, timeout_s=1.0)
    assert len(index) == 2 and [index.path(i) for i in range(2)] == [e.path for e in entries[2:]]
    reasons = {Path(r["path"]).name: r["reason"] for r in index.unusable()}
    assert "reader process died: signal 9 (SIGKILL) while describing it" in reasons["kills.svs"]
    assert "timed out after 1 s" in reasons["stalled.svs"]


# ---------------------------------------------------------------- training


@pytest.fixture
def cohort(two_slides, tmp_path):
    """An index of slide a and two more rows (links to a) that the tests break: stalls.svs and kills.svs."""
    d = tmp_path / "slides"
    d.mkdir()
    for name in ("a.svs", "stalls.svs", "kills.svs"):
        os.symlink(two_slides / "a.svs", d / name)
    entries = [SlideEntry(str(d / name)) for name in ("a.svs", "stalls.svs", "kills.svs")]
    return I.build_index(entries, d / "index", PARAMS, workers=1, timeout_s=0, mask_dir=two_slides / "masks",
                         progress=False)


def run(tmp_path, index, *overrides):
    from pathfm.config import load_config
    from pathfm.train import main_for_user

    cfg = load_config("smoke", [f"train.output_dir={tmp_path}", "train.name=run", "train.rankme_every=0",
                                "data.source=manifest", f"data.index={index.folder}", "data.tile_size=64",
                                "data.mpps=[1.0,2.0]", "data.tiles_per_visit=2", "data.num_workers=1",
                                "train.steps=2", "train.log_every=1", "train.ckpt_every=1", *overrides])
    return main_for_user(cfg)


def test_a_stalled_loader_and_a_dead_loader_worker_stop_for_a_requeue_and_the_run_continues(cohort, tmp_path, monkeypatch):
    from pathfm.data import sampler

    last = lambda: (tmp_path / "run" / "checkpoints" / "last").read_text().strip()  # noqa: E731
    assert run(tmp_path, cohort, "train.stop_after=1")["status"] == "interrupted" and last() == "step_0000001"

    # a stall: the storage under one slide stops answering (a FIFO); exit status 75 after the limit, no checkpoint
    stalls = Path(cohort.path(1))
    stalls.unlink()
    os.mkfifo(stalls)
    stalled = run(tmp_path, cohort, "data.stall_timeout_s=2")  # (without the limit: a hang, until pytest's timeout)
    assert stalled["status"] == "interrupted"  # exit status 75
    assert "no batch for 2" in stalled["reason"] and "waiting for step 1" in stalled["reason"]
    assert f"was reading {stalls}" in stalled["reason"]
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"
    assert last() == "step_0000001" and not list((tmp_path / "run" / "read_failures").glob("*.csv"))  # nothing recorded
    stalls.unlink()
    os.symlink(cohort.path(0), stalls)  # the mount answers again

    # a death: a worker reading kills.svs is SIGKILLed (the OOM killer, a segfault in a C library)
    real_read, test_process = sampler.TileReader.read, os.getpid()

    def read(self, slide, *a, **kw):
        if slide.info.path.endswith("kills.svs") and os.getpid() != test_process:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_read(self, slide, *a, **kw)

    monkeypatch.setattr(sampler.TileReader, "read", read)
    died = run(tmp_path, cohort)
    assert died["status"] == "interrupted" and last() == "step_0000001"
    assert "data loader worker died" in died["reason"] and "(signal 9 (SIGKILL))" in died["reason"]
    assert "kills.svs for step 1" in died["reason"]
    failures = "".join(p.read_text() for p in (tmp_path / "run" / "read_failures").glob("*.csv"))
    assert "kills.svs" in failures and "reader process died: signal 9 (SIGKILL) while reading it" in failures

    # the requeued run resumes from step 1 and skips the slide that killed a reader (it would kill this one too)
    done = run(tmp_path, cohort)
    assert done["status"] == "finished" and done["step"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "data/dropped_slides" in r][-1]["data/dropped_slides"] == 1


def test_excluded_slides_change_only_their_own_visits(cohort):
    from pathfm.data.sampler import SlideTileDataset

    index = cohort
    make = lambda excluded: SlideTileDataset(index, batch_size=8, tile_size=64, mpps=[1.0, 2.0], mpp_weights=None,  # noqa: E731
                                             seed=0, rank=0, world_size=1, tiles_per_visit=2, excluded=excluded)
    plain, skipping = make(()), make({1, 2})
    kept = changed = 0
    for step in range(4):
        a, b = plain.batch(step), skipping.batch(step)
        for i, (la, lb) in enumerate(zip(a["locations"], b["locations"])):
            assert lb[0] == 0  # slide 1 is never read
            if la[0] == 0:  # every visit that was not to slide 1 is unchanged, position and pixels
                assert la == lb and np.array_equal(a["tiles"][i], b["tiles"][i])
                kept += 1
            else:
                changed += 1
    assert kept and changed
