"""The slide index: built from real and synthetic slides, in parallel, resumed after a kill, refused when it
does not match, split across ranks inside the trainer, and used by a training run (data.index)."""

import json
import mmap
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pathfm.data import index as I
from pathfm.data.loader import slide_index
from pathfm.data.sampler import SlideTileDataset
from pathfm.data.slides import SlideEntry, SlideError
from pathfm.data.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "slides"
PARAMS = I.IndexParams(224, (0.5, 1.0, 2.0), 0.4)
ARRAYS = ("slides.npy", "levels.npy", "plans.npy", "segments.npy", "runs.npy", "ends.npy", "paths.bin", "unusable.csv")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A manifest of 6 synthetic slides, the two real ones (TCGA with its mpp) and one unreadable file."""
    d = tmp_path_factory.mktemp("cohort")
    rows = ["path,mpp,weight,group"]
    for i in range(6):
        write_synthetic_slide(d / f"syn{i}.svs", 1536, seed=10 + i)
        rows.append(f"syn{i}.svs,,1,synthetic")
    if REAL.exists():
        rows += [f"{REAL / 'CMU-1-Small-Region.svs'},,2,real", f"{REAL / 'TCGA-CR-7395-01A-01-TS1.svs'},0.5,1,real"]
    (d / "broken.svs").write_text("not a slide")
    rows.append("broken.svs,,1,synthetic")
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    return d


def entries_of(cohort):
    from pathfm.data.slides import read_manifest

    return read_manifest(cohort / "manifest.csv")


def same_index(a: Path, b: Path):
    for name in ARRAYS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ja, jb = (json.loads((p / "index.json").read_text()) for p in (a, b))
    assert {k: v for k, v in ja.items() if k != "created"} == {k: v for k, v in jb.items() if k != "created"}


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "index"
    return I.build_index(entries_of(cohort), out, PARAMS, workers=1, mask_dir=cohort / "masks", progress=False)


def test_index_of_real_and_synthetic_slides(reference, cohort):
    n_real = 2 if REAL.exists() else 0
    assert len(reference) == 6 + n_real and reference.meta["unusable"] == 1
    (bad,) = reference.unusable()
    assert bad["path"] == str(cohort / "broken.svs") and "not a slide" in bad["reason"]
    assert reference.groups == (["real", "synthetic"] if n_real else ["synthetic"])
    assert not (reference.folder / "parts").exists()  # merged: the journals are gone
    if n_real:  # CMU-1 is 0.499 µm/px: it serves 0.5, 1 and 2; its weight is kept
        cmu = [i for i in range(len(reference)) if "CMU-1" in reference.path(i)][0]
        assert reference.slide(cmu).mpps == [0.5, 1.0, 2.0] and reference.slides[cmu]["weight"] == 2.0


def test_two_processes_build_the_same_index(reference, cohort, tmp_path):
    I.build_index(entries_of(cohort), tmp_path / "par", PARAMS, workers=2, mask_dir=cohort / "masks", progress=False)
    same_index(reference.folder, tmp_path / "par")


# what a kill mid-write leaves at the end of a journal: a cut header, or a whole header and a cut payload
TORN = {"header": pickle.dumps({"row": 99, "runs": list(range(1000))})[:40],
        "payload": pickle.dumps({"row": 3, "path": "x", "payload": 5000}) + b"\x80" * 100}


@pytest.mark.parametrize("torn", sorted(TORN))
def test_a_killed_build_resumes_without_redoing_finished_slides(reference, cohort, tmp_path, monkeypatch, torn):
    entries, out = entries_of(cohort), tmp_path / "killed"
    real_describe, described = I.describe_slide, []

    def dies_on_the_fourth(row, *a):
        if len(described) == 3:
            raise KeyboardInterrupt  # the build is killed while describing its 4th slide
        described.append(row)
        return real_describe(row, *a)

    monkeypatch.setattr(I, "describe_slide", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        I.build_index(entries, out, PARAMS, workers=1, mask_dir=cohort / "masks", progress=False, timeout_s=0)
    journal = out / "parts" / "local.journal"
    with open(journal, "ab") as f:  # and the kill tore a record being written
        f.write(TORN[torn])
    with pytest.raises(SlideError, match="not a slide index, no index.json .a build is in progress"):
        I.SlideIndex(out)

    monkeypatch.setattr(I, "describe_slide", lambda row, *a: described.append(row) or real_describe(row, *a))
    I.build_index(entries, out, PARAMS, workers=1, mask_dir=cohort / "masks", progress=False, timeout_s=0)
    assert sorted(described) == list(range(len(entries)))  # every slide described exactly once
    same_index(reference.folder, out)


def test_a_folder_built_for_other_parameters_is_refused_and_kept(reference, cohort):
    other = I.IndexParams(256, (0.5, 1.0, 2.0), 0.4)
    with pytest.raises(SlideError, match="tile_size: index 224 vs run 256"):
        I.build_index(entries_of(cohort), reference.folder, other, workers=1, progress=False)
    assert (reference.folder / "index.json").exists()


def test_command_line_builds_and_reports(cohort, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "pathfm.data.index", str(cohort / "manifest.csv"), "-o", str(out), "--workers", "2",
           "--tile-size", "224", "--mpps", "0.5", "1", "2", "--mask-dir", str(cohort / "masks")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "1 unusable" in p.stdout and "unusable.csv" in p.stdout
    assert "indexing slides" in p.stderr and "slide/s" in p.stderr  # the progress bar
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # built: opens, redoes nothing
    assert again.returncode == 0 and "indexing slides" not in again.stderr
    bad = subprocess.run([*cmd[:3], str(cohort / "nope.csv"), "-o", str(tmp_path / "x")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "nope.csv: no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_the_index_is_memory_mapped_and_pickles_as_its_folder(reference):
    def mapped(a):  # the array's memory is a mapping of the file, not a copy
        while a is not None and not isinstance(a, mmap.mmap):
            a = getattr(a, "base", None) if not isinstance(a, np.memmap) else a._mmap
        return a is not None
    assert mapped(reference.ends) and mapped(reference.runs) and mapped(reference.slides)
    clone = pickle.loads(pickle.dumps(reference))
    assert len(pickle.dumps(reference)) < 4000  # workers get the folder name, not the arrays
    assert clone.path(3) == reference.path(3) and np.array_equal(clone.cells(0, 1), reference.cells(0, 1))


def test_trainer_builds_the_index_split_across_ranks(cohort, tmp_path, monkeypatch):
    """Two ranks (threads here, with a real barrier between them): each describes its share of the rows."""
    from pathfm.config import load_config

    cfg = load_config("smoke", [f"data.manifest={cohort / 'manifest.csv'}", "data.source=manifest",
                                f"data.cache_dir={tmp_path}", "data.tile_size=224", "data.mpps=[0.5,1.0,2.0]",
                                "data.index_workers=1", "data.index_timeout_s=0"])  # in-process: the patched describe_slide sees every row
    real_describe, by_rank = I.describe_slide, {}

    def describe(row, entry, *a):
        by_rank.setdefault(threading.current_thread().name, []).append(row)
        return real_describe(row, entry, *a)

    monkeypatch.setattr(I, "describe_slide", describe)
    barrier, results = threading.Barrier(2, timeout=60), {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, slide_index(cfg, rank=r, world_size=2, wait=barrier.wait)),
                                name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = len(entries_of(cohort))
    assert sorted(by_rank["rank0"]) == list(range(0, n, 2)) and sorted(by_rank["rank1"]) == list(range(1, n, 2))
    assert results[0].folder == results[1].folder and len(results[0]) == n - 1
    by_rank.clear()
    again = slide_index(cfg)  # a resume or requeue: opened, nothing described again
    assert again.folder == results[0].folder and by_rank == {}


def test_training_from_a_built_index(reference, cohort, tmp_path):
    from pathfm.config import load_config
    from pathfm.train import main

    overrides = [f"train.output_dir={tmp_path}", "train.name=run", "data.num_workers=0", "train.steps=2", "train.rankme_every=0",
                 "data.source=manifest", f"data.index={reference.folder}", "data.tile_size=224", "data.mpps=[0.5,1.0,2.0]"]
    result = main(load_config("smoke", overrides))
    assert result["status"] == "finished"
    rows = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss/total" in r][-1]
    assert last["data/usable_slides"] == len(reference) and last["data/unusable_slides"] == 1
    with pytest.raises(SlideError, match="tile_size: index 224 vs run 256"):
        main(load_config("smoke", [*overrides, "data.tile_size=256", "train.name=other"]))
    # the index of another manifest (here: the cohort less its last row) is refused by the trainer, before any step
    rows = (cohort / "manifest.csv").read_text().splitlines()
    (tmp_path / "fewer.csv").write_text("\n".join(rows[:-1]).replace("syn", f"{cohort}/syn") + "\n")
    with pytest.raises(SlideError, match=r"does not match this run: manifest: index built from .*\(\d+ rows\), the run's has other rows"):
        main(load_config("smoke", [*overrides, "data.manifest=" + str(tmp_path / "fewer.csv"), "train.name=third"]))
    assert not (tmp_path / "third" / "metrics.jsonl").exists()


def test_two_ranks_and_two_workers_resume_the_same_stream(reference):
    def stream(rank, start, n):
        ds = SlideTileDataset(reference, batch_size=4, tile_size=224, mpps=[0.5, 1.0, 2.0], mpp_weights=None, seed=0,
                              rank=rank, world_size=2, start_step=start, tiles_per_visit=2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        out = []
        for batch in loader:
            out.append((batch["step"], batch["locations"], batch["tiles"]))
            if len(out) == n:
                return out

    for rank in (0, 1):
        full, resumed = stream(rank, 0, 5), stream(rank, 3, 2)
        assert [s for s, _, _ in resumed] == [3, 4]
        for (s, loc, tiles), (s2, loc2, tiles2) in zip(full[3:], resumed):
            assert s == s2 and loc == loc2 and torch.equal(tiles, tiles2)
