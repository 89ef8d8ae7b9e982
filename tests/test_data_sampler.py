"""Online patching from a slide index: tissue-only positions, determinism, visits, workers, ranks,
realised frequencies, bad slides and read failures shared between workers."""

import math
import os
import shutil
import threading
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import tifffile
import torch

from pathfm.data import sampler as P
from pathfm.data.failures import summarise
from pathfm.data.index import IndexParams, build_index, integral_image, mask_window, valid_runs
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


def build(entries, folder, tile_size=64, mpps=MPPS, threshold=0.4):
    return build_index(entries, folder, IndexParams(tile_size, tuple(mpps), threshold), workers=1, progress=False)


@pytest.fixture(scope="module")
def prepared(slide_dir):
    entries = [SlideEntry(str(slide_dir / f"s{i}.svs"), group=g) for i, g in enumerate("ab")]
    index = build(entries, slide_dir / "index")
    assert index.meta["unusable"] == 0
    return index


def dataset(index, **kw):
    args = dict(batch_size=8, tile_size=64, mpps=MPPS, mpp_weights=None, seed=0, rank=0, world_size=1)
    return P.SlideTileDataset(index, **{**args, **kw})


def mask_of(index, i):
    stem = Path(index.path(i)).stem
    return np.load(next((index.folder / "masks" / "tissue").glob(f"{stem}-*.npy")))


def brute_force_valid(mask, window, threshold):
    """The reference: every top-left cell whose window x window footprint is >= threshold tissue."""
    h, w = mask.shape
    return {(r, c) for r in range(h - window + 1) for c in range(w - window + 1)
            if mask[r:r + window, c:c + window].mean() >= threshold}


def test_valid_runs_hand_computed():
    mask = np.array([[1, 1, 0],
                     [1, 0, 0],
                     [0, 0, 0]], np.uint8)
    # 2x2 windows (top-left grid 2x2): tissue shares 3/4, 1/4, 1/4, 0
    integral = integral_image(mask)
    assert integral[3, 3] == 3 and integral[1, 2] == 2  # tissue in mask[:3, :3] and in mask[:1, :2]
    rows, cols, lengths = valid_runs(integral, 2, 0.5)
    assert (rows.tolist(), cols.tolist(), lengths.tolist()) == ([0], [0], [1])
    rows, cols, lengths = valid_runs(integral, 2, 0.25)  # cells (0,0), (0,1) | (1,0): runs of 2 and 1
    assert (rows.tolist(), cols.tolist(), lengths.tolist()) == ([0, 1], [0, 0], [2, 1])
    assert valid_runs(integral, 4, 0.0)[0].size == 0  # window larger than the mask


def test_index_holds_exactly_the_valid_positions(prepared):
    for i in range(len(prepared)):
        s, mask = prepared.slide(i), mask_of(prepared, i)
        for j, mpp in enumerate(MPPS):
            cells = {tuple(c) for c in prepared.cells(i, j).tolist()}
            if mpp not in s.plans:  # 0.25 µm/px would upsample a 0.5 µm/px scan
                assert not cells
                continue
            assert cells == brute_force_valid(mask, mask_window(s.plans[mpp].footprint, s.mask_scale), 0.4)
            rng = np.random.default_rng(j)
            drawn = Counter(prepared.cell(i, j, rng) for _ in range(4000))
            assert set(drawn) <= cells
            # uniform over the valid cells: no cell drawn far more often than 1/n predicts
            assert max(drawn.values()) < 4000 / len(cells) * 4 + 10


def test_index_keeps_levels_plans_and_stored_tiles(prepared):
    s = prepared.slide(0)
    assert s.mpps == [0.5, 1.0, 2.0]
    assert (s.plans[2.0].level, s.plans[2.0].region) == (1, 64)  # native 2 µm/px level
    assert s.tile_grid == [(256, 256), (256, 256)]


def test_tiles_are_tissue(prepared):
    batch = dataset(prepared, batch_size=32).batch(0)
    assert batch["tiles"].shape == (32, 3, 64, 64) and batch["tiles"].dtype == torch.uint8
    for index, mpp, x, y in batch["locations"]:
        s, mask = prepared.slide(index), mask_of(prepared, index)
        k = mask_window(s.plans[mpp].footprint, s.mask_scale)
        c, r = int(x / s.mask_scale), int(y / s.mask_scale)
        # position drawn inside a valid cell: its footprint one cell away is still mostly tissue
        assert mask[r:r + k + 1, c:c + k + 1].mean() >= 0.2
    rgb = batch["tiles"].permute(0, 2, 3, 1).reshape(-1, 3).int()  # and the pixels are coloured, not glass
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


def test_a_batch_is_made_of_visits(prepared):
    batch = dataset(prepared, batch_size=32, tiles_per_visit=8).batch(0)
    per_slide = Counter(loc[0] for loc in batch["locations"])
    assert all(n % 8 == 0 for n in per_slide.values())  # 4 visits of 8 tiles, shuffled together
    assert len({loc[1] for loc in batch["locations"]}) > 1  # each tile of a visit has its own magnification


def test_transform_gets_a_step_seeded_generator(prepared):
    def transform(tiles, generator):
        return tiles.float() + torch.rand(1, generator=generator)
    a, b = dataset(prepared, transform=transform), dataset(prepared, transform=transform)
    assert torch.equal(a.batch(2)["tiles"], b.batch(2)["tiles"])


def test_realised_frequencies_follow_weights_groups_and_mix(slide_dir, tmp_path, monkeypatch):
    blank = np.zeros((64, 64, 3), np.uint8)
    monkeypatch.setattr(P.TileReader, "read", lambda *a: blank)  # the draws are under test here, not the decoding
    # slides a (weight 1), b (weight 1), a copy of a in group a with weight 2: by weight 1/4, 1/4, 1/2
    shutil.copy(slide_dir / "s0.svs", tmp_path / "c.svs")
    entries = [SlideEntry(str(slide_dir / "s0.svs"), group="a"), SlideEntry(str(slide_dir / "s1.svs"), group="b"),
               SlideEntry(str(tmp_path / "c.svs"), weight=2.0, group="a")]
    index = build(entries, tmp_path / "index")
    def tiles_of(**kw):  # 100 steps of 64 tiles in 3,200 visits of 2
        return [loc for step in range(100) for loc in dataset(index, batch_size=64, tiles_per_visit=2, **kw).batch(step)["locations"]]
    tiles = tiles_of()
    n = len(tiles)
    slides, mpps = Counter(t[0] for t in tiles), Counter(t[1] for t in tiles)
    for i, share in enumerate([0.25, 0.25, 0.5]):
        assert abs(slides[i] / n - share) < 0.03, (slides, n)  # 4 standard deviations
    assert set(mpps) == {0.5, 1.0, 2.0} and all(abs(c / n - 1 / 3) < 0.03 for c in mpps.values())
    # balanced groups: b gets 1/2, the a slides split the other half 1:2
    tiles = tiles_of(group_balance=True)
    slides = Counter(t[0] for t in tiles)
    for i, share in enumerate([1 / 6, 1 / 2, 1 / 3]):
        assert abs(slides[i] / len(tiles) - share) < 0.03
    weighted = Counter(t[1] for t in tiles_of(mpp_weights=[0, 1, 0, 3]))
    assert set(weighted) == {0.5, 2.0} and abs(weighted[2.0] / sum(weighted.values()) - 0.75) < 0.03
    only = dataset(index, mpps=[2.0])  # a subset of the index's mpps
    assert {loc[1] for loc in only.batch(0)["locations"]} == {2.0}


def test_index_refuses_other_parameters(prepared):
    with pytest.raises(SlideError, match="tile_size: index 64 vs run 224"):
        prepared.check(IndexParams(224, tuple(MPPS), 0.4))
    with pytest.raises(SlideError, match="tissue_threshold: index 0.4 vs run 0.5"):
        prepared.check(IndexParams(64, tuple(MPPS), 0.5))
    with pytest.raises(SlideError, match=r"mpps \[4.0\] of the run are not in the index"):
        prepared.check(IndexParams(64, (0.5, 4.0), 0.4))
    with pytest.raises(SlideError, match="manifest: index built from"):
        prepared.check(IndexParams(64, tuple(MPPS), 0.4), manifest_id="another")
    prepared.check(IndexParams(64, (0.5, 2.0), 0.4))  # a subset of the mpps is fine
    with pytest.raises(SlideError, match="tile_size 224 but the index"):
        dataset(prepared, tile_size=224)


def test_grid_aligned_decodes_one_stored_tile_and_never_leaves_the_tissue(prepared, monkeypatch):
    """The default: a tile inside one stored tile (one decode), unless that snap moved its top-left to a mask cell
    the index does not allow (below the tissue threshold): then the drawn position, several decodes."""
    ds = dataset(prepared, reader="jpeg", mpps=[0.5, 2.0], batch_size=64)
    assert ds.grid_aligned  # the default
    decoded = []
    real = P.JpegTiffReader.decode_tile
    monkeypatch.setattr(P.JpegTiffReader, "decode_tile", lambda self, *a: decoded.append(a) or real(self, *a))
    locations = ds.batch(0)["locations"]
    fallbacks = 0
    for i, mpp, x, y in locations:
        slide, j = prepared.slide(i), prepared.mpp_column(mpp)
        assert prepared.valid(i, j, int(y // slide.mask_scale), int(x // slide.mask_scale))  # on the tissue
        plan, (tw, th) = slide.plans[mpp], slide.tile_grid[slide.plans[mpp].level]
        lx, ly = x / plan.downsample, y / plan.downsample
        if lx // tw != (lx + plan.region - 1) // tw or ly // th != (ly + plan.region - 1) // th:  # more than one
            fallbacks += 1  # stored tile: the drawn position, kept because the snap (here: of the same start) was off
            sx, sy = (v * plan.downsample for v in ds._place(slide, plan, lx, ly, True))
            assert not prepared.valid(i, j, int(sy // slide.mask_scale), int(sx // slide.mask_scale))
    assert 0 < fallbacks < len(locations) // 4  # this test's small slides have tissue edges everywhere
    assert len(decoded) < len(locations) + 4 * fallbacks


def test_index_valid_agrees_with_the_cells(prepared):
    for i in range(len(prepared)):
        for j in range(len(prepared.params.mpps)):
            cells = prepared.cells(i, j)
            if not len(cells):
                continue
            valid = np.zeros(cells.max(0) + 2, bool)
            valid[cells[:, 0], cells[:, 1]] = True
            got = np.array([[prepared.valid(i, j, r, c) for c in range(valid.shape[1])] for r in range(valid.shape[0])])
            assert np.array_equal(got, valid)


def test_grid_aligned_starts_spread_evenly_over_the_offsets_that_keep_one_stored_tile():
    """224 px in 256 px stored tiles: 256 consecutive drawn starts map onto stored tile 2's 33 offsets 0..32, each
    7 or 8 times (256 / 33), never leaving it; 448 px (a 1 µm/px tile read at 0.5): 65 offsets in two tiles a side.
    The moves are centred on the drawn start: mean 0, at most half the largest move (111 px; 95 at 448 px) either
    way (mapping the start itself moved tiles 111 px up-left on average, off the tissue's top and left edges)."""
    for region, tiles, offsets, half in ((224, 1, 33, 111), (448, 2, 65, 95)):
        starts = [P._snap(s, 256, region, 10**6) for s in range(512 - half, 768 - half)]
        assert all(512 <= a and a + region <= 512 + tiles * 256 for a in starts)
        counts = Counter(a - 512 for a in starts)
        assert sorted(counts) == list(range(offsets)) and set(counts.values()) <= {256 // offsets, 256 // offsets + 1}
        moves = np.array([P._snap(s, 256, region, 10**6) - s for s in range(1000, 1000 + 256 * 8)])
        assert abs(moves.mean()) < 1 and np.abs(moves).max() <= half + 1
    assert P._snap(39_950, 256, 224, 40_000) == 40_000 - 224  # the last stored tile is cut by the level's edge


def test_mix_path_pixels_at_each_magnification(prepared):
    """A magnification a level serves is that level's pixels, as OpenSlide reads them; one 2^k coarser than a
    level (1 µm/px from 0.5 µm/px here) is libjpeg-turbo's 1/2^k scaled decode of the stored tiles, cut at
    the region with no resize, within about a grey level of OpenSlide's pixels resized (PSNR >= 30 dB)."""
    fast, slow = dataset(prepared, reader="jpeg", batch_size=24), dataset(prepared, reader="openslide", batch_size=24)
    a, b = fast.batch(1), slow.batch(1)
    assert a["locations"] == b["locations"] and {loc[1] for loc in a["locations"]} == {0.5, 1.0, 2.0}
    scaled = 0
    for got, resized, (i, mpp, x, y) in zip(a["tiles"], b["tiles"], a["locations"]):
        slide = prepared.slide(i)
        level, lx, ly, r, scale = P.TileReader.region(slide, mpp, x, y, 64)
        assert scale == (2 if mpp == 1.0 else 1)
        if scale == 1:
            assert torch.equal(got, resized)
            continue
        scaled += 1
        reader = P.JpegTiffReader(slide.info.path, slide.info.dimensions)
        t = slide.tile_grid[level][0]  # the stored tiles each decoded at 1/2, pasted, cut at the region
        cols, rows = range(lx // t, (lx + r - 1) // t + 1), range(ly // t, (ly + r - 1) // t + 1)
        mosaic = np.concatenate([np.concatenate([simplejpeg.decode_jpeg(reader.tile_bytes(level, c, row), min_width=t // 2,
                                 min_height=t // 2) for c in cols], 1) for row in rows], 0)
        ox, oy = (lx - cols[0] * t) // 2, (ly - rows[0] * t) // 2
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(mosaic[oy:oy + 64, ox:ox + 64]))
        mse = (got.double() - resized.double()).pow(2).mean()
        assert 10 * torch.log10(255**2 / mse) >= 30
    assert scaled >= 4


@pytest.mark.parametrize("hsv_filter", [False, True])
def test_reads_in_flight_keep_the_stream_bit_for_bit(prepared, hsv_filter, monkeypatch):
    """Reads ahead of the decode, any number in flight: the same tiles, locations and resumed stream."""
    monkeypatch.setattr(P, "SLOW_READ_S", 0.0)  # read ahead even from the page cache
    redone = []
    real_redo = P._Draws.redo
    monkeypatch.setattr(P._Draws, "redo", lambda self, d, same_visit: redone.append(same_visit) or real_redo(self, d, same_visit))
    reference = dataset(prepared, batch_size=16, hsv_filter=hsv_filter)
    expected = [reference.batch(step) for step in range(4)]
    for nbytes in (1, 20_000, 1 << 24):  # one tile at a time, a few, all of the next step's too
        ds = dataset(prepared, batch_size=16, hsv_filter=hsv_filter, read_ahead_bytes=nbytes, read_threads=4)
        it = iter(ds)
        for want in expected[:3]:
            got = next(it)
            assert got["locations"] == want["locations"] and torch.equal(got["tiles"], want["tiles"])
        resumed = dataset(prepared, batch_size=16, hsv_filter=hsv_filter, read_ahead_bytes=nbytes, start_step=3)
        got = next(iter(resumed))
        assert got["step"] == 3 and torch.equal(got["tiles"], expected[3]["tiles"])
        for d in (ds, resumed):
            d.reader.ahead.close()
    assert (True in redone) == hsv_filter  # the filter's redraws were exercised


def test_a_row_of_stored_tiles_is_one_read_split_into_the_tiles_streams(prepared, tmp_path, monkeypatch):
    """A region's stored tiles that lie back to back in the file (a row of them) are read with one os.pread and
    split into exactly the streams that reading each tile alone gives; a run cut short names its first short tile."""
    reader = P.JpegTiffReader(prepared.path(0), prepared.slide(0).info.dimensions)
    lv = reader.levels[0]
    region = (lv.tile_w // 2, lv.tile_h // 2, lv.tile_w, lv.tile_h)  # over 2 x 2 stored tiles
    runs = reader.tile_runs(0, *region)
    assert [[(c, r) for c, r, _ in tiles] for _, _, tiles in runs] == [[(0, 0), (1, 0)], [(0, 1), (1, 1)]]
    preads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda *a: preads.append(a) or real(*a))
    streams = reader.read_runs(0, runs)
    assert len(preads) == 2  # one a row
    monkeypatch.undo()
    assert streams == {k: reader.tile_bytes(0, *k) for k in reader.stored_tiles(0, *region)}
    ahead, nbytes = P.ReadAhead(1 << 20, 4), sum(size for _, size, _ in runs)
    tasks = ahead.submit(reader, 0, runs, nbytes)
    assert len(tasks) == 2 and ahead.wait(tasks) == streams  # read ahead: a task a read, their streams merged
    ahead.release(tasks, nbytes)
    assert ahead.held == 0 and not ahead.pending and ahead.reads == 0
    ahead.close()
    (offset, size, ((_, _, first), _)), _ = runs  # the first row: cut the file in its second tile
    short = tmp_path / "short.svs"
    short.write_bytes(Path(prepared.path(0)).read_bytes()[:offset + first + 10])
    os.close(reader._fd)
    reader._fd = os.open(short, os.O_RDONLY)
    with pytest.raises(OSError, match=r"level 0 tile \(1, 0\) is truncated"):
        reader.read_runs(0, runs)
    reader.close()


def test_reads_in_flight_stay_within_their_memory_bound(prepared, monkeypatch):
    monkeypatch.setattr(P, "SLOW_READ_S", 0.0)
    bound = 100_000  # bytes: a few draws' stored tiles (up to 4 of at most 18 KB each on these slides)
    ds = dataset(prepared, batch_size=16, read_ahead_bytes=bound, read_threads=8)
    it = iter(ds)
    for _ in range(3):
        next(it)
    ahead = ds.reader.ahead
    readers = [P.JpegTiffReader(prepared.path(i), prepared.slide(i).info.dimensions) for i in range(len(prepared))]
    largest = max(int(c) for reader in readers for lv in reader.levels for c in lv.counts)
    assert 2 * largest < ahead.peak <= bound  # several reads in flight at once, never more than the bound
    assert 0 < ahead.held <= bound  # the next step's reads, started while this one was made
    ahead.close()


class StorageClock:
    """time.perf_counter as pathfm.data.sampler reads it, one clock per thread that moves only when a stand-in
    read says what the storage took: the read-ahead's decisions (latency, the decode's own time per read) are
    then exact, whatever the machine's load (no test decides by the wall clock)."""

    def __init__(self, monkeypatch):
        self.local = threading.local()
        monkeypatch.setattr(P, "time", types.SimpleNamespace(perf_counter=self.now))

    def now(self) -> float:
        return getattr(self.local, "t", 0.0)

    def reads_take(self, monkeypatch, seconds: float) -> None:
        """Each draw's reads (read ahead, or timed in turn) take `seconds`."""
        real = P.JpegTiffReader.read_runs

        def read_runs(*a):
            self.local.t = self.now() + seconds
            return real(*a)

        monkeypatch.setattr(P.JpegTiffReader, "read_runs", read_runs)


def test_reads_go_ahead_only_while_they_are_slow(prepared, monkeypatch):
    """Page-cache reads (50 µs) are read in turn (a thread would cost more than it hides); slow reads (20 ms)
    turn reading ahead on within a batch, and the stream stays the same."""
    monkeypatch.setattr(P, "TIMED_EVERY", 1)
    clock = StorageClock(monkeypatch)
    clock.reads_take(monkeypatch, 50e-6)
    ds = dataset(prepared, batch_size=16, read_ahead_bytes=1 << 24)
    fast = ds.batch(0)
    assert not ds.reader.ahead.active and not ds.reader.ahead.readers.threads
    monkeypatch.undo()  # the real tile_bytes and clock again, then the slow storage
    monkeypatch.setattr(P, "TIMED_EVERY", 1)
    clock = StorageClock(monkeypatch)
    clock.reads_take(monkeypatch, 0.02)
    slow = ds.batch(0)
    assert ds.reader.ahead.active and ds.reader.ahead.readers.threads
    assert torch.equal(fast["tiles"], slow["tiles"])
    ds.reader.ahead.close()


def test_reads_in_flight_follow_latency_times_decode_rate():
    """Little's law: a draw's reads (read at once) must start latency / (decode time a draw) draws before the decode
    needs them."""
    ahead = P.ReadAhead(1 << 24, 128)
    ahead.log_latency, ahead.busy = math.log(5e-3), 2e-4  # 5 ms a read, the decode takes a draw every 200 µs
    assert ahead.depth == 42  # 1.5 x 25 + 4, rounded up
    ahead.log_latency = math.log(20e-3)
    assert ahead.depth == 128  # 154 wanted: the cap
    ahead.busy = 1e-3  # a decode 5x slower needs 5x fewer
    assert ahead.depth == 34
    ahead.busy, ahead.waited = 2e-4, 0.010
    ahead.consumed(0.011)  # a draw in 11 ms, of which 10 ms waiting for its reads: 1 ms of decode
    assert ahead.busy == pytest.approx(2e-4 + 0.05 * (1e-3 - 2e-4)) and ahead.waited == 0  # a moving average
    # slides opened ahead: an open's latency x the rate visits are decoded (8 draws each), with the margin, plus 1
    ahead.log_open, ahead.busy = math.log(0.075), 2e-3  # 15 reads of 5 ms; a visit every 16 ms
    assert ahead.opens(8) == 9  # 1.5 x 75 / 16 + 1 = 8.03, rounded up
    ahead.busy = 3e-4
    assert ahead.opens(8) == P.MAX_OPENS_AHEAD == 32  # 48 wanted: half the open-file LRU
    ahead.log_open = math.log(1e-3)
    assert ahead.opens(8) == P.OPENS_AHEAD == 4  # fast opens: the floor


def test_slow_reads_keep_more_in_flight_than_a_fixed_count(prepared, monkeypatch):
    """At 30 ms a read more reads go ahead than the old fixed 16 (the next steps' too), up to the cap, and the
    stream is the same as reading in turn. (The decode's own time is nothing on this clock, so the cap is wanted.)"""
    monkeypatch.setattr(P, "TIMED_EVERY", 1)
    reference = [dataset(prepared, batch_size=16).batch(s) for s in range(3)]
    StorageClock(monkeypatch).reads_take(monkeypatch, 0.03)
    ds = dataset(prepared, batch_size=16, read_ahead_bytes=1 << 24, read_threads=40)
    it = iter(ds)
    for want in reference:
        got = next(it)
        assert got["locations"] == want["locations"] and torch.equal(got["tiles"], want["tiles"])
    assert 30 <= ds.reader.ahead.most_pending <= 40 and len(ds.reader.ahead.readers.threads) <= 40  # draws in flight
    ds.reader.ahead.close()


def _faults_of_a_later_batch(keep: bool, queue) -> None:
    """Minor page faults while filling a batch's 48 MB of views and 4 MB of tiles, in each of 8 batches made and freed."""
    import resource
    torch.set_num_threads(1)  # as in a loader worker: a forked child must not enter the parent's OpenMP pool
    if keep:
        P.keep_freed_memory()
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        views, tiles = torch.empty(12 << 20), torch.empty(1 << 20)
        views.fill_(1), tiles.fill_(1)
        del views, tiles  # handed on and dropped
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    queue.put(faults)


def test_a_worker_reuses_a_freed_batchs_memory():
    """glibc unmaps a freed 48 MB block and faults the next one in 4 KB at a time (12,288 faults); a loader worker
    keeps it (keep_freed_memory) and refills it without faults. Each case in a fresh process: the setting is per process."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    faults = {}
    for keep in (False, True):
        queue = ctx.Queue()
        process = ctx.Process(target=_faults_of_a_later_batch, args=(keep, queue))
        process.start()
        faults[keep] = queue.get(timeout=60)
        process.join()
    assert min(faults[False]) > 6000 and faults[True][-1] < 1000, faults  # (the heap settles within a few batches)


def test_closing_a_slide_with_reads_in_flight_keeps_its_draws(prepared, monkeypatch):
    """A handle closed while reads of later draws are in flight from it (a read error, the open-file LRU) waits for
    them instead of cancelling them: those draws are still decoded later, as reading in turn would, not failed."""
    reader = P.JpegTiffReader(prepared.path(0), prepared.slide(0).info.dimensions)
    lv = reader.levels[0]
    runs = reader.tile_runs(0, lv.tile_w // 2, lv.tile_h // 2, lv.tile_w, lv.tile_h)  # a draw of 2 reads
    gate, real = threading.Event(), P.JpegTiffReader.read_runs
    monkeypatch.setattr(P.JpegTiffReader, "read_runs", lambda self, *a: gate.wait() and real(self, *a))
    other = P.JpegTiffReader(prepared.path(0), prepared.slide(0).info.dimensions)  # another slide's handle
    ahead = P.ReadAhead(1 << 20, 1)  # one read thread, held by the other slide's read until the gate opens
    held, draw = ahead.submit(other, 0, runs[:1], 1), ahead.submit(reader, 0, runs, 2)
    threading.Timer(0.05, gate.set).start()
    ahead.settle(reader)  # (closing the reader would follow)
    assert ahead.wait(draw) == real(reader, 0, runs) and ahead.wait(held) == real(other, 0, runs[:1])
    ahead.close()
    reader.close(), other.close()


def test_reads_in_flight_give_the_same_failures_and_drops(tmp_path, slide_dir, monkeypatch):
    monkeypatch.setattr(P, "SLOW_READ_S", 0.0)
    index, good, bad = damaged_copy(slide_dir, tmp_path)
    sync = dataset(index, batch_size=16, mpps=[0.5], tiles_per_visit=4)
    ahead = dataset(index, batch_size=16, mpps=[0.5], tiles_per_visit=4, read_ahead_bytes=1 << 20)
    a, b = sync.batch(0), next(iter(ahead))
    assert a["locations"] == b["locations"] and torch.equal(a["tiles"], b["tiles"])
    assert b["skipped"] == P.FAILURES_TO_DROP and ahead.dropped[1]
    ahead.reader.ahead.close()


def test_tiles_from_the_index_are_the_readers_tiles_at_those_positions(prepared):
    """Sampling only chooses (slide, mpp, x, y); the pixels are TileReader.read's, as before the index."""
    batch = dataset(prepared, reader="openslide", batch_size=8).batch(3)
    reader = P.TileReader("openslide")
    for tile, (i, mpp, x, y) in zip(batch["tiles"], batch["locations"]):
        assert torch.equal(tile.permute(1, 2, 0), torch.from_numpy(np.array(reader.read(prepared.slide(i), mpp, x, y, 64))))


def test_real_slides_sample_tissue_and_tcga_needs_mpp(tmp_path):
    if not REAL.exists():
        pytest.skip(f"real slides not found in {REAL}")
    cmu, tcga = str(REAL / "CMU-1-Small-Region.svs"), str(REAL / "TCGA-CR-7395-01A-01-TS1.svs")
    index = build([SlideEntry(cmu), SlideEntry(tcga)], tmp_path / "a", tile_size=224)
    assert [index.path(i) for i in range(len(index))] == [cmu]
    (bad,) = index.unusable()
    assert bad["path"] == tcga and bad["row"] == "3" and "add an 'mpp' column" in bad["reason"]
    index = build([SlideEntry(cmu), SlideEntry(tcga, mpp=0.5)], tmp_path / "b", tile_size=224)
    assert len(index) == 2 and index.unusable() == []
    batch = dataset(index, tile_size=224, batch_size=16, tiles_per_visit=2).batch(0)
    assert {loc[0] for loc in batch["locations"]} == {0, 1}
    rgb = batch["tiles"].permute(0, 2, 3, 1).reshape(-1, 3).int()
    assert ((rgb.max(1).values - rgb.min(1).values) > 20).float().mean() > 0.4


def blank_slide(path, size):
    """An Aperio-style slide of bare glass: opens fine, has no tissue."""
    tile = np.full((size, size, 3), 240, np.uint8)
    tifffile.imwrite(path, tile, tile=(256, 256), compression="jpeg", photometric="rgb",
                     description="Aperio Image Library v12\n|MPP = 0.5", metadata=None)
    return path


def test_bad_slides_are_listed_with_reasons(tmp_path, slide_dir):
    (tmp_path / "text.svs").write_text("no slide")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((slide_dir / "s0.svs").read_bytes()[:4000])
    entries = [SlideEntry(str(tmp_path / "missing.svs")), SlideEntry(str(tmp_path / "text.svs")),
               SlideEntry(str(truncated)), SlideEntry(str(blank_slide(tmp_path / "glass.svs", 1024))),
               SlideEntry(str(blank_slide(tmp_path / "tiny.svs", 256))), SlideEntry(str(slide_dir / "s1.svs"))]
    index = build(entries, tmp_path / "index", tile_size=224, mpps=[1.0, 2.0])
    assert len(index) == 1 and index.meta["unusable"] == 5
    reasons = {r["path"]: r["reason"] for r in index.unusable()}
    assert "no such file" in reasons[str(tmp_path / "missing.svs")]
    assert "not a slide" in reasons[str(tmp_path / "text.svs")]
    assert str(truncated) in reasons
    assert "no tissue" in reasons[str(tmp_path / "glass.svs")]
    assert "smaller than a 224 px tile" in reasons[str(tmp_path / "tiny.svs")]
    with pytest.raises(SlideError, match="no usable slide among 5"):
        build(entries[:5], tmp_path / "none", tile_size=224, mpps=[1.0, 2.0])


def damaged_copy(slide_dir, tmp_path):
    """(good, bad) copies; every stored tile of bad is garbage after indexing, as on a flaky network disk."""
    good, bad = tmp_path / "good.svs", tmp_path / "bad.svs"
    shutil.copy(slide_dir / "s0.svs", good)
    shutil.copy(slide_dir / "s1.svs", bad)
    index = build([SlideEntry(str(good)), SlideEntry(str(bad))], tmp_path / "index", mpps=[0.5])
    level = P.JpegTiffReader(str(bad), index.slide(1).info.dimensions).levels[0]
    with open(bad, "r+b") as f:
        for offset, count in zip(level.offsets, level.counts):
            f.seek(int(offset))
            f.write(b"\xff" * int(count))
    return index, good, bad


@pytest.mark.parametrize("reader", ["jpeg", "openslide"])
def test_read_errors_are_skipped_counted_and_the_slide_dropped(tmp_path, slide_dir, reader):
    index, good, bad = damaged_copy(slide_dir, tmp_path)
    ds = dataset(index, reader=reader, batch_size=16, mpps=[0.5], tiles_per_visit=4)
    batch = ds.batch(0)
    assert batch["tiles"].shape[0] == 16 and batch["skipped"] == P.FAILURES_TO_DROP
    assert {loc[0] for loc in batch["locations"]} == {0} and ds.dropped[1]
    assert ds.reader.handles.keys() == {str(good)}  # no broken handle left behind


def test_a_slide_failing_in_several_workers_is_dropped_in_all_and_written_to_the_run(tmp_path, slide_dir, monkeypatch):
    monkeypatch.setattr("pathfm.data.failures.REFRESH_S", 0.0)
    index, good, bad = damaged_copy(slide_dir, tmp_path)
    folder = tmp_path / "run" / "read_failures"
    workers = [dataset(index, mpps=[0.5], failures_dir=folder, rank=r) for r in (0, 0, 1)]
    for w, name in zip(workers, ("worker000", "worker001", "worker000")):
        w._reset_worker_state(name)  # as __iter__ does in each DataLoader worker
    # one failure in each of two workers, on different ranks: not dropped yet anywhere
    for w in workers[:2]:
        w.reader = P.TileReader("auto")
        assert w._sample(1, np.random.default_rng(0)) is None
    workers[2].reader = P.TileReader("auto")
    workers[2]._drop_failed_elsewhere()
    assert not workers[2].dropped[1]
    assert workers[2]._sample(1, np.random.default_rng(0)) is None  # the third failure, on rank 1
    assert workers[2].dropped[1]
    workers[0]._drop_failed_elsewhere()  # worker 0 of rank 0 sees the others' failures and drops it too
    assert workers[0].dropped[1]
    total, dropped = summarise(folder, tmp_path / "run" / "skipped_slides.csv", P.FAILURES_TO_DROP)
    assert (total, dropped) == (3, 1)
    text = (tmp_path / "run" / "skipped_slides.csv").read_text().splitlines()
    assert text[0] == "path,read_failures,dropped,last_reason" and text[1].startswith(f"{bad},3,1,")
