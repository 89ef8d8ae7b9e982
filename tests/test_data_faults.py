"""Faults of the data path that are not bad bytes: a slide that never answers (a stalled mount, here a FIFO),
a reader process that dies (SIGKILL, as the OOM killer sends it), in the index build and in training."""

import os
import signal
from pathlib import Path

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
