"""Online patching: prepared slides, tissue-only positions, determinism, workers, ranks, bad input."""

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from pathfm.data import sampler as P
from pathfm.data.slides import SlideEntry, SlideError
from pathfm.data.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "slides"
MPPS = [0.25, 0.5, 1.0, 2.0]


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    for i in range(2):
        write_synthetic_slide(d / f"s{i}.svs", 2048, seed=i)
    return d


@pytest.fixture(scope="module")
def prepared(slide_dir):
    entries = [SlideEntry(str(slide_dir / f"s{i}.svs"), group=g) for i, g in enumerate("ab")]
    slides, skipped = P.prepare_slides(entries, cache_dir=slide_dir / "cache", tissue_threshold=0.4,
                                       tile_size=64, mpps=MPPS)
    assert skipped == []
    return slides


def dataset(slides, **kw):
    args = dict(batch_size=8, tile_size=64, mpps=MPPS, mpp_weights=None, tissue_threshold=0.4,
                seed=0, rank=0, world_size=1)
    return P.SlideTileDataset(slides, **{**args, **kw})


def test_valid_positions_hand_computed():
    mask = np.array([[1, 1, 0],
                     [1, 0, 0],
                     [0, 0, 0]], np.uint8)
    # 2x2 windows (top-left grid 2x2): tissue shares 3/4, 1/4, 1/4, 0
    idx, width = P.valid_positions(mask, 2, 0.5)
    assert width == 2 and idx.tolist() == [0]
    assert P.valid_positions(mask, 2, 0.25)[0].tolist() == [0, 1, 2]
    assert P.valid_positions(mask, 4, 0.0)[0].size == 0  # window larger than the mask


def test_prepare_drops_upsampling_mpp_and_keeps_level_plans(prepared):
    s = prepared[0]
    assert s.mpps == [0.5, 1.0, 2.0]  # 0.25 would upsample a 0.5 µm/px scan
    assert (s.plans[2.0].level, s.plans[2.0].region) == (1, 64)  # native 2 µm/px level
    assert s.tile_grid == [(256, 256), (256, 256)]


def test_tiles_are_tissue(prepared):
    ds = dataset(prepared, batch_size=32)
    batch = ds.batch(0)
    assert batch["tiles"].shape == (32, 3, 64, 64) and batch["tiles"].dtype == torch.uint8
    for index, mpp, x, y in batch["locations"]:
        s = prepared[index]
        mask = np.load(s.mask_path)
        k = P._window(s, mpp)
        c, r = int(x / s.mask_scale), int(y / s.mask_scale)
        # position drawn inside a valid cell: its footprint one cell away is still mostly tissue
        assert mask[r:r + k + 1, c:c + k + 1].mean() >= 0.2
    # and the pixels look like tissue (coloured), not glass
    rgb = batch["tiles"].permute(0, 2, 3, 1).reshape(-1, 3).int()
    assert ((rgb.max(1).values - rgb.min(1).values) > 20).float().mean() > 0.4


def test_stream_is_a_pure_function_of_seed_rank_step(prepared):
    a, b = dataset(prepared), dataset(prepared)
    assert torch.equal(a.batch(5)["tiles"], b.batch(5)["tiles"])
    assert not torch.equal(a.batch(5)["tiles"], a.batch(6)["tiles"])
    other_rank = dataset(prepared, rank=1, world_size=2)
    assert set(a.batch(5)["locations"]).isdisjoint(other_rank.batch(5)["locations"])
    resumed = iter(dataset(prepared, start_step=5))
    first = next(resumed)
    assert first["step"] == 5 and torch.equal(first["tiles"], b.batch(5)["tiles"])


def test_dataloader_workers_keep_step_order_and_content(prepared):
    ds = dataset(prepared, start_step=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 4:
            break
    assert [b["step"] for b in got] == [3, 4, 5, 6]
    reference = dataset(prepared)
    for b in got:
        assert torch.equal(b["tiles"], reference.batch(b["step"])["tiles"])


def test_transform_gets_a_step_seeded_generator(prepared):
    def transform(tiles, generator):
        return tiles.float() + torch.rand(1, generator=generator)
    a, b = dataset(prepared, transform=transform), dataset(prepared, transform=transform)
    assert torch.equal(a.batch(2)["tiles"], b.batch(2)["tiles"])


def test_magnification_mix_and_group_balance(prepared):
    three = prepared + [prepared[0]]  # groups a, b, a: by weight b gets 1/3, balanced 1/2
    rng = np.random.default_rng(0)
    ds = dataset(three)
    draws = [ds.draw(rng) for _ in range(3000)]
    mpps = Counter(d[1] for d in draws)
    assert set(mpps) == {0.5, 1.0, 2.0} and all(abs(n / 3000 - 1 / 3) < 0.04 for n in mpps.values())
    assert abs(sum(d[0] == 1 for d in draws) / 3000 - 1 / 3) < 0.04
    balanced = dataset(three, group_balance=True)
    assert abs(sum(balanced.draw(rng)[0] == 1 for _ in range(3000)) / 3000 - 1 / 2) < 0.04
    only_2 = dataset(three, mpp_weights=[0, 0, 0, 1])
    assert {only_2.draw(rng)[1] for _ in range(50)} == {2.0}


def test_grid_aligned_decodes_one_stored_tile(prepared, monkeypatch):
    ds = dataset(prepared, grid_aligned=True, reader="jpeg", mpps=[0.5, 2.0], batch_size=16)
    decoded = []
    real = P.JpegTiffReader.decode_tile
    monkeypatch.setattr(P.JpegTiffReader, "decode_tile",
                        lambda self, *a: decoded.append(a) or real(self, *a))
    ds.batch(0)
    assert len(decoded) == 16


def test_jpeg_and_openslide_readers_give_the_same_tiles(prepared):
    fast, slow = dataset(prepared, reader="jpeg", batch_size=24), dataset(prepared, reader="openslide", batch_size=24)
    a, b = fast.batch(1), slow.batch(1)
    assert a["locations"] == b["locations"]
    assert torch.equal(a["tiles"], b["tiles"])  # includes 1 µm/px tiles resized from level 0


def test_real_slides_sample_tissue_and_tcga_needs_mpp(tmp_path):
    if not REAL.exists():
        pytest.skip(f"real slides not found in {REAL}")
    cmu, tcga = str(REAL / "CMU-1-Small-Region.svs"), str(REAL / "TCGA-CR-7395-01A-01-TS1.svs")
    kw = dict(cache_dir=tmp_path, tissue_threshold=0.4, tile_size=224, mpps=MPPS)
    slides, skipped = P.prepare_slides([SlideEntry(cmu), SlideEntry(tcga)], **kw)
    assert [s.info.path for s in slides] == [cmu]
    assert skipped[0][0] == tcga and "add an 'mpp' column" in skipped[0][1]
    slides, skipped = P.prepare_slides([SlideEntry(cmu), SlideEntry(tcga, mpp=0.5)], **kw)
    assert len(slides) == 2 and skipped == []
    batch = dataset(slides, tile_size=224, batch_size=8).batch(0)
    assert {loc[0] for loc in batch["locations"]} == {0, 1}
    rgb = batch["tiles"].permute(0, 2, 3, 1).reshape(-1, 3).int()
    assert ((rgb.max(1).values - rgb.min(1).values) > 20).float().mean() > 0.4


def blank_slide(path, size):
    """An Aperio-style slide of bare glass: opens fine, has no tissue."""
    tile = np.full((size, size, 3), 240, np.uint8)
    tifffile.imwrite(path, tile, tile=(256, 256), compression="jpeg", photometric="rgb",
                     description="Aperio Image Library v12\n|MPP = 0.5", metadata=None)
    return path


def test_bad_slides_are_skipped_with_reasons(tmp_path, slide_dir):
    (tmp_path / "text.svs").write_text("no slide")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((slide_dir / "s0.svs").read_bytes()[:4000])
    entries = [SlideEntry(str(tmp_path / "missing.svs")), SlideEntry(str(tmp_path / "text.svs")),
               SlideEntry(str(truncated)), SlideEntry(str(blank_slide(tmp_path / "glass.svs", 1024))),
               SlideEntry(str(blank_slide(tmp_path / "tiny.svs", 256))), SlideEntry(str(slide_dir / "s1.svs"))]
    slides, skipped = P.prepare_slides(entries, cache_dir=tmp_path, tissue_threshold=0.4, tile_size=224, mpps=[1.0, 2.0])
    assert len(slides) == 1
    reasons = dict(skipped)
    assert "no such file" in reasons[str(tmp_path / "missing.svs")]
    assert "not a slide" in reasons[str(tmp_path / "text.svs")]
    assert str(truncated) in reasons
    assert "no tissue" in reasons[str(tmp_path / "glass.svs")]
    assert "smaller than a 224 px tile" in reasons[str(tmp_path / "tiny.svs")]
    with pytest.raises(SlideError, match="no usable slide among 5"):
        P.prepare_slides(entries[:5], cache_dir=tmp_path, tissue_threshold=0.4, tile_size=224, mpps=[1.0, 2.0])


@pytest.mark.parametrize("reader", ["jpeg", "openslide"])
def test_read_errors_are_skipped_counted_and_the_slide_dropped(tmp_path, slide_dir, reader):
    good, bad = tmp_path / "good.svs", tmp_path / "bad.svs"
    shutil.copy(slide_dir / "s0.svs", good)
    shutil.copy(slide_dir / "s1.svs", bad)
    slides, _ = P.prepare_slides([SlideEntry(str(good)), SlideEntry(str(bad))], cache_dir=tmp_path,
                                 tissue_threshold=0.4, tile_size=64, mpps=[0.5])
    # the file is damaged after preparation, as a flaky network disk would: every tile is garbage
    level = P.JpegTiffReader(str(bad), slides[1].info.dimensions).levels[0]
    with open(bad, "r+b") as f:
        for offset, count in zip(level.offsets, level.counts):
            f.seek(int(offset))
            f.write(b"\xff" * int(count))
    ds = dataset(slides, reader=reader, batch_size=16)
    batch = ds.batch(0)
    assert batch["tiles"].shape[0] == 16 and batch["skipped"] == P.FAILURES_TO_DROP
    assert {loc[0] for loc in batch["locations"]} == {0} and not ds.alive[1]
    assert ds.reader.handles.keys() == {str(good)}  # no broken handle left behind
