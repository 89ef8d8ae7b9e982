"""Online patching: an endless, resumable stream of tissue tiles sampled straight from slides.

    index = build_index(entries, "INDEX_DIR", IndexParams(224, (0.25, 0.5, 1.0, 2.0), 0.4))  # once per manifest
    ds = SlideTileDataset(index, batch_size=64, tile_size=224, mpps=[0.25, 0.5, 1.0, 2.0], mpp_weights=None,
                          seed=0, rank=rank, world_size=world, start_step=step)
    for batch in DataLoader(ds, batch_size=None, num_workers=8): ...   # batch["tiles"]: (B, 3, T, T)

Determinism: the content of step s is a pure function of (seed, rank, s): its tiles come from a
generator seeded with exactly those numbers, so any worker can make any step, a resumed run
(start_step=s) continues the same stream, and ranks never draw the same sequence. Step s is made
by worker (s - start_step) % num_workers, which is the order a DataLoader collects them in.

Sampling a tile: slide (by weight, optionally balanced over groups), then magnification (from
the mix, among those the slide can serve), then a position drawn uniformly from the places
whose tile footprint is >= the tissue threshold on the slide's mask: one binary search in the
memory-mapped index (pathfm.data.index), so the cost of a tile does not depend on the number of
slides. A batch is made of visits (a slide, then several tiles of it) so that a worker opens a
file once per visit, not once per tile, when the cohort has more slides than open handles.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

import numpy as np
import openslide
import torch
from PIL import Image

from pathfm.data.failures import ReadFailures
from pathfm.data.index import IndexedSlide, SlideIndex
from pathfm.data.jpegtiles import JpegTiffReader
from pathfm.data.slides import HSVFilter, ReadPlan, SlideError, open_slide

log = logging.getLogger(__name__)

FAILURES_TO_DROP = 3  # read errors (summed over all workers and ranks) after which a slide is dropped
HSV_TRIES = 8  # draws per sample before a tile failing the colour filter is kept anyway
OPENSLIDE_CACHE_BYTES = 64 << 20  # one cache per worker process, shared by all its handles
READERS = ("auto", "openslide", "jpeg")  # auto: the JPEG fast path where the file allows it
MAX_OPEN_HANDLES = 64  # per worker: a 10k-slide manifest must not hold 10k open files


class TileReader:
    """Reads tiles for one worker: lazily opened handles (OpenSlide or the JPEG fast path).

    Handles are opened in the worker (they cannot be pickled and must not cross a fork), kept
    in a bounded LRU, share one OpenSlideCache, and are closed and forgotten after an error so
    the next read reopens the file instead of reusing a broken handle.
    """

    def __init__(self, reader: str = "auto"):
        if reader not in READERS:
            raise ValueError(f"reader={reader!r}: expected one of {READERS}")
        self.reader = reader
        self.cache = openslide.OpenSlideCache(OPENSLIDE_CACHE_BYTES)
        self.handles: OrderedDict[str, object] = OrderedDict()
        self.opens = 0  # files opened so far (the cost visits amortise)

    def handle(self, slide: IndexedSlide):
        path = slide.info.path
        if path in self.handles:
            self.handles.move_to_end(path)
            return self.handles[path]
        handle = None
        if self.reader in ("auto", "jpeg"):
            try:
                handle = JpegTiffReader(path, slide.info.dimensions)
            except Exception as e:  # not a JPEG-tiled TIFF (or not a TIFF at all)
                if self.reader == "jpeg":
                    raise SlideError(f"{path}: reader='jpeg' needs a tiled JPEG TIFF ({e})") from None
        if handle is None:
            handle = open_slide(path, self.cache)
        self.opens += 1
        self.handles[path] = handle
        if len(self.handles) > MAX_OPEN_HANDLES:
            self.handles.popitem(last=False)[1].close()
        return handle

    def forget(self, path: str) -> None:
        handle = self.handles.pop(path, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:  # closing a broken handle may fail too; it is dropped either way
                pass

    def read(self, slide: IndexedSlide, mpp: float, x: int, y: int, size: int) -> np.ndarray:
        """(size, size, 3) uint8 tile at target mpp whose top-left is level-0 (x, y)."""
        plan = slide.plans[mpp]
        lw, lh = slide.info.dimensions[plan.level]
        r = plan.region
        lx = min(round(x / plan.downsample), lw - r)
        ly = min(round(y / plan.downsample), lh - r)
        try:
            handle = self.handle(slide)
            if isinstance(handle, JpegTiffReader):
                region = handle.read(plan.level, lx, ly, r, r)
            else:
                xy0 = (round(lx * plan.downsample), round(ly * plan.downsample))
                rgba = np.asarray(handle.read_region(xy0, plan.level, (r, r)))  # (r, r, 4)
                region = rgba[..., :3]
                if rgba[..., 3].min() < 255:  # unscanned area: premultiplied transparent -> white
                    region = (region + (255 - rgba[..., 3:])).astype(np.uint8)
        except Exception:
            self.forget(slide.info.path)
            raise
        if r != size:  # the remainder between the level's mpp and the target (antialiased)
            region = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((size, size), Image.BILINEAR))
        return region


def worker_steps(start_step: int):
    """The steps this DataLoader worker makes: start + worker, then every num_workers-th, forever,
    which is the round-robin order in which the DataLoader collects them."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return itertools.count(start_step + worker, workers)


def views_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The augmentation generator of a step: a pure function of (seed, rank, step), so workers and the
    training device (data.device_augment) draw the same crop parameters for the same step."""
    state = np.random.SeedSequence([seed, rank, step, 1]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class SlideTileDataset(torch.utils.data.IterableDataset):
    """Yields {"step", "tiles": uint8 (B, 3, T, T) (channels_last strides) or transform(tiles, generator),
    "skipped": read failures so far in this worker, "locations": [(slide index, mpp, x, y)]};
    use with DataLoader(batch_size=None)."""

    def __init__(self, index: SlideIndex, *, batch_size: int, tile_size: int, mpps: list[float],
                 mpp_weights: list[float] | None, seed: int, rank: int, world_size: int, start_step: int = 0,
                 reader: str = "auto", grid_aligned: bool = False, hsv_filter: bool = False,
                 group_balance: bool = False, transform=None, tiles_per_visit: int = 8, failures_dir=None):
        if not len(index):
            raise SlideError(f"SlideTileDataset: the index {index.folder} has no usable slide")
        if mpp_weights and len(mpp_weights) != len(mpps):
            raise ValueError(f"mpp_weights {mpp_weights} must have one weight per mpp {mpps}")
        if tile_size != index.params.tile_size:
            raise SlideError(f"tile_size {tile_size} but the index {index.folder} is for {index.params.tile_size} px tiles")
        missing = [m for m in mpps if m not in index.params.mpps]
        if missing:
            raise SlideError(f"mpps {missing} are not in the index {index.folder} (it has {list(index.params.mpps)})")
        if reader not in READERS:
            raise ValueError(f"reader={reader!r}: expected one of {READERS}")
        self.index, self.batch_size, self.tile_size = index, batch_size, tile_size
        # per index mpp column: the configured weight, 0 for index mpps this run does not use
        weight = dict(zip(mpps, mpp_weights or [1.0] * len(mpps)))
        self.column_weight = np.array([weight.get(m, 0.0) for m in index.params.mpps])
        self.used_columns = np.array([m in weight for m in index.params.mpps])
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        self.reader_kind, self.grid_aligned, self.group_balance = reader, grid_aligned, group_balance
        self.hsv = HSVFilter() if hsv_filter else None
        self.transform, self.tiles_per_visit, self.failures_dir = transform, tiles_per_visit, failures_dir
        self._reset_worker_state()

    def _reset_worker_state(self, name: str = "main") -> None:
        self.reader = None  # opened lazily in the worker that uses it
        self.failures = ReadFailures(self.failures_dir, f"rank{self.rank:05d}-{name}")
        self.dropped = np.zeros(len(self.index), bool)
        self._slide_cumulative = None
        self._views: OrderedDict[int, tuple[IndexedSlide, np.ndarray]] = OrderedDict()

    @property
    def skipped(self) -> int:
        return sum(self.failures.mine.values())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        self._reset_worker_state(f"worker{info.id:03d}" if info else "main")  # each worker process starts clean
        return (self.batch(step) for step in worker_steps(self.start_step))

    # -- one step

    def batch(self, step: int) -> dict:
        """The whole batch of a step; deterministic in (seed, rank, step) barring read errors.

        Tiles come in visits: a slide, then up to `tiles_per_visit` tiles from it (each with its own
        magnification and position), so a handle is opened at most once per visit even when there are
        more slides than open handles; the visits are then shuffled together."""
        if self.reader is None:
            self.reader = TileReader(self.reader_kind)
        self._drop_failed_elsewhere()
        rng = np.random.default_rng([self.seed, self.rank, step])
        B, T = self.batch_size, self.tile_size
        slot = np.random.default_rng([self.seed, self.rank, step, 2]).permutation(B)  # shuffles the visits together
        # Each tile is copied into its slot as soon as it is decoded, so the decoder's buffer is freed and
        # reused at once: 32 live decoded tiles waiting for a np.stack cost a page fault per 4 KB.
        tiles, locations, n = np.empty((B, T, T, 3), np.uint8), [None] * B, 0
        while n < B:
            index = self._draw_slide(rng)
            for _ in range(min(self.tiles_per_visit, B - n)):
                got = self._sample(index, rng)
                if got is None:  # read failure: leave this slide, draw another
                    break
                tiles[slot[n]], locations[slot[n]] = got
                n += 1
        # (B, 3, T, T) as a view of (B, T, T, 3): torch's channels_last layout, no transposing copy
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        if self.transform is not None:
            batch = self.transform(batch, views_generator(self.seed, self.rank, step))
        return {"step": step, "tiles": batch, "skipped": self.skipped, "locations": locations}

    def _sample(self, index: int, rng: np.random.Generator):
        """(tile, location) from slide `index`, retrying positions that fail the HSV filter; None on a read error."""
        for _ in range(HSV_TRIES if self.hsv else 1):
            location = self.draw_tile(index, rng)
            try:
                tile = self.reader.read(self.slide(index)[0], *location[1:], self.tile_size)
            except Exception as e:  # any read failure: count, maybe drop, draw again
                self._failed(index, e)
                return None
            if self.hsv is None or self.hsv.accepts(tile):
                break
        return tile, location

    def _failed(self, index: int, error: Exception) -> None:
        path = self.index.path(index)
        self.failures.record(index, path, str(error))
        n = self.failures.everyone[index]
        log.warning("read failed (%d/%d) on %s: %s", n, FAILURES_TO_DROP, path, error)
        if n >= FAILURES_TO_DROP:
            self._drop(index)

    def _drop_failed_elsewhere(self) -> None:
        for index, n in self.failures.counts().items():
            if n >= FAILURES_TO_DROP and not self.dropped[index]:
                self._drop(index)

    def _drop(self, index: int) -> None:
        self.dropped[index] = True
        self._slide_cumulative = None
        if self.reader is not None:
            self.reader.forget(self.index.path(index))
        log.warning("dropping %s after %d read errors (in all workers and ranks)", self.index.path(index), FAILURES_TO_DROP)
        if self.dropped.all():
            raise SlideError(f"every slide of {self.index.folder} failed {FAILURES_TO_DROP} reads")

    # -- draws

    def draw(self, rng: np.random.Generator) -> tuple[int, float, int, int]:
        """One (slide index, target mpp, x, y): a slide by weight, then a tile of it."""
        return self.draw_tile(self._draw_slide(rng), rng)

    def draw_tile(self, index: int, rng: np.random.Generator) -> tuple[int, float, int, int]:
        """(index, target mpp, x, y): a magnification from the mix, then a uniform valid position;
        x, y are level-0 top-left, aligned to the read level."""
        slide, mpp_cumulative = self.slide(index)
        j = _pick(mpp_cumulative, rng)
        mpp = self.index.params.mpps[j]
        row, col = self.index.cell(index, j, rng)
        jx, jy = rng.random(2).tolist()  # a uniform point inside the chosen mask cell, in level-0 pixels
        x, y = (col + jx) * slide.mask_scale, (row + jy) * slide.mask_scale
        plan = slide.plans[mpp]
        lx, ly = self._place(slide, plan, x / plan.downsample, y / plan.downsample)
        return index, mpp, round(lx * plan.downsample), round(ly * plan.downsample)

    def slide(self, index: int) -> tuple[IndexedSlide, np.ndarray]:
        """(the slide's reader view, cumulative weights of its index mpp columns), rebuilt from the
        index arrays once per visit and kept in a small LRU."""
        got = self._views.get(index)
        if got is None:
            served = self.index.plans[index, :, 0] >= 0
            weights = np.where(served, self.column_weight, 0.0)
            if weights.sum() <= 0:  # the slide serves none of the weighted mpps: uniform over its own
                weights = (served & self.used_columns).astype(float)
            got = self._views[index] = (self.index.slide(index), np.cumsum(weights))
            if len(self._views) > MAX_OPEN_HANDLES:
                self._views.popitem(last=False)
        else:
            self._views.move_to_end(index)
        return got

    def _place(self, slide: IndexedSlide, plan: ReadPlan, lx: float, ly: float) -> tuple[int, int]:
        """Integer top-left in the read level's pixels, inside the level; with grid_aligned, inside
        one stored tile when the region fits in one (one JPEG decode per sample)."""
        lw, lh = slide.info.dimensions[plan.level]
        r = plan.region
        lx, ly = min(int(lx), lw - r), min(int(ly), lh - r)
        tw, th = slide.tile_grid[plan.level] if slide.tile_grid else (0, 0)
        if self.grid_aligned and tw and th:
            lx, ly = _snap(lx, tw, r, lw), _snap(ly, th, r, lh)
        return lx, ly

    def _draw_slide(self, rng: np.random.Generator) -> int:
        if self._slide_cumulative is None:  # first draw, or a slide was dropped
            s = self.index.slides
            # slides that serve none of the run's mpps get no draws
            serves = ((self.index.plans[:, :, 0] >= 0) & self.used_columns).any(1)
            weights = np.asarray(s["weight"], float) * ~self.dropped * serves
            if self.group_balance:  # every group gets the same share, split inside it by slide weight
                group = np.asarray(s["group"])
                totals = np.bincount(group, weights, minlength=len(self.index.groups))
                weights = np.divide(weights, totals[group], out=np.zeros_like(weights), where=weights > 0)
            if weights.sum() <= 0:
                raise SlideError(f"no slide of {self.index.folder} serves mpps {list(np.array(self.index.params.mpps)[self.used_columns])}")
            self._slide_cumulative = np.cumsum(weights)
        return _pick(self._slide_cumulative, rng)


def _pick(cumulative: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to its weight, given the cumulative weights."""
    return int(cumulative.searchsorted(rng.random() * cumulative[-1], side="right"))


def _snap(start: int, tile: int, region: int, limit: int) -> int:
    """Move a region start so that [start, start + region) lies in one stored tile if it can."""
    col = start // tile
    if region <= tile:
        start = min(start, col * tile + tile - region)
    else:
        start = col * tile
    return max(0, min(start, limit - region))
