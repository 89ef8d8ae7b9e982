"""Online patching: an endless, resumable stream of tissue tiles sampled straight from slides.

    slides, skipped = prepare_slides(entries, cache_dir=".cache", tissue_threshold=0.4,
                                     tile_size=224, mpps=[0.25, 0.5, 1.0, 2.0])
    ds = SlideTileDataset(slides, batch_size=64, tile_size=224, mpps=[0.25, 0.5, 1.0, 2.0],
                          mpp_weights=None, tissue_threshold=0.4, seed=0, rank=rank,
                          world_size=world, start_step=step)
    for batch in DataLoader(ds, batch_size=None, num_workers=8): ...   # batch["tiles"]: (B, 3, T, T)

Determinism: the content of step s is a pure function of (seed, rank, s): its tiles come from a
generator seeded with exactly those numbers, so any worker can make any step, a resumed run
(start_step=s) continues the same stream, and ranks never draw the same sequence. Step s is made
by worker (s - start_step) % num_workers, which is the order a DataLoader collects them in.

Sampling a tile: slide (by weight, optionally balanced over groups), then magnification (from
the mix, among those the slide can serve), then a position drawn uniformly from the places
whose tile footprint is >= tissue_threshold tissue on the slide's cached mask. No rejection
loop: the valid positions are listed once per (slide, mpp) in each worker.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import openslide
import torch
from PIL import Image

from pathfm.data.jpegtiles import JpegTiffReader
from pathfm.data.slides import (HSVFilter, ReadPlan, SlideEntry, SlideError, SlideInfo,
                                load_or_compute_tissue_mask, mask_scale, open_slide, plan_read,
                                slide_mpp, usable_mpps, file_identity)

log = logging.getLogger(__name__)

FAILURES_TO_DROP = 3  # read errors after which a worker stops using a slide
HSV_TRIES = 8  # draws per sample before a tile failing the colour filter is kept anyway
OPENSLIDE_CACHE_BYTES = 64 << 20  # one cache per worker process, shared by all its handles
READERS = ("auto", "openslide", "jpeg")  # auto: the JPEG fast path where the file allows it
MAX_OPEN_HANDLES = 64  # per worker: a 10k-slide manifest must not hold 10k open files


@dataclass
class PreparedSlide:
    """A usable slide: small and picklable, sent to every worker (no handle, no mask array)."""

    info: SlideInfo
    weight: float
    group: str
    mask_path: str  # cached (h, w) uint8 tissue mask
    mask_scale: float  # level-0 pixels per mask pixel
    mpps: list[float]  # target mpps this slide can serve with tissue
    plans: dict[float, ReadPlan]
    tile_grid: list[tuple[int, int]] = field(default_factory=list)  # stored tile (w, h) per level


def valid_positions(mask: np.ndarray, window: int, threshold: float) -> tuple[np.ndarray, int]:
    """Top-left mask cells whose window x window footprint is >= threshold tissue.

    Returns (flat indices into the (h - window + 1, w - window + 1) grid, that grid's width).
    Uses an integral image, so it costs O(h * w) whatever the window.
    """
    h, w = mask.shape
    if window > h or window > w:
        return np.zeros(0, np.int64), 0
    integral = np.zeros((h + 1, w + 1), np.int32)
    integral[1:, 1:] = np.asarray(mask, dtype=np.int32).cumsum(0).cumsum(1)
    k = window
    sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]  # (h-k+1, w-k+1)
    return np.flatnonzero(sums >= threshold * k * k), w - k + 1


def _window(slide: PreparedSlide, mpp: float) -> int:
    return max(1, round(slide.plans[mpp].footprint / slide.mask_scale))


def prepare_slides(entries: list[SlideEntry], *, cache_dir, tissue_threshold: float, tile_size: int,
                   mpps: list[float]) -> tuple[list[PreparedSlide], list[tuple[str, str]]]:
    """Open each slide once (main process), resolve its mpp, load or compute its tissue mask.

    Returns (usable slides, skipped [(path, reason)]). Raises SlideError when nothing is usable,
    so a bad manifest fails before training starts.
    """
    usable, skipped = [], []
    for entry in entries:
        try:
            usable.append(_prepare_one(entry, cache_dir, tissue_threshold, tile_size, mpps))
        except SlideError as e:
            log.warning("skipping slide: %s", e)
            skipped.append((entry.path, str(e)))
    if not usable:
        reasons = "; ".join(reason for _, reason in skipped[:5])
        raise SlideError(f"no usable slide among {len(entries)} manifest entries: {reasons}")
    return usable, skipped


def _prepare_one(entry: SlideEntry, cache_dir, threshold: float, size: int, mpps: list[float]) -> PreparedSlide:
    slide = open_slide(entry.path)
    try:
        mpp = slide_mpp(slide, entry.path, entry.mpp)
        info = SlideInfo(entry.path, mpp, list(slide.level_dimensions),
                         [float(d) for d in slide.level_downsamples], file_identity(entry.path))
        servable = usable_mpps(info, mpps, size)
        if not servable:
            raise SlideError(f"{entry.path}: slide ({info.dimensions[0][0]}x{info.dimensions[0][1]} px "
                             f"at {mpp} µm/px) is smaller than a {size} px tile at every requested "
                             f"mpp {mpps}, or they are all finer than its level 0")
        mask, mask_path = load_or_compute_tissue_mask(info, cache_dir, slide)
        grid = [(int(slide.properties.get(f"openslide.level[{i}].tile-width", 0)),
                 int(slide.properties.get(f"openslide.level[{i}].tile-height", 0)))
                for i in range(len(info.dimensions))]
    except openslide.OpenSlideError as e:
        raise SlideError(f"{entry.path}: unreadable slide ({e})") from None
    finally:
        slide.close()
    prepared = PreparedSlide(info, entry.weight, entry.group, str(mask_path), mask_scale(info), [],
                             {m: plan_read(info, m, size) for m in servable}, grid)
    prepared.mpps = [m for m in servable if valid_positions(mask, _window(prepared, m), threshold)[0].size]
    if not prepared.mpps:
        raise SlideError(f"{entry.path}: no tissue: no {size} px tile at mpp {servable} is "
                         f">= {threshold:.0%} tissue on its mask")
    return prepared


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

    def handle(self, slide: PreparedSlide):
        path = slide.info.path
        if path in self.handles:
            self.handles.move_to_end(path)
            return self.handles[path]
        handle = None
        if self.reader in ("auto", "jpeg"):
            try:
                handle = JpegTiffReader(path, slide.info.dimensions)
            except Exception as e:  # not a JPEG-tiled TIFF (tifffile raises its own error types)
                if self.reader == "jpeg":
                    raise SlideError(f"{path}: reader='jpeg' needs a tiled JPEG TIFF ({e})") from None
        if handle is None:
            handle = open_slide(path, self.cache)
        self.handles[path] = handle
        if len(self.handles) > MAX_OPEN_HANDLES:
            self.handles.popitem(last=False)[1].close()
        return handle

    def forget(self, slide: PreparedSlide) -> None:
        handle = self.handles.pop(slide.info.path, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:  # closing a broken handle may fail too; it is dropped either way
                pass

    def read(self, slide: PreparedSlide, mpp: float, x: int, y: int, size: int) -> np.ndarray:
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
            self.forget(slide)
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
    "skipped": read failures so far in this worker,
    "locations": [(slide index, mpp, x, y)]}; use with DataLoader(batch_size=None)."""

    def __init__(self, slides: list[PreparedSlide], *, batch_size: int, tile_size: int, mpps: list[float],
                 mpp_weights: list[float] | None, tissue_threshold: float, seed: int, rank: int,
                 world_size: int, start_step: int = 0, reader: str = "auto", grid_aligned: bool = False,
                 hsv_filter: bool = False, group_balance: bool = False, transform=None):
        if not slides:
            raise SlideError("SlideTileDataset: no slides (prepare_slides found none usable)")
        if mpp_weights and len(mpp_weights) != len(mpps):
            raise ValueError(f"mpp_weights {mpp_weights} must have one weight per mpp {mpps}")
        self.slides, self.batch_size, self.tile_size = slides, batch_size, tile_size
        self.mpp_weight = dict(zip(mpps, mpp_weights or [1.0] * len(mpps)))
        self.threshold, self.seed, self.rank, self.world_size = tissue_threshold, seed, rank, world_size
        self.start_step, self.reader_kind, self.grid_aligned = start_step, reader, grid_aligned
        self.hsv = HSVFilter() if hsv_filter else None
        self.group_balance, self.transform = group_balance, transform
        if reader not in READERS:
            raise ValueError(f"reader={reader!r}: expected one of {READERS}")
        self._reset_worker_state()

    def _reset_worker_state(self) -> None:
        self.reader = None  # opened lazily in the worker that uses it
        self.skipped = 0
        self.failures = [0] * len(self.slides)
        self.alive = np.ones(len(self.slides), bool)
        self._slide_cumulative = None
        self._mpp_cumulatives = {}
        self._positions: OrderedDict[tuple[int, float], tuple[np.ndarray, int]] = OrderedDict()

    def __iter__(self):
        self._reset_worker_state()  # each worker process (or a re-iteration) starts clean
        return (self.batch(step) for step in worker_steps(self.start_step))

    # -- one step

    def batch(self, step: int) -> dict:
        """The whole batch of a step; deterministic in (seed, rank, step) barring read errors."""
        if self.reader is None:
            self.reader = TileReader(self.reader_kind)
        rng = np.random.default_rng([self.seed, self.rank, step])
        tiles, locations = [], []
        while len(tiles) < self.batch_size:
            for _ in range(HSV_TRIES if self.hsv else 1):
                index, mpp, x, y = self.draw(rng)
                try:
                    tile = self.reader.read(self.slides[index], mpp, x, y, self.tile_size)
                except Exception as e:  # any read failure: count, maybe drop, draw again
                    tile = None
                    self._failed(index, e)
                    break
                if self.hsv is None or self.hsv.accepts(tile):
                    break
            if tile is not None:
                tiles.append(tile)
                locations.append((index, mpp, x, y))
        # (B, 3, T, T) as a view of (B, T, T, 3): torch's channels_last layout, no transposing copy
        batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        if self.transform is not None:
            batch = self.transform(batch, views_generator(self.seed, self.rank, step))
        return {"step": step, "tiles": batch, "skipped": self.skipped, "locations": locations}

    def _failed(self, index: int, error: Exception) -> None:
        self.skipped += 1
        self.failures[index] += 1
        log.warning("read failed (%d/%d) on %s: %s", self.failures[index], FAILURES_TO_DROP,
                    self.slides[index].info.path, error)
        if self.failures[index] >= FAILURES_TO_DROP:
            self.alive[index] = False
            self._slide_cumulative = None
            log.warning("dropping %s in this worker after %d read errors", self.slides[index].info.path,
                        FAILURES_TO_DROP)
            if not self.alive.any():
                raise SlideError(f"every slide failed {FAILURES_TO_DROP} reads in this worker; last: {error}")

    def draw(self, rng: np.random.Generator) -> tuple[int, float, int, int]:
        """(slide index, target mpp, x, y): level-0 top-left, aligned to the read level."""
        index = self._draw_slide(rng)
        slide = self.slides[index]
        mpp = slide.mpps[_pick(self._mpp_cumulative(index), rng)]
        positions, grid_w = self._valid(index, mpp)
        cell = positions[rng.integers(len(positions))]
        # a uniform point inside the chosen mask cell, in level-0 pixels
        jitter = rng.random(2)
        x = (cell % grid_w + jitter[0]) * slide.mask_scale
        y = (cell // grid_w + jitter[1]) * slide.mask_scale
        plan = slide.plans[mpp]
        lx, ly = self._place(slide, plan, x / plan.downsample, y / plan.downsample)
        return index, mpp, round(lx * plan.downsample), round(ly * plan.downsample)

    def _place(self, slide: PreparedSlide, plan: ReadPlan, lx: float, ly: float) -> tuple[int, int]:
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
            weights = np.array([s.weight for s in self.slides], float) * self.alive
            if self.group_balance:
                # every group gets the same share, split inside it by slide weight
                totals = {}
                for s, w in zip(self.slides, weights):
                    totals[s.group] = totals.get(s.group, 0.0) + w
                weights = np.array([w / totals[s.group] if w else 0.0 for s, w in zip(self.slides, weights)])
            self._slide_cumulative = np.cumsum(weights)
        return _pick(self._slide_cumulative, rng)

    def _mpp_cumulative(self, index: int) -> np.ndarray:
        if index not in self._mpp_cumulatives:
            weights = np.array([self.mpp_weight.get(m, 0.0) for m in self.slides[index].mpps])
            if weights.sum() <= 0:  # the slide serves none of the weighted mpps: uniform over its own
                weights = np.ones(len(weights))
            self._mpp_cumulatives[index] = np.cumsum(weights)
        return self._mpp_cumulatives[index]

    def _valid(self, index: int, mpp: float) -> tuple[np.ndarray, int]:
        """Valid top-left mask cells of (slide, mpp), listed once and kept in a bounded LRU."""
        key = (index, mpp)
        if key in self._positions:
            self._positions.move_to_end(key)
            return self._positions[key]
        slide = self.slides[index]
        mask = np.load(slide.mask_path, mmap_mode="r")
        self._positions[key] = valid_positions(mask, _window(slide, mpp), self.threshold)
        if len(self._positions) > 256:
            self._positions.popitem(last=False)
        return self._positions[key]


def _pick(cumulative: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to its weight, given the cumulative weights."""
    return int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))


def _snap(start: int, tile: int, region: int, limit: int) -> int:
    """Move a region start so that [start, start + region) lies in one stored tile if it can."""
    col = start // tile
    if region <= tile:
        start = min(start, col * tile + tile - region)
    else:
        start = col * tile
    return max(0, min(start, limit - region))
