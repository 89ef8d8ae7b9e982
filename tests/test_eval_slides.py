"""The embedding contract, slide embeddings of a cohort (eval/embed_slides.py) and the slide-level probes."""

import csv
import re
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.extract import embed

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the embedding contract


def _timm_with_registers():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2,
                          reg_tokens=4, no_embed_class=True).eval()
    assert m.num_prefix_tokens == 5  # class token + 4 registers
    return m


def test_embedding_contract_matches_a_hand_computation_on_timm_with_registers():
    m = _timm_with_registers()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # by hand: patch tokens + their position embeddings, then [cls, 4 registers, patches], blocks, final norm
        patches = m.patch_embed(x) + m.pos_embed  # (3, 4, D): no_embed_class, so no position for cls / registers
        tokens = torch.cat([m.cls_token.expand(3, -1, -1), m.reg_token.expand(3, -1, -1), patches], 1)  # (3, 9, D)
        for blk in m.blocks:
            tokens = blk(tokens)
        tokens = m.norm(tokens)
        cls, patch_tokens = tokens[:, 0], tokens[:, 5:]  # (3, D), (3, 4, D)
        got = {how: embed(m, x, how) for how in ("cls", "mean", "cls_mean", "patches")}
    D = m.embed_dim
    assert got["patches"].shape == (3, 4, D)
    torch.testing.assert_close(got["cls"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["patches"], patch_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["mean"], patch_tokens.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["cls_mean"], torch.cat([cls, patch_tokens.mean(1)], 1), atol=1e-5, rtol=1e-5)


def test_embedding_contract_on_a_pathfm_model_equals_its_timm_export():
    """The same weights as a pathfm ViT and as timm's (export naming): every embedding kind agrees."""
    import timm

    from pathfm.vit import ViTArgs, build_vit

    torch.manual_seed(0)
    ours = build_vit(ViTArgs(arch="vit_tiny", img_size=32, num_registers=4)).eval()
    ours.blocks = ours.blocks[:2]
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2,
                               reg_tokens=4, no_embed_class=True, init_values=1e-5).eval()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "mask_token"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for how in ("cls", "mean", "cls_mean", "patches"):
            torch.testing.assert_close(embed(ours, x, how), embed(theirs, x, how), atol=1e-4, rtol=1e-4)
        assert embed(ours, x, "patches").shape == (2, 4, 192)


def test_unknown_embedding_is_one_line():
    with pytest.raises(ValueError, match="unknown embedding 'clss'; expected cls, mean, cls_mean, patches"):
        embed(_timm_with_registers(), torch.randn(1, 3, 32, 32), "clss")


# ---------------------------------------------------------------------------------------------
# slide embeddings


class MeanColour(torch.nn.Module):
    """A 'model' whose embedding is a tile's mean colour (normalised input): tells where a tile was read."""

    def forward(self, x):
        return x.mean((2, 3))  # (B, 3)


def _backbone(model=None):
    from eval.backbone import EvalBackbone

    return EvalBackbone(model or MeanColour(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "test:mean-colour", "mean-colour")


@pytest.fixture(scope="module")
def synthetic_index(tmp_path_factory):
    """Two synthetic slides (4096 px at 0.5 µm/px, levels 1 and 4) and their index at 0.5-2 µm/px, 32 px tiles."""
    from pathfm.data.index import IndexParams, build_index
    from pathfm.data.slides import read_manifest
    from pathfm.data.synthetic import ensure_synthetic_slides

    tmp = tmp_path_factory.mktemp("slides")
    paths = ensure_synthetic_slides(ROOT / ".cache" / "synthetic", n=2, size=4096, seed=0)
    manifest = tmp / "m.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in paths) + f"{tmp / 'gone.svs'}\n")
    index = build_index(read_manifest(manifest), tmp / "index", IndexParams(32, (0.5, 0.75, 1.0, 2.0), 0.4), workers=1,
                        progress=False, timeout_s=0)
    return index, manifest


def test_grid_is_non_overlapping_tissue_of_the_index(synthetic_index):
    from eval.embed_slides import grid_coords, tile_side_level0

    index, _ = synthetic_index
    for mpp in (0.5, 2.0):
        level, side = tile_side_level0(index, 0, mpp, 32)
        assert (level, side) == ((0, 32) if mpp == 0.5 else (1, 128))  # 2 µm/px: 32 px read at level 1 (4x)
        coords = grid_coords(index, 0, mpp, 32)
        assert len(coords) > 50
        assert (coords % side == 0).all()  # on the grid: touching, never overlapping
        assert len(np.unique(coords, axis=0)) == len(coords)
        view = index.slide(0)
        cells = {tuple(c) for c in index.cells(0, index.mpp_column(mpp)).tolist()}
        assert all((int(y // view.mask_scale), int(x // view.mask_scale)) in cells for x, y in coords.tolist())
        few = grid_coords(index, 0, mpp, 32, max_tiles=10, seed=1)
        assert len(few) == 10 and {tuple(c) for c in few.tolist()} <= {tuple(c) for c in coords.tolist()}


def test_batch_read_equals_the_training_reader_tile_by_tile(synthetic_index):
    """read_batch decodes each stored JPEG tile once per batch; its pixels are TileReader.read's, exactly, at a
    level's own mpp, a scaled decode (1 µm/px: half-size IDCT) and a resize (0.75 µm/px: 48 px -> 32 px)."""
    from eval.embed_slides import grid_coords, read_batch
    from pathfm.data.jpegtiles import JpegTiffReader
    from pathfm.data.sampler import TileReader

    index, _ = synthetic_index
    reader = TileReader("auto")
    view = index.slide(1)
    assert isinstance(reader.handle(view), JpegTiffReader)
    for mpp in (0.5, 0.75, 1.0, 2.0):
        coords = grid_coords(index, 1, mpp, 32)[:40]
        batch = read_batch(reader, view, mpp, coords, 32)
        one_by_one = np.stack([reader.read(view, mpp, x, y, 32) for x, y in coords.tolist()])
        np.testing.assert_array_equal(batch, one_by_one)


def test_embed_slides_files_coords_resume_and_failures(synthetic_index, tmp_path):
    """Every slide gets a complete file whose coords point at the tiles embedded (read back with OpenSlide at
    level 0 coordinates); the missing slide is listed; a rerun writes nothing; a deleted file is redone."""
    import openslide

    from eval.embed_slides import embed_slides, read_slide

    index, _ = synthetic_index
    out = tmp_path / "features"
    r = embed_slides(_backbone(), index, out, mpp=2.0, tile_size=32, max_tiles=12, batch_size=5, num_workers=2,
                     progress=False)
    assert r["written"] == 2 and [f[0] for f in r["failed"]] == ["gone"]
    assert list(csv.DictReader(open(out / "failed.csv")))[0]["slide"] == "gone"
    for i in range(2):
        name = Path(index.path(i)).stem
        f = read_slide(out / f"{name}.h5")
        assert f["features"].shape == (12, 3) and f["features"].dtype == np.float32
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (12, 2)
        assert f["coord_attrs"]["patch_size_level0"] == 128 and f["coord_attrs"]["patch_level"] == 1
        assert f["attrs"]["mpp"] == 2.0 and f["attrs"]["tile_size"] == 32 and f["attrs"]["embedding"] == "cls"
        slide = openslide.OpenSlide(index.path(i))
        for (x, y), feature in zip(f["coords"].tolist(), f["features"]):
            # the tile at these level-0 coordinates, read independently: 128 level-0 px = 32 px of level 1
            tile = np.asarray(slide.read_region((x, y), 1, (32, 32)).convert("RGB"), np.float32)
            np.testing.assert_allclose(tile.mean((0, 1)) / 255, feature, atol=0.02)
    assert not list(out.glob(".*tmp"))
    again = embed_slides(_backbone(), index, out, mpp=2.0, tile_size=32, max_tiles=12, num_workers=0, progress=False)
    assert again["written"] == 0 and again["skipped"] == 2
    threads = tmp_path / "threads"  # read on 3 threads of this process instead of 2 DataLoader workers: the same files
    embed_slides(_backbone(), index, threads, mpp=2.0, tile_size=32, max_tiles=12, batch_size=5, read_threads=3,
                 progress=False)
    for i in range(2):
        name = f"{Path(index.path(i)).stem}.h5"
        a, b = read_slide(out / name), read_slide(threads / name)
        np.testing.assert_array_equal(a["coords"], b["coords"])
        np.testing.assert_array_equal(a["features"], b["features"])
    (out / f"{Path(index.path(1)).stem}.h5").unlink()
    redo = embed_slides(_backbone(), index, out, mpp=2.0, tile_size=32, max_tiles=12, num_workers=0, progress=False)
    assert redo["written"] == 1 and redo["skipped"] == 1


def test_a_failed_read_is_listed_and_the_run_goes_on(synthetic_index, tmp_path):
    from eval.embed_slides import embed_slides

    index, _ = synthetic_index

    from pathfm.data.jpegtiles import JpegTiffReader

    real = JpegTiffReader.decode_tile
    bad = index.path(0)

    def decode_tile(self, *a, **k):
        if self.path == bad:
            raise OSError("simulated I/O error")
        return real(self, *a, **k)

    JpegTiffReader.decode_tile = decode_tile
    try:
        r = embed_slides(_backbone(), index, tmp_path, mpp=2.0, tile_size=32, max_tiles=4, num_workers=0,
                         progress=False)
    finally:
        JpegTiffReader.decode_tile = real
    assert r["written"] == 1
    reasons = {name: why for name, _, why in r["failed"]}
    assert "simulated I/O error" in reasons[Path(bad).stem]
    assert not (tmp_path / f"{Path(bad).stem}.h5").exists()


def test_embed_slides_command_line_shares_and_refusals(synthetic_index, tmp_path):
    """Two array shares write disjoint slides; other settings into the same folder are refused in one line."""
    from eval.embed_slides import main

    index, _ = synthetic_index
    base = ["--timm", "test_vit", "--index", str(index.folder), "--mpp", "2.0", "--tile-size", "32",
            "--max-tiles", "3", "--num-workers", "0", "--out", str(tmp_path)]
    from launch.eval import EmbedTask, embed_main, task_argv

    slurm = ["--tasks", "2", "--profile=gpu-8x", "--wait", "--time", "10"]
    assert task_argv([*base, *slurm]) == base  # what each array task runs
    # the array tasks as SLURM runs them (submitit calls EmbedTask(argv, n)(k)): disjoint slides
    assert [EmbedTask(base, 2)(k)["written"] for k in (0, 1)] == [1, 1]
    assert sorted(p.stem for p in tmp_path.glob("*.h5")) == sorted(Path(index.path(i)).stem for i in range(2))
    assert json.loads((tmp_path / "embed.json").read_text())["mpp"] == 2.0
    with pytest.raises(SystemExit, match=r"^error: --mpp 0.25 is not among the mpps \[0.5, 0.75, 1.0, 2.0\] of"):
        main([*base, "--mpp", "0.25"])
    with pytest.raises(SystemExit, match=r"^error: no built slide index at .*; build it first"):
        embed_main([*base[:2], "--index", str(tmp_path / "none"), *base[4:], *slurm])
    with pytest.raises(SystemExit, match=r"made with other settings \(embedding: \['cls'\] vs \['cls_mean'\]\)"):
        main([*base, "--embedding", "cls_mean"])


def test_slide_task_start_to_end_on_a_budget(synthetic_index, tmp_path):
    """probe_backbone (what a probe during training runs): labelled slides matched by name, at most max_slides of
    them embedded (max_tiles each), then each protocol's results.json."""
    from eval.slide_probe import probe_backbone

    index, _ = synthetic_index
    names = [Path(index.path(i)).stem for i in range(2)]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,split\n" + f"{index.path(0)},a,train\n{names[1]},b,train\n{names[0]},a,test\n"
                      "not-in-the-index,b,test\n")
    r = probe_backbone(_backbone(), labels, index.folder, tmp_path / "task", mpp=2.0, tile_size=32, max_slides=2,
                       max_tiles=5, protocols=("meanpool",), seeds=1, epochs=1)
    assert list(r) == ["meanpool"] and r["meanpool"]["level"] == "slide"
    assert sorted(p.stem for p in (tmp_path / "task" / "features").glob("*.h5")) == sorted(names)
    assert all(len(read_h5(p)) == 5 for p in (tmp_path / "task" / "features").glob("*.h5"))


def read_h5(path):
    from eval.embed_slides import read_slide

    return read_slide(path)["features"]


def test_probes_during_training_run_slide_and_dense_tasks_beside_tile_tasks(synthetic_index, tmp_path):
    """eval/watch.py on a run folder with one snapshot: a slide task (labels + index) and a segmentation task get rows,
    results.json, TensorBoard scalars and best.json entries like tile tasks; the budget bounds the slides embedded."""
    import yaml

    from bench.planted import write_seg_fixture
    from eval.watch import main as watch
    from pathfm.vit import ViTArgs, build_vit
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    index, _ = synthetic_index
    run = tmp_path / "run"
    (run / "eval" / "snapshots").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"probes": {"slide_mpp": 2.0}, "train": {"steps": 2}}))
    torch.manual_seed(0)
    vit = build_vit(ViTArgs(arch="vit_tiny", img_size=32))
    torch.save({"vit_args": vars(vit.args), "state_dict": vit.state_dict(), "step": 2, "mean": [0.5] * 3,
                "std": [0.5] * 3, "source": str(run / "checkpoints" / "step_0000002")},
               run / "eval" / "snapshots" / "step_0000002.pt")
    names = [Path(index.path(i)).stem for i in range(2)]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"slide,label,split\n{names[0]},a,train\n{names[1]},b,train\n{names[0]},a,test\n"
                      f"{names[1]},b,test\n")
    from bench.planted import source_images

    sources = source_images(SHARED_DATA / "tiles" / "nct_crc_he_100k_sample9")
    for split in ("train", "test"):
        write_seg_fixture(tmp_path / "seg", 4, split, size=32, patch=16, sources=sources)
    tasks = [f"slides@meanpool+abmil={labels},{index.folder}", f"glands@seg={tmp_path / 'seg' / 'train'},{tmp_path / 'seg' / 'test'}"]
    assert watch([str(run), "--once", "--poll", "0.05", "--img-size", "32", "--max-tiles", "3",
                  *[a for t in tasks for a in ("--task", t)]]) == 0
    rows = [json.loads(line) for line in (run / "eval" / "probes.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["protocol"], r["status"], r.get("metric")) for r in rows) == [
        ("glands", "seg", "ok", "test/mean_dice"), ("slides", "abmil", "ok", "test/balanced_accuracy"),
        ("slides", "meanpool", "ok", "test/balanced_accuracy")], rows
    best = json.loads((run / "eval" / "best.json").read_text())
    assert best["glands"]["seg"]["step"] == 2 and best["slides"]["abmil"]["step"] == 2
    r = json.loads((run / "eval" / "step_0000002" / "slides" / "abmil" / "results.json").read_text())
    assert r["level"] == "slide" and r["counts"]["slides"] == 4
    assert not (run / "eval" / "step_0000002" / "slides" / "features").exists()  # per-slide files deleted
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"probe/glands/seg/mean_dice", "probe/slides/abmil/auroc"} <= set(acc.Tags()["scalars"])


@pytest.mark.parametrize("spec, says", [
    ("s@abmil=/nope/labels.csv,/nope/index", "probe task 's': labels file '/nope/labels.csv' does not exist"),
    ("s@abmil={labels},/nope/index", "probe task 's': '/nope/index' is neither a slide index folder"),
    ("g@seg=/nope/train,/nope/test", "probe task 'g': /nope/train: expected images/ and masks/"),
])
def test_slide_and_dense_task_specs_are_checked_before_a_run(spec, says, tmp_path):
    from eval.datasets import DatasetError
    from eval.watch import check_tasks
    from pathfm.config import parse_probe_task

    labels = tmp_path / "l.csv"
    labels.write_text("slide,label\na,x\n")
    with pytest.raises(DatasetError, match="^" + re.escape(says)):
        check_tasks([parse_probe_task(spec.format(labels=labels))])


def test_a_killed_run_loses_only_the_slide_in_flight(synthetic_index, tmp_path):
    """The run dies (here: an exception out of the model, as a kill would stop it) while the second slide is being
    embedded: the first slide's file is complete, the second has none under its name, and the rerun embeds only the
    second."""
    from eval.embed_slides import embed_slides, read_slide

    index, _ = synthetic_index

    class DiesOnThirdBatch(MeanColour):
        calls = 0

        def forward(self, x):
            DiesOnThirdBatch.calls += 1
            if DiesOnThirdBatch.calls == 3:  # the second slide's first batch (2 batches a slide)
                raise KeyboardInterrupt
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        embed_slides(_backbone(DiesOnThirdBatch()), index, tmp_path, mpp=2.0, tile_size=32, max_tiles=4, batch_size=2,
                     num_workers=0, progress=False)
    first, second = (Path(index.path(i)).stem for i in range(2))
    assert read_slide(tmp_path / f"{first}.h5")["features"].shape == (4, 3)
    assert not (tmp_path / f"{second}.h5").exists()
    r = embed_slides(_backbone(), index, tmp_path, mpp=2.0, tile_size=32, max_tiles=4, num_workers=0, progress=False)
    assert (r["written"], r["skipped"]) == (1, 1)
