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

import ctypes
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import openslide
import torch
from PIL import Image

from pathfm.data.failures import Reading, ReadFailures
from pathfm.data.finetiles import read_fine_tiles
from pathfm.data.index import IndexedSlide, SlideIndex
from pathfm.data.jpegtiles import JpegTiffReader
from pathfm.data.slides import HSVFilter, ReadPlan, SlideError, decode_scale, open_slide

log = logging.getLogger(__name__)

FAILURES_TO_DROP = 3  # read errors (summed over all workers and ranks) after which a slide is dropped
HSV_TRIES = 8  # draws per sample before a tile failing the colour filter is kept anyway
OPENSLIDE_CACHE_BYTES = 64 << 20  # one cache per worker process, shared by all its handles
READERS = ("auto", "openslide", "jpeg")  # auto: the JPEG fast path where the file allows it
MAX_OPEN_HANDLES = 64  # per worker: a 10k-slide manifest must not hold 10k open files
# Reads are kept in flight while they take longer than this on average (the page cache serves a stored tile
# in ~10 µs, where handing it to a thread costs more than it hides; shared storage takes milliseconds)
SLOW_READ_S = 1e-4
TIMED_EVERY = 8  # while reads go in turn, one draw in this many has its reads timed (timing all cost 6-8%)
# Slides opened at once ahead of their visits (an open reads the TIFF directories: ~15 reads): an open's latency x
# the rate visits are decoded, at least OPENS_AHEAD, at most MAX_OPENS_AHEAD (half the open-file LRU, so that a slide
# opened ahead is not closed again before its visit); see ReadAhead.opens
OPENS_AHEAD, MAX_OPENS_AHEAD = 4, MAX_OPEN_HANDLES // 2
# Reads in flight: latency x the rate the decode takes them (Little's law), times this margin for the spread of
# both, plus a few for the reads the decode has in hand; at most data.read_threads of them (the cap, see ReadAhead)
IN_FLIGHT_MARGIN = 1.5
STEPS_AHEAD = 8  # a worker draws (and reads) up to this many of its next steps ahead when the depth asks for it


class ReadAhead:
    """Reads of stored tiles kept in flight on threads, so that waiting on slow storage (a network file system,
    milliseconds a read) overlaps decoding instead of adding to it.

    A read is one os.pread: one stored tile, or a run of them that lies back to back in the file
    (JpegTiffReader.tile_runs: a row of a region's stored tiles), so a grid-aligned draw needs one read and a
    2 x 2 one two. A draw's reads go to the read threads together, one task each, and are done after about one
    `latency` (a geometric moving average of timed reads). How many draws: enough that a draw started now is
    read when the decode reaches it. The decode takes a draw every `busy` seconds (its own time per draw,
    measured, waits excluded), so `depth` = IN_FLIGHT_MARGIN x latency / busy + 4 draws are kept started and not
    yet decoded: 42 at 5 ms and 200 µs a draw, 154 at 20 ms. It is capped at `max_in_flight`, and so are the
    threads (data.read_threads, 128 by default; a thread has one read outstanding): past a few hundred
    outstanding reads a worker only queues in its file system client (an NFSv4.1 session has 64 slots, a Lustre
    client 8 RPCs per storage target), so the cap bounds the threads without bounding the rate below
    max_in_flight / latency reads a second (6,400 at 20 ms). At most `max_bytes` of tile streams are held at
    once, counting those being read and those read but not decoded yet (one draw's tiles larger than that are
    still read, alone).

    The threads only read (os.pread releases the GIL) and check the streams; decoding stays in the worker's own
    thread. A read is handed over through a queue and signals with one lock (_Task), cheaper than a
    concurrent.futures pool's future, condition and semaphore (the hand-offs' CPU was most of what reading ahead
    cost, issue 31). Reads ahead, and one draw's in TIMED_EVERY read in turn, are timed: reads go ahead only while
    they are slow (`active`), so the page cache keeps its cheaper synchronous path.
    """

    def __init__(self, max_bytes: int, max_in_flight: int):
        self.max_bytes, self.max_in_flight = max_bytes, max_in_flight
        # threads started as reads need them, in the process that reads (threads do not survive a fork)
        self.readers, self.openers = _Threads(), _Threads()
        self.held = self.peak = 0  # bytes held now, and the most ever held (tests check the bound)
        self.pending: dict = {}  # a draw's tasks (a tuple) -> the handle they read from, until consumed or dropped
        self.reads = 0  # the tasks of `pending`
        self.most_pending = 0  # the most draws ever started and not yet decoded (bench/storage.py reports it)
        # log of the seconds a read takes, moving average over about 10 reads: a geometric mean, so that a read
        # that was descheduled on a busy node (milliseconds, now and then) does not make the page cache look slow
        self.log_latency = math.log(1e-5)
        self.log_open = math.log(1e-3)  # the same for opening a slide (JpegTiffReader), over about 5 opens
        self.busy = 2e-4  # seconds of the decode's own work per draw consumed (moving average; a first guess)
        self.waited = 0.0  # seconds the decode waited for reads in flight (consumed() takes it out of `busy`)
        self.waited_total = 0.0  # the same, summed over the worker's life (bench/storage.py reports it)

    @property
    def active(self) -> bool:
        return SLOW_READ_S <= 0 or self.log_latency >= math.log(SLOW_READ_S)

    @property
    def depth(self) -> int:
        """Draws to keep started and not yet decoded: latency x decode rate, with a margin, within the cap."""
        want = IN_FLIGHT_MARGIN * math.exp(self.log_latency) / self.busy + 4
        return max(1, min(self.max_in_flight, math.ceil(want)))

    def timed(self, read, *args):
        start = time.perf_counter()
        data = read(*args)
        seconds = max(time.perf_counter() - start, 1e-7)
        self.log_latency += 0.1 * (math.log(seconds) - self.log_latency)  # from threads too: a lost update is harmless
        return data

    def read_in_turn(self, handle, level: int, runs: list) -> dict:
        """A draw's streams read now, each read timed (slow storage turns reading ahead on)."""
        streams = {}
        for run in runs:
            streams.update(self.timed(handle.read_runs, level, [run]))
        return streams

    def consumed(self, seconds: float) -> None:
        """The decode used one draw's reads in `seconds` of wall time, waits for them included."""
        own = max(seconds - self.waited, 1e-6)
        self.busy += 0.05 * (own - self.busy)  # about the last 20 draws
        self.waited_total += self.waited
        self.waited = 0.0

    def opens(self, tiles_per_visit: int) -> int:
        """Slides to keep opening ahead of their visits: an open's latency x the rate the decode takes visits
        (tiles_per_visit draws each), with the depth's margin, within [OPENS_AHEAD, MAX_OPENS_AHEAD]. With a file
        per visit (a cohort larger than the open-file LRU) a fixed 4 bounded a worker at 4 opens per open latency:
        about 50 visits, 430 tiles a second at 5 ms a read."""
        want = IN_FLIGHT_MARGIN * math.exp(self.log_open) / (tiles_per_visit * self.busy) + 1
        return max(OPENS_AHEAD, min(MAX_OPENS_AHEAD, math.ceil(want)))

    def open(self, path: str, dimensions, in_flight: int) -> "_Task":
        """Open a slide's JPEG reader on threads of their own (`in_flight` opens ahead, this one included), timed."""
        return self.openers.run(self._open, (path, dimensions), min(in_flight, MAX_OPENS_AHEAD))

    def _open(self, path: str, dimensions) -> JpegTiffReader:
        start = time.perf_counter()
        reader = JpegTiffReader(path, dimensions)
        self.log_open += 0.2 * (math.log(max(time.perf_counter() - start, 1e-7)) - self.log_open)
        return reader

    def close(self) -> None:
        self.readers.close()
        self.openers.close()

    def wait(self, tasks: tuple) -> dict:
        """A draw's streams, counting the time the decode waits for them."""
        if not all(task.done() for task in tasks):
            start = time.perf_counter()
            for task in tasks:
                task.wait()
            self.waited += time.perf_counter() - start
        if len(tasks) == 1:
            return tasks[0].result()
        streams = {}
        for task in tasks:
            streams.update(task.result())
        return streams

    def fits(self, nbytes: int) -> bool:
        """Whether a draw's `nbytes` fit in the memory bound now (alone, they always do)."""
        return self.held == 0 or self.held + nbytes <= self.max_bytes

    def submit(self, handle, level: int, runs: list, nbytes: int) -> tuple:
        """Start reading one draw's stored tiles (handle.tile_runs), a task a read; a thread is started while
        there are fewer than the reads in flight, up to the cap."""
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        self.reads += len(runs)
        threads = min(self.reads, self.max_in_flight)
        tasks = tuple(self.readers.run(self.timed, (handle.read_runs, level, [run]), threads) for run in runs)
        self.pending[tasks] = handle
        self.most_pending = max(self.most_pending, len(self.pending))
        return tasks

    def release(self, tasks: tuple, nbytes: int) -> None:
        """A draw's reads are decoded or no longer wanted: their bytes stop counting."""
        self.held -= nbytes
        for task in tasks:
            task.cancelled = True  # not started yet: never read
        if self.pending.pop(tasks, None) is not None:
            self.reads -= len(tasks)

    def settle(self, handle) -> None:
        """Wait for the reads in flight from `handle`, so that closing it cannot pull a file from under them. They
        are not cancelled: their draws are still to be decoded (a cancelled read would fail its draw, which reading
        in turn would not)."""
        for tasks in [ts for ts, h in self.pending.items() if h is handle]:
            for task in tasks:
                task.wait()  # an error belongs to whoever consumes it
        self.pending = {ts: h for ts, h in self.pending.items() if not all(t.done() for t in ts)}
        self.reads = sum(len(ts) for ts in self.pending)


class _Task:
    """fn(*args), to run once on a read thread. Its lock is held until it has run, so waiting for it is one
    acquire that releases the GIL. cancelled: skip it if it has not started."""

    __slots__ = ("fn", "args", "value", "error", "cancelled", "lock")

    def __init__(self, fn, args):
        self.fn, self.args, self.value, self.error, self.cancelled = fn, args, None, None, False
        self.lock = threading.Lock()
        self.lock.acquire()

    def run(self) -> None:
        if not self.cancelled:
            try:
                self.value = self.fn(*self.args)
            except BaseException as e:  # raised again by result(), in the thread that takes it
                self.error = e
        self.fn = self.args = None
        self.lock.release()

    def done(self) -> bool:
        return not self.lock.locked()

    def wait(self) -> None:
        with self.lock:
            pass

    def exception(self) -> BaseException | None:
        self.wait()
        return self.error

    def result(self):
        self.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Threads:
    """Daemon threads that run the _Tasks of one queue in turn."""

    def __init__(self):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def run(self, fn, args: tuple, threads: int) -> _Task:
        """fn(*args) on a thread, starting one more while there are fewer than `threads`."""
        if len(self.threads) < threads:
            thread = threading.Thread(target=_serve, args=(self.tasks,), name="pathfm-read", daemon=True)
            thread.start()
            self.threads.append(thread)
        task = _Task(fn, args)
        self.tasks.put(task)
        return task

    def close(self) -> None:
        """Let the threads end (each takes one None from the queue)."""
        for _ in self.threads:
            self.tasks.put(None)
        self.threads = []

    def __del__(self):
        self.close()


def _serve(tasks: queue.SimpleQueue) -> None:
    """A thread of _Threads: run tasks until a None. It holds the queue, not the _Threads, so that can be collected."""
    while (task := tasks.get()) is not None:
        task.run()


class TileReader:
    """Reads tiles for one worker: lazily opened handles (OpenSlide or the JPEG fast path).

    Handles are opened in the worker (they cannot be pickled and must not cross a fork), kept
    in a bounded LRU, share one OpenSlideCache, and are closed and forgotten after an error so
    the next read reopens the file instead of reusing a broken handle. With read_ahead_bytes > 0
    the sampler reads stored tiles ahead of their decode, up to `read_threads` at once (ReadAhead).
    """

    def __init__(self, reader: str = "auto", read_ahead_bytes: int = 0, read_threads: int = 128):
        if reader not in READERS:
            raise ValueError(f"reader={reader!r}: expected one of {READERS}")
        self.reader = reader
        self.cache = openslide.OpenSlideCache(OPENSLIDE_CACHE_BYTES)
        self.handles: OrderedDict[str, object] = OrderedDict()
        self.opens = 0  # files opened so far (the cost visits amortise)
        self.ahead = ReadAhead(read_ahead_bytes, read_threads) if read_ahead_bytes > 0 else None
        self.opening: dict = {}  # path -> future of a JPEG reader being opened ahead of its visit
        self.open_failed: OrderedDict = OrderedDict()  # path -> the future of a failed open ahead, not yet at its turn

    def open_ahead(self, slide: IndexedSlide) -> bool:
        """Open slide's JPEG reader on a read-ahead thread; False once it is open here (handle() has it)."""
        self._adopt_opened()
        path = slide.info.path
        if path in self.handles or self.reader == "openslide":
            return False
        if path in self.open_failed:
            self.handle(slide)  # opens as usual, which reports the error at its turn
            return False
        if path not in self.opening:
            self.opening[path] = self.ahead.open(path, slide.info.dimensions, len(self.opening) + 1)
            return True
        return not self.opening[path].done()

    def _adopt_opened(self) -> None:
        """Move the opens ahead that finished out of `opening` at once: into the handles LRU (so MAX_OPEN_HANDLES
        bounds their files), or, failed, into a bounded record that handle() consults at the slide's turn. The
        draw that asked for an open may be discarded before its turn (the HSV filter or a read error redraws
        the rest of the batch), and then nothing else would ever take its reader out of `opening`."""
        for path in [p for p, f in self.opening.items() if f.done()]:
            opened = self.opening.pop(path)
            if opened.exception() is None:
                self._keep(path, opened.result())
            else:
                self.open_failed[path] = opened
                if len(self.open_failed) > MAX_OPEN_HANDLES:
                    self.open_failed.popitem(last=False)  # its turn then tries the JPEG reader again

    def _keep(self, path: str, handle) -> None:
        self.opens += 1
        self.handles[path] = handle
        if len(self.handles) > MAX_OPEN_HANDLES:
            self._close(self.handles.popitem(last=False)[1])

    def handle(self, slide: IndexedSlide):
        path = slide.info.path
        if path in self.handles:
            self.handles.move_to_end(path)
            return self.handles[path]
        handle = None
        opened = self.opening.pop(path, None) or self.open_failed.pop(path, None)
        if opened is not None and opened.exception() is None:  # waits for an open ahead
            handle = opened.result()
        elif self.reader == "jpeg" or self.reader == "auto" and opened is None:  # (auto: a failed open ahead tried)
            try:
                handle = JpegTiffReader(path, slide.info.dimensions)
            except Exception as e:  # not a JPEG-tiled TIFF (or not a TIFF at all)
                if self.reader == "jpeg":
                    raise SlideError(f"{path}: reader='jpeg' needs a tiled JPEG TIFF ({e})") from None
        if handle is None:
            handle = open_slide(path, self.cache)
        self._keep(path, handle)
        return handle

    def _close(self, handle) -> None:
        if self.ahead is not None:
            self.ahead.settle(handle)
        handle.close()

    def forget(self, path: str) -> None:
        self.open_failed.pop(path, None)
        opened = self.opening.pop(path, None)
        if opened is not None and opened.exception() is None:
            opened.result().close()
        handle = self.handles.pop(path, None)
        if handle is not None:
            try:
                self._close(handle)
            except Exception:  # closing a broken handle may fail too; it is dropped either way
                pass

    @staticmethod
    def region(slide: IndexedSlide, mpp: float, x: int, y: int, size: int) -> tuple[int, int, int, int, int]:
        """(level, lx, ly, side, scale): the square region of the read level that makes the tile at level-0
        (x, y), and the JPEG decode scale (decode_scale) it is read at."""
        plan = slide.plans[mpp]
        lw, lh = slide.info.dimensions[plan.level]
        scale = decode_scale(plan.region, size)
        r = plan.region - plan.region % scale
        return plan.level, min(round(x / plan.downsample), lw - r), min(round(y / plan.downsample), lh - r), r, scale

    def read(self, slide: IndexedSlide, mpp: float, x: int, y: int, size: int, fetched=None) -> np.ndarray:
        """(size, size, 3) uint8 tile at target mpp whose top-left is level-0 (x, y); fetched: a callable giving
        the stored tiles read ahead ({(col, row): stream}, JPEG reader only; it raises their read's error)."""
        level, lx, ly, r, scale = self.region(slide, mpp, x, y, size)
        try:
            handle = self.handle(slide)
            if isinstance(handle, JpegTiffReader):
                region = handle.read(level, lx, ly, r, r, scale=scale, fetched=None if fetched is None else fetched())
            else:
                plan = slide.plans[mpp]
                xy0 = (round(lx * plan.downsample), round(ly * plan.downsample))
                rgba = np.asarray(handle.read_region(xy0, level, (r, r)))  # (r, r, 4)
                region = rgba[..., :3]
                if rgba[..., 3].min() < 255:  # unscanned area: premultiplied transparent -> white
                    region = (region + (255 - rgba[..., 3:])).astype(np.uint8)
        except Exception:
            self.forget(slide.info.path)
            raise
        if region.shape[0] != size:  # the remainder between the level's mpp and the target (antialiased)
            region = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((size, size), Image.BILINEAR))
        return region


@functools.cache
def keep_freed_memory() -> None:
    """Make this process reuse a freed batch's memory for the next one instead of returning it to the system.

    glibc serves allocations above its mmap threshold (32 MB at most by default) with their own mappings and
    unmaps them when freed, so every batch page-faults its fresh output in again, 4 KB at a time, zeroed: for 32
    tiles the views are 46 MB (global) + 28 MB (local), and the faults were 12-16% of a full sample's CPU time.
    With higher mmap and trim thresholds a freed batch stays in the heap; a worker then holds its peak memory
    instead of returning it between batches. Once per loader worker (and bench/data.py's processes); the
    trainer's own process keeps glibc's defaults. No effect off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: up to a batch of 128 tiles' views (154 + 113 MB)
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: free memory kept at the top of the heap
    except (OSError, AttributeError):  # not glibc
        pass


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
                 reader: str = "auto", grid_aligned: bool = True, hsv_filter: bool = False,
                 group_balance: bool = False, transform=None, tiles_per_visit: int = 8, failures_dir=None, excluded=(),
                 read_ahead_bytes: int = 0, read_threads: int = 128, fine_from_step: int | None = None):
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
        self.read_ahead_bytes, self.read_threads = read_ahead_bytes, read_threads
        self.fine_from_step = fine_from_step  # from this step on, each tile is read again at twice the pixels (finetiles.py)
        # slides that killed a reader in an earlier launch (failures.killed_slides): their visits go to another slide
        self.excluded = np.zeros(len(index), bool)
        self.excluded[sorted(excluded)] = True
        self._reset_worker_state()

    def _reset_worker_state(self, name: str = "main") -> None:
        self.reader = None  # opened lazily in the worker that uses it
        self.failures = ReadFailures(self.failures_dir, f"rank{self.rank:05d}-{name}")
        self.reading, self._step = Reading(self.failures_dir, f"rank{self.rank:05d}-{name}"), -1  # for stalls and deaths
        self.dropped = np.zeros(len(self.index), bool)
        self._slide_cumulative = self._substitute_cumulative = None
        self._views: OrderedDict[int, tuple[IndexedSlide, np.ndarray]] = OrderedDict()
        self._draws: dict[int, _Draws] = {}  # step -> its draws made ahead of their reads
        self._epoch = 0  # bumped when a slide is dropped: draws made before it are stale

    @property
    def skipped(self) -> int:
        return sum(self.failures.mine.values())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        self._reset_worker_state(f"worker{info.id:03d}" if info else "main")  # each worker process starts clean
        if info is not None:
            keep_freed_memory()
        steps = worker_steps(self.start_step)
        window = deque(itertools.islice(steps, STEPS_AHEAD + 1))  # this worker's step and its next ones
        while True:  # the next steps' reads start while this one decodes, as many as the storage needs
            step = window.popleft()
            window.append(next(steps))
            yield self.batch(step, upcoming=list(window))

    # -- one step

    def batch(self, step: int, upcoming: int | list[int] | None = None) -> dict:
        """The whole batch of a step; deterministic in (seed, rank, step) barring read errors.

        Tiles come in visits: a slide, then up to `tiles_per_visit` tiles from it (each with its own
        magnification and position), so a handle is opened at most once per visit even when there are
        more slides than open handles; the visits are then shuffled together.

        With read-ahead, the positions are drawn before the tiles are read (_Draws): the reads of the
        next tiles, and of the `upcoming` steps' (this worker's next ones), are in flight while a tile decodes
        (as many as ReadAhead.depth asks for). A draw
        assumes every tile before it is kept; when one is not (a read error, the HSV filter), the draws
        after it are redone from the generator state just after it, so the stream is the same bit for bit
        at any read-ahead."""
        if self.reader is None:
            self.reader = TileReader(self.reader_kind, self.read_ahead_bytes, self.read_threads)
        self._drop_failed_elsewhere()
        self._step = step
        B, T = self.batch_size, self.tile_size
        slot = np.random.default_rng([self.seed, self.rank, step, 2]).permutation(B)  # shuffles the visits together
        # Each tile is copied into its slot as soon as it is decoded, so the decoder's buffer is freed and
        # reused at once: 32 live decoded tiles waiting for a np.stack cost a page fault per 4 KB.
        tiles, locations = np.empty((B, T, T, 3), np.uint8), [None] * B
        steps = [step] + ([] if upcoming is None else [upcoming] if isinstance(upcoming, int) else list(upcoming))
        draws = self._draws_of(step)
        draws.epoch = None  # in use: a slide dropped from now on is handled by redo(), not by drawing anew
        for old in [s for s in self._draws if s not in steps]:
            self._discard(self._draws.pop(old))
        ahead = self.reader.ahead
        while (d := draws.next()) is not None:
            started = time.perf_counter()
            if ahead is not None:
                if ahead.active:
                    self._read_ahead(steps)
                elif d.fetch is None and d.n % TIMED_EVERY == 0:  # read in turn, timed: slow storage turns it on
                    self._submit(d, ahead, now=True)
            index = d.location[0]
            self._note(index)
            try:
                tile = self.reader.read(self.slide(index)[0], *d.location[1:], T, d.fetch)
            except Exception as e:  # any read failure: count, maybe drop, leave this slide
                self._failed(index, e)
                draws.redo(d, same_visit=False)
                continue
            finally:
                if d.tasks is not None:  # the decode's own time per draw: how fast reads must come
                    ahead.consumed(time.perf_counter() - started)
                self._discard_draw(d)
            if self.hsv is not None and d.tries < HSV_TRIES - 1 and not self.hsv.accepts(tile):
                draws.redo(d, same_visit=True)  # another position on the same slide
                continue
            tiles[slot[d.n]], locations[slot[d.n]] = tile, d.location
        del self._draws[step]
        # (B, 3, T, T) as a view of (B, T, T, 3): torch's channels_last layout, no transposing copy
        batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        fine = None  # Gram anchoring at gram.scale 2: the same tiles at twice the pixels, for the Gram teacher's crops
        if self.fine_from_step is not None and step >= self.fine_from_step:
            fine = torch.from_numpy(read_fine_tiles(self.reader, lambda i: self.slide(i)[0], tiles, locations)).permute(0, 3, 1, 2)
        if self.transform is not None:
            generator = views_generator(self.seed, self.rank, step)
            batch = self.transform(batch, generator) if fine is None else self.transform(batch, generator, fine=fine)
        elif fine is not None:  # views made on the device (data.device_augment): the fine tiles travel beside the tiles
            return {"step": step, "tiles": batch, "fine_tiles": fine, "skipped": self.skipped, "locations": locations}
        return {"step": step, "tiles": batch, "skipped": self.skipped, "locations": locations}

    # -- draws made ahead of their reads

    def _draws_of(self, step: int) -> "_Draws":
        draws = self._draws.get(step)
        if draws is None or draws.epoch not in (None, self._epoch):  # a slide was dropped since: draw again
            if draws is not None:
                self._discard(draws)
            draws = self._draws[step] = _Draws(self, step)
        return draws

    def _read_ahead(self, steps: list[int]) -> None:
        """Start the reads of the next draws of these steps, in stream order, while there is room. A draw
        whose slide is not open yet waits for its open (on a read-ahead thread); meanwhile the slides of
        later visits are opened too (ReadAhead.opens of them), so that opens overlap as reads do."""
        ahead, waiting, depth = self.reader.ahead, False, self.reader.ahead.depth
        if len(ahead.pending) >= depth:  # no room (the common case: one draw decoded makes room for one)
            return
        for step in steps:
            draws = self._draws_of(step)
            i = draws.submitted
            while True:
                if i < len(draws.made):
                    d = draws.made[i]
                else:
                    try:
                        d = draws.draw()
                    except Exception:  # e.g. every slide dropped: raised again when this step is made
                        return
                    if d is None:
                        break
                i += 1
                slide = self.slide(d.location[0])[0]
                if waiting:  # only open the slides of later visits
                    if self.reader.open_ahead(slide) and len(self.reader.opening) >= ahead.opens(self.tiles_per_visit):
                        return
                elif self.reader.open_ahead(slide):
                    waiting = True
                elif len(ahead.pending) >= depth or not self._submit(d, ahead):  # (its slide was opened ahead)
                    return
                else:
                    draws.submitted += 1

    def _submit(self, d: "_Draw", ahead: ReadAhead, now: bool = False) -> bool:
        """Start reading the stored tiles draw d needs on the read threads; False when they do not fit in the
        memory bound (the caller checks the depth). now: read them at the decode, as in turn, but timed."""
        index, mpp, x, y = d.location
        slide = self.slide(index)[0]
        self._note(index)
        try:
            handle = self.reader.handle(slide)
        except Exception:  # the read, at its turn, opens again and reports the error
            handle = None
        if not isinstance(handle, JpegTiffReader):  # OpenSlide reads itself
            d.fetch = _read_at_decode
            return True
        level, lx, ly, r, _ = self.reader.region(slide, mpp, x, y, self.tile_size)
        runs = handle.tile_runs(level, lx, ly, r, r)
        if not runs:  # no stored bytes (never scanned): blank
            d.fetch = _read_at_decode
            return True
        if now:
            d.fetch = functools.partial(ahead.read_in_turn, handle, level, runs)
            return True
        nbytes = sum(size for _, size, _ in runs)
        if not ahead.fits(nbytes):
            return False
        d.tasks, d.nbytes = ahead.submit(handle, level, runs, nbytes), nbytes
        d.fetch = functools.partial(ahead.wait, d.tasks)
        return True

    def _discard_draw(self, d: "_Draw") -> None:
        if d.tasks is not None:
            self.reader.ahead.release(d.tasks, d.nbytes)
        d.fetch, d.tasks, d.nbytes = None, None, 0

    def _discard(self, draws: "_Draws") -> None:
        for d in draws.made:
            self._discard_draw(d)
        draws.made.clear()
        draws.submitted = 0

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
        self._epoch += 1
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
        if self.grid_aligned:  # snapped to the stored tiles, unless that moved the top-left off the tissue
            lx, ly = self._place(slide, plan, x / plan.downsample, y / plan.downsample, aligned=True)
            ax, ay = round(lx * plan.downsample), round(ly * plan.downsample)
            if self.index.valid(index, j, int(ay // slide.mask_scale), int(ax // slide.mask_scale)):
                return index, mpp, ax, ay
        lx, ly = self._place(slide, plan, x / plan.downsample, y / plan.downsample, aligned=False)
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

    def _place(self, slide: IndexedSlide, plan: ReadPlan, lx: float, ly: float, aligned: bool) -> tuple[int, int]:
        """Integer top-left in the read level's pixels, inside the level; aligned: inside one stored tile when the
        region fits in one (one JPEG decode per sample), else in as few as it can be (_snap)."""
        lw, lh = slide.info.dimensions[plan.level]
        r = plan.region
        lx, ly = min(int(lx), lw - r), min(int(ly), lh - r)
        tw, th = slide.tile_grid[plan.level] if slide.tile_grid else (0, 0)
        if aligned and tw and th:
            lx, ly = _snap(lx, tw, r, lw), _snap(ly, th, r, lh)
        scale = decode_scale(r, self.tile_size)  # a scaled JPEG decode starts on its grid (< 1 output px away)
        return lx - lx % scale, ly - ly % scale

    def _note(self, index: int) -> None:
        """Say which slide this worker reads now (once per visit), for the trainer to name if it stalls or dies."""
        if self.reading.path is not None and (self._step, index) != self.reading.last:
            self.reading.note(self._step, index, self.index.path(index))

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
            self._substitute_cumulative = np.cumsum(weights * ~self.excluded) if self.excluded.any() else None
        index = _pick(self._slide_cumulative, rng)
        if self.excluded[index]:  # it killed a reader: another slide, drawn with a generator of its own, so that
            # `rng` moves on as it would have and every other draw of the stream stays the same
            if self._substitute_cumulative[-1] <= 0:
                raise SlideError(f"every slide of {self.index.folder} that serves the run's mpps killed a reader "
                                 "(listed in read_failures/ of the run folder)")
            state = rng.bit_generator.state["state"]["state"]  # PCG64's 128-bit state: read, not advanced
            index = _pick(self._substitute_cumulative, np.random.default_rng([state >> 64, state & (2**64 - 1), 3]))
        return index


@dataclass
class _Draw:
    """One drawn tile and where the drawing was: slot n of the batch, `left` tiles left in its visit (this
    one included), `tries` HSV draws before it, the generator state just after it."""

    location: tuple[int, float, int, int]  # (slide index, mpp, x, y)
    n: int
    left: int
    tries: int
    state: dict
    fetch: object = None  # once submitted: a callable giving its stored tiles' streams (TileReader.read's fetched)
    tasks: tuple | None = None  # its reads in flight (_Task), and their bytes
    nbytes: int = 0


class _Draws:
    """The draws of one step, made ahead of the reads, each assuming every tile before it is kept."""

    def __init__(self, ds: SlideTileDataset, step: int):
        self.ds, self.epoch = ds, ds._epoch
        self.rng = np.random.default_rng([ds.seed, ds.rank, step])
        self.n = self.left = self.tries = 0  # tiles kept so far; left in this visit; HSV draws of this tile
        self.index = -1  # the visit's slide
        self.made: deque[_Draw] = deque()  # drawn, not yet read
        self.submitted = 0  # the first `submitted` of `made` have their reads in flight

    def draw(self) -> _Draw | None:
        """The next draw, or None when the batch is full."""
        ds = self.ds
        if self.n >= ds.batch_size:
            return None
        if self.left == 0:  # a new visit
            self.index = ds._draw_slide(self.rng)
            self.left = min(ds.tiles_per_visit, ds.batch_size - self.n)
        location = ds.draw_tile(self.index, self.rng)
        d = _Draw(location, self.n, self.left, self.tries, self.rng.bit_generator.state)
        self.n, self.left, self.tries = self.n + 1, self.left - 1, 0
        self.made.append(d)
        return d

    def next(self) -> _Draw | None:
        if not self.made and self.draw() is None:
            return None
        self.submitted = max(0, self.submitted - 1)
        return self.made.popleft()

    def redo(self, d: _Draw, same_visit: bool) -> None:
        """Tile d was not kept: forget the draws after it and draw again from just after it, either the same
        tile's next try on the same slide (HSV filter) or a new visit (read failure)."""
        self.ds._discard(self)
        self.rng.bit_generator.state = d.state
        self.n, self.index = d.n, d.location[0]
        self.left, self.tries = (d.left, d.tries + 1) if same_visit else (0, 0)


def _read_at_decode() -> None:
    """fetched of a draw whose decode reads its own tiles (OpenSlide, a slide that failed to open, a blank tile)."""
    return None


def _pick(cumulative: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to its weight, given the cumulative weights."""
    return int(cumulative.searchsorted(rng.random() * cumulative[-1], side="right"))


def _snap(start: int, tile: int, region: int, limit: int) -> int:
    """Move a region start so that [start, start + region) covers as few stored tiles as it can (one when
    region <= tile, two a side when region <= 2 tiles, ...), spreading the starts evenly over the offsets that
    keep it there: the place of start + half the move in its stored tile, uniform in [0, tile), maps onto [0,
    slack] (33 offsets, each 1/33, for 224 px in 256 px tiles). The half move (111 px there) centres the moves
    on the drawn start (-111 to +111 px, mean 0): mapping the start itself moved every tile towards its stored
    tile's corner (up to 223 px, 111 on average, always up and left), which near the tissue's top and left
    edges moved tiles off it (bench/grid.py). No offset scheme with one decode covers a stored tile's edge
    pixels as often as its middle ones (1 draw in 33 against all)."""
    slack = -(-region // tile) * tile - region  # room left in the fewest whole stored tiles that hold the region
    shifted = start + (tile - slack - 1) // 2
    col = shifted // tile
    start = col * tile + (shifted - col * tile) * (slack + 1) // tile
    return max(0, min(start, limit - region))
