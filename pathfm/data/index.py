"""The slide index: what sampling needs from every slide, computed once, kept on disk, memory-mapped.

    python -m pathfm.data.index manifest.csv -o /data/index/tcga --workers 32             # one machine
    python launch/index.py manifest.csv -o /data/index/tcga --tasks 16 --profile gpu-8x          # SLURM array
    python launch/train.py --config vitl14.yaml data.index=/data/index/tcga

Building opens every slide once, resolves its mpp, loads or computes its tissue mask and lists, for
each target mpp, the mask cells where the top-left of a tile footprint >= the tissue threshold may
lie. Those cells are stored as runs along mask rows (row, first column, cumulative count): 8 bytes a
run, about 3 runs per mask row. A position is one binary search in a memory-mapped array, whatever
the number of slides, and every worker and rank on a node shares the same page-cache pages instead
of holding a copy.

Folder layout (all arrays .npy, opened with mmap_mode="r"):
    index.json     format, sampling parameters, manifest identity, counts; written last (= complete)
    slides.npy     one record per usable slide: manifest row, mpp, weight, group, mask scale, ...
    levels.npy     pyramid levels of all slides: size, downsample, stored tile size
    plans.npy      (slides, mpps, 2) int32: read level and region side per target mpp (-1: not served)
    segments.npy   (slides, mpps + 1) int64: runs of slide s, mpp j are runs[segments[s, j]:segments[s, j+1]]
    runs.npy       (R, 2) uint16 (row, column) of each run's first valid cell
    ends.npy       (R,) uint32: valid cells of the run's segment up to and including the run
    paths.bin      UTF-8 paths, sliced by slides["path_start"], slides["path_len"]
    unusable.csv   manifest row, path, reason: slides the build could not use
A build in progress keeps one journal per part under parts/ (per finished slide a small pickled header
and its runs, appended and flushed), so a killed build continues where it stopped.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import hashlib
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openslide

from pathfm.data.slides import (MASK_MAX_SIDE, MASK_MPP, MASK_VERSION, ReadPlan, SlideEntry, SlideError, SlideInfo,
                                file_identity, load_or_compute_tissue_mask, mask_scale, open_slide, plan_read,
                                read_manifest, slide_mpp, truncated, usable_mpps)

DESCRIBE_TIMEOUT_S = 120.0  # default limit for opening, reading and describing one slide in the build (data.index_timeout_s)
FORMAT = 2  # bump when the folder layout changes (it is part of cached index folders' names)

SLIDE_DTYPE = np.dtype([("row", "i8"), ("mpp", "f8"), ("weight", "f8"), ("group", "i4"), ("mask_scale", "f8"),
                        ("level_start", "i8"), ("n_levels", "i4"), ("path_start", "i8"), ("path_len", "i4")])
LEVEL_DTYPE = np.dtype([("width", "i8"), ("height", "i8"), ("downsample", "f8"), ("tile_w", "i4"), ("tile_h", "i4")])


class SlideIndexError(SlideError):
    """An index that cannot be used as asked: missing, incomplete, or built for other parameters."""


@dataclass(frozen=True)
class IndexParams:
    """What an index is valid for. An index built with other values is refused, the difference named."""

    tile_size: int
    mpps: tuple[float, ...]
    tissue_threshold: float
    mask_version: int = MASK_VERSION
    mask_mpp: float = MASK_MPP
    mask_max_side: int = MASK_MAX_SIDE

    def as_dict(self) -> dict:
        return {**asdict(self), "mpps": [float(m) for m in self.mpps]}


def manifest_identity(entries: list[SlideEntry]) -> str:
    """sha256 of the rows as read (path, mpp, weight, group): the same slides in another file match."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\t{e.mpp}\t{e.weight}\t{e.group}\n".encode())
    return h.hexdigest()


def index_folder(cache_dir, entries: list[SlideEntry], params: IndexParams, stem: str = "manifest") -> Path:
    """Where an index of these rows and parameters lives in a cache: keyed by both."""
    key = hashlib.sha256(f"{FORMAT}|{manifest_identity(entries)}|{json.dumps(params.as_dict())}".encode()).hexdigest()
    return Path(cache_dir) / "index" / f"{stem}-{key[:16]}"


# ---------------------------------------------------------------- one slide


def integral_image(mask: np.ndarray) -> np.ndarray:
    """(h + 1, w + 1) int32: entry (r, c) is the tissue count of mask[:r, :c]."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int32)
    integral[1:, 1:] = np.asarray(mask, dtype=np.int32).cumsum(0).cumsum(1)
    return integral


def valid_runs(integral: np.ndarray, window: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-left mask cells whose window x window footprint is >= threshold tissue, as runs along rows.

    Takes the mask's integral image (computed once per slide, shared by every mpp), so it costs
    O(h * w) whatever the window. Returns (rows, first columns, lengths), in row-major order.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    if window > h or window > w:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    k = window
    sums = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]  # (h-k+1, w-k+1)
    ok = np.zeros((sums.shape[0], sums.shape[1] + 2), np.int8)  # a False column either side closes every run
    ok[:, 1:-1] = sums >= threshold * k * k
    edges = np.diff(ok, axis=1)  # (h-k+1, w-k+2): +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major, so the i-th end closes the i-th start
    return rows, starts, ends - starts


def mask_window(footprint: float, scale: float) -> int:
    """Side, in mask cells, of a tile whose side is `footprint` level-0 pixels."""
    return max(1, round(footprint / scale))


def describe_slide(row: int, entry: SlideEntry, params: IndexParams, mask_dir: str) -> dict:
    """Everything the index keeps about one manifest row, or {"row", "path", "reason"} when unusable."""
    try:
        return _describe(row, entry, params, mask_dir)
    except SlideError as e:
        return {"row": row, "path": entry.path, "reason": str(e)}
    except Exception as e:  # a slide must never stop the build of the other 29,999: record it
        return {"row": row, "path": entry.path, "reason": f"{entry.path}: {type(e).__name__}: {e}"}


def _describe(row: int, entry: SlideEntry, params: IndexParams, mask_dir: str) -> dict:
    size, mpps = params.tile_size, list(params.mpps)
    slide = open_slide(entry.path)
    cut = truncated(entry.path)  # OpenSlide opens a slide whose tiles are cut off; its reads would all fail
    if cut:
        slide.close()
        raise SlideError(cut)
    try:
        mpp = slide_mpp(slide, entry.path, entry.mpp)
        info = SlideInfo(entry.path, mpp, list(slide.level_dimensions),
                         [float(d) for d in slide.level_downsamples], file_identity(entry.path))
        servable = usable_mpps(info, mpps, size)
        if not servable:
            raise SlideError(f"{entry.path}: slide ({info.dimensions[0][0]}x{info.dimensions[0][1]} px "
                             f"at {mpp} µm/px) is smaller than a {size} px tile at every requested "
                             f"mpp {mpps}, or they are all finer than its level 0")
        mask, _ = load_or_compute_tissue_mask(info, mask_dir, slide)
        grid = [(int(slide.properties.get(f"openslide.level[{i}].tile-width", 0)),
                 int(slide.properties.get(f"openslide.level[{i}].tile-height", 0)))
                for i in range(len(info.dimensions))]
    except openslide.OpenSlideError as e:
        raise SlideError(f"{entry.path}: unreadable slide ({e})") from None
    finally:
        slide.close()
    scale, integral = mask_scale(info), integral_image(mask)
    plans, runs = [], []
    for m in mpps:
        plan = plan_read(info, m, size) if m in servable else None
        r = valid_runs(integral, mask_window(plan.footprint, scale), params.tissue_threshold) if plan else None
        if r is None or r[0].size == 0:
            plan, r = None, (np.zeros(0, np.int64),) * 3
        if r[0].size and max(r[0].max(), r[1].max()) >= 2**16:
            raise SlideError(f"{entry.path}: tissue mask larger than 65536 cells a side")
        plans.append((plan.level, plan.region) if plan else (-1, 0))
        runs.append((np.stack(r[:2], 1).astype(np.uint16), np.cumsum(r[2]).astype(np.uint32)))  # (n, 2), (n,)
    if all(p[0] < 0 for p in plans):
        raise SlideError(f"{entry.path}: no tissue: no {size} px tile at mpp {servable} is "
                         f">= {params.tissue_threshold:.0%} tissue on its mask")
    return {"row": row, "path": entry.path, "mpp": mpp, "weight": entry.weight, "group": entry.group,
            "mask_scale": scale, "levels": [(w, h, ds, tw, th) for (w, h), ds, (tw, th)
                                            in zip(info.dimensions, info.downsamples, grid)],
            "plans": plans, "runs": runs}


# ---------------------------------------------------------------- the index, read side


@dataclass
class IndexedSlide:
    """One slide as the reader needs it: small, rebuilt from the index arrays on demand."""

    info: SlideInfo
    mask_scale: float
    plans: dict[float, ReadPlan]  # the target mpps this slide serves (with tissue)
    tile_grid: list[tuple[int, int]]  # stored tile (w, h) per level

    @property
    def mpps(self) -> list[float]:
        return list(self.plans)


class SlideIndex:
    """A built index folder, memory-mapped. Cheap to open and to pickle (workers reopen the files)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta_path = self.folder / "index.json"
        if not meta_path.is_file():
            hint = " (a build is in progress or was stopped: run it again to finish)" if (self.folder / "parts").is_dir() else ""
            raise SlideIndexError(f"{self.folder}: not a slide index, no index.json{hint}; build one with "
                              f"`python -m pathfm.data.index MANIFEST -o {self.folder}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise SlideIndexError(f"{self.folder}: index format {self.meta.get('format')}, this pathfm reads {FORMAT}; rebuild it")
        self.params = IndexParams(**{**self.meta["params"], "mpps": tuple(self.meta["params"]["mpps"])})
        self.groups = self.meta["groups"]
        self._open()

    def _open(self):
        # plain ndarray views of the mapped files: np.memmap's own indexing costs microseconds a call
        load = lambda name: np.load(self.folder / name, mmap_mode="r").view(np.ndarray)  # noqa: E731
        self.slides, self.levels, self.plans = load("slides.npy"), load("levels.npy"), load("plans.npy")
        self.segments, self.runs, self.ends = load("segments.npy"), load("runs.npy"), load("ends.npy")
        self._paths = np.memmap(self.folder / "paths.bin", np.uint8, "r") if self.meta["path_bytes"] else b""

    def __getstate__(self):  # send the folder, not the mapped arrays
        return {"folder": self.folder, "meta": self.meta, "params": self.params, "groups": self.groups}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.slides)

    def check(self, params: IndexParams, manifest_id: str | None = None) -> None:
        """Refuse an index built for other sampling parameters or another manifest, naming each difference."""
        have, want = self.params.as_dict(), params.as_dict()
        diffs = [f"{k}: index {have[k]} vs run {want[k]}" for k in have if k != "mpps" and have[k] != want[k]]
        missing = [m for m in want["mpps"] if m not in have["mpps"]]
        if missing:
            diffs.append(f"mpps {missing} of the run are not in the index's {have['mpps']}")
        if manifest_id is not None and manifest_id != self.meta["manifest"]["sha256"]:
            diffs.append(f"manifest: index built from {self.meta['manifest']['path']} "
                         f"({self.meta['manifest']['rows']} rows), the run's has other rows")
        if diffs:
            raise SlideIndexError(f"slide index {self.folder} does not match this run: " + "; ".join(diffs)
                              + ". Rebuild it (python -m pathfm.data.index) or point data.index at a matching one")

    def path(self, i: int) -> str:
        s = self.slides[i]
        return bytes(self._paths[s["path_start"]: s["path_start"] + s["path_len"]]).decode()

    def slide(self, i: int) -> IndexedSlide:
        s = self.slides[i]
        lv = self.levels[s["level_start"]: s["level_start"] + s["n_levels"]]
        info = SlideInfo(self.path(i), float(s["mpp"]), [(int(w), int(h)) for w, h in zip(lv["width"], lv["height"])],
                         [float(d) for d in lv["downsample"]], "")
        plans = {}
        for j, m in enumerate(self.params.mpps):
            level, region = (int(v) for v in self.plans[i, j])
            if level >= 0:
                ds = info.downsamples[level]
                plans[m] = ReadPlan(level, ds, region, region * ds)
        return IndexedSlide(info, float(s["mask_scale"]), plans,
                            [(int(w), int(h)) for w, h in zip(lv["tile_w"], lv["tile_h"])])

    def mpp_column(self, mpp: float) -> int:
        return self.params.mpps.index(mpp)

    def cell(self, i: int, j: int, rng: np.random.Generator) -> tuple[int, int]:
        """A uniformly drawn valid mask cell (row, column) of slide i at mpp column j: O(log runs)."""
        a, b = self.segments[i, j: j + 2].tolist()
        ends = self.ends[a:b]  # a view of the mapped file: the search touches a few pages
        target = int(rng.random() * int(ends[-1]))  # uniform over the segment's cells
        k = int(ends.searchsorted(np.uint32(target), side="right"))  # its run (a uint32 key: no casting, 4x faster)
        row, col = self.runs[a + k].tolist()
        return row, col + target - (int(ends[k - 1]) if k else 0)

    def valid(self, i: int, j: int, row: int, col: int) -> bool:
        """Whether mask cell (row, col) of slide i may hold a tile's top-left at mpp column j: O(log runs)."""
        a, b = self.segments[i, j: j + 2].tolist()
        # bisect on memoryviews of the strided columns: searchsorted would first copy the column (9 -> 2.7 µs a call)
        runs = self.runs[a:b]
        rows = memoryview(runs[:, 0])
        lo = bisect.bisect_left(rows, row)
        hi = bisect.bisect_right(rows, row, lo)  # the row's runs are [lo, hi)
        k = lo + bisect.bisect_right(memoryview(runs[lo:hi, 1]), col) - 1  # the last run starting at or before col
        if k < lo:
            return False
        length = int(self.ends[a + k]) - (int(self.ends[a + k - 1]) if k else 0)
        return col < int(self.runs[a + k, 1]) + length

    def cells(self, i: int, j: int) -> np.ndarray:
        """Every valid cell of slide i at mpp column j as (n, 2) (row, column): for tests and tools."""
        a, b = int(self.segments[i, j]), int(self.segments[i, j + 1])
        lengths = np.diff(self.ends[a:b].astype(np.int64), prepend=0)
        rows = np.repeat(self.runs[a:b, 0].astype(np.int64), lengths)
        starts = np.repeat(self.runs[a:b, 1].astype(np.int64), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.stack([rows, starts + offsets], 1)

    def unusable(self) -> list[dict]:
        path = self.folder / "unusable.csv"
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


# ---------------------------------------------------------------- building


def write_record(f, record: dict) -> None:
    """Append one slide to a journal: a small pickled header (everything but the runs, their counts and
    the payload's length), then the runs as a pickled payload. Resuming and the merge read headers and
    seek past payloads, so they read kilobytes a slide, not the runs (about 0.2 MB a TCGA slide)."""
    runs = record.get("runs", [])
    payload = pickle.dumps(runs, protocol=5) if runs else b""
    header = {k: v for k, v in record.items() if k != "runs"} | {"n_runs": [len(e) for _, e in runs], "payload": len(payload)}
    pickle.dump(header, f, protocol=5)
    f.write(payload)
    f.flush()


def _journal(path: Path):
    """Yields (header, payload offset, end) of each complete record; a killed writer leaves a torn last
    one (a cut header or a short payload), not yielded."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        while True:
            try:
                header = pickle.load(f)
            except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError):
                return
            at = f.tell()
            if not isinstance(header, dict) or "payload" not in header or at + header["payload"] > size:
                return
            f.seek(at + header["payload"])
            yield header, at, at + header["payload"]


def _done_rows(parts: Path) -> set[int]:
    return {h["row"] for p in sorted(parts.glob("*.journal")) for h, _, _ in _journal(p)}


def prepare_parts(out: Path, params: IndexParams, manifest_id: str) -> Path:
    """The parts folder of a build, created or reused; a build for other parameters is refused."""
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    stamp = {"params": params.as_dict(), "manifest": manifest_id}
    stamp_path = parts / "build.json"
    if stamp_path.exists():
        old = json.loads(stamp_path.read_text())
        if old != stamp:
            raise SlideIndexError(f"{out}: holds a build for other parameters or another manifest "
                              f"({old['params']} vs {stamp['params']}); use another -o or delete {parts}")
    else:
        _atomic(stamp_path, lambda f: f.write(json.dumps(stamp).encode()))  # ranks may race here: same content
    return parts


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_part(entries: list[SlideEntry], out, params: IndexParams, *, part: str = "local", share: tuple[int, int] = (0, 1),
               workers: int = 0, mask_dir=None, progress: bool = True, timeout_s: float = DESCRIBE_TIMEOUT_S) -> int:
    """Describe this part's share of the manifest (rows i with i % n == k for share (k, n)) that no
    journal holds yet, with `workers` processes (0: one per CPU), appending to parts/<part>.journal.
    A slide that takes longer than timeout_s, or kills its process, is listed unusable with the reason
    (timeout_s=0: no limit, and with workers=1 the slides are described in this process).
    Returns the number of slides described now."""
    out = Path(out)
    parts = prepare_parts(out, params, manifest_identity(entries))
    done = _done_rows(parts)
    k, n = share
    todo = [(i, e) for i, e in enumerate(entries) if i % n == k and i not in done]
    if not todo:
        return 0
    journal = parts / f"{part}.journal"
    if journal.exists():  # drop a torn last record before appending after it
        os.truncate(journal, max((end for _, _, end in _journal(journal)), default=0))
    mask_dir = str(mask_dir or out / "masks")
    workers = min(workers or cpu_count(), max(1, len(todo) // 2))  # one or two slides: no pool to start
    args = [(i, e, params, mask_dir) for i, e in todo]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"indexing slides ({part})", unit="slide", disable=not progress,
               mininterval=1.0, file=sys.stderr, dynamic_ncols=True)
    with open(journal, "ab") as f:
        def write(record):
            write_record(f, record)
            bar.update(1)
        if workers <= 1 and not timeout_s:  # in this process: no time limit can be kept, nothing to fork
            for a in args:
                write(describe_slide(*a))
        else:
            describe_in_processes(args, workers, timeout_s, write)
    bar.close()
    return len(todo)


def describe_in_processes(args: list[tuple], workers: int, timeout_s: float, write) -> None:
    """describe_slide(*a) for each a in `args` in `workers` forked processes, one slide at a time each,
    write(record) as they finish. A slide that takes longer than timeout_s (a stalled mount, a FIFO) gets its
    process killed; a process that dies (OOM killer, a segfault in a C library) is noticed at once. Either way
    the slide is recorded unusable with the reason, a fresh process takes its place and the build goes on.
    (multiprocessing.Pool cannot do this: its imap waits forever for the task of a killed worker.)"""
    # fork: workers start in 0.1 s. spawn and forkserver re-import the main module (the trainer's or a
    # launcher's, with torch): 3.5 s a worker, measured. The workers use numpy and OpenSlide only (no CUDA,
    # no torch threads), which is what makes forking safe here.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending, idle, running = list(reversed(args)), [], {}  # running: connection -> (process, args, deadline)

    def start():
        ours, theirs = context.Pipe()
        process = context.Process(target=_describe_loop, args=(theirs,), daemon=True, name="pathfm-index-reader")
        process.start()
        theirs.close()
        return process, ours

    def unusable(a, reason):
        row, entry = a[0], a[1]
        write({"row": row, "path": entry.path, "reason": f"{entry.path}: {reason}"})

    try:
        idle = [start() for _ in range(min(workers, len(args)))]
        while pending or running:
            while idle and pending:
                process, conn = idle.pop()
                if not process.is_alive():  # killed while it waited for work: no slide's doing
                    process.join(timeout=1.0)
                    conn.close()
                    process, conn = start()
                a = pending.pop()
                conn.send(a)
                running[conn] = (process, a, time.monotonic() + timeout_s if timeout_s else math.inf)
            soonest = min(deadline for _, _, deadline in running.values())
            wait_s = None if soonest == math.inf else max(0.0, soonest - time.monotonic())
            mp.connection.wait([*running, *(p.sentinel for p, _, _ in running.values())], timeout=wait_s)
            for conn, (process, a, deadline) in list(running.items()):
                record = None
                if conn.poll():  # a result (read it before asking whether the process still lives)
                    try:
                        record = conn.recv()
                    except (EOFError, OSError):
                        pass  # it died while sending
                if record is not None:
                    del running[conn]
                    write(record)
                    idle.append((process, conn))
                    continue
                if process.is_alive() and time.monotonic() < deadline:
                    continue
                del running[conn]
                if process.is_alive():  # over its time: it will not come back (it may never: a read in D state)
                    process.kill()
                    reason = f"timed out after {timeout_s:g} s while describing it (limit: --timeout / data.index_timeout_s)"
                else:
                    code = process.exitcode
                    reason = (f"reader process died: signal {-code} ({signal.Signals(-code).name}) while describing it"
                              if code is not None and code < 0 else f"reader process exited with status {code} while describing it")
                process.join(timeout=1.0)
                conn.close()
                unusable(a, reason)
                if pending:
                    idle.append(start())
    finally:
        for process, conn in idle:
            try:
                conn.send(None)  # done: exit
            except OSError:
                pass
        for process, conn in [*idle, *((p, c) for c, (p, _, _) in running.items())]:
            process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=1.0)
            conn.close()


def _describe_loop(conn) -> None:
    """A build worker: describe the slides it is sent, one at a time, until it is sent None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the workers
    while True:
        try:
            a = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if a is None:
            return
        conn.send(describe_slide(*a))


def merge_parts(entries: list[SlideEntry], out, params: IndexParams, *, manifest_path: str = "") -> "SlideIndex":
    """Assemble the journals of every part into the index arrays; index.json is written last.

    Streams: one pass reads the records' headers, a second copies each slide's runs into the mapped
    output arrays, so memory stays bounded for 100,000 slides (their runs can be GBs)."""
    out = Path(out)
    parts = out / "parts"
    where, small = {}, {}  # row -> (journal, payload offset, payload bytes); row -> its header
    for p in sorted(parts.glob("*.journal")):
        for header, at, end in _journal(p):
            where[header["row"]] = (p, at, end - at)
            small[header["row"]] = header
    missing = [i for i in range(len(entries)) if i not in small]
    if missing:
        raise SlideIndexError(f"{out}: {len(missing)} of {len(entries)} manifest rows are not indexed yet "
                              f"(first: row {missing[0] + 2}, {entries[missing[0]].path}); run the build again to finish them")
    usable = [small[i] for i in range(len(entries)) if "reason" not in small[i]]
    bad = [small[i] for i in range(len(entries)) if "reason" in small[i]]
    if not usable:
        reasons = "; ".join(r["reason"] for r in bad[:5])
        raise SlideError(f"no usable slide among {len(entries)} manifest entries: {reasons}")
    groups = sorted({r["group"] for r in usable})
    group_id = {g: i for i, g in enumerate(groups)}
    n_mpps = len(params.mpps)
    slides = np.zeros(len(usable), SLIDE_DTYPE)
    levels = np.zeros(sum(len(r["levels"]) for r in usable), LEVEL_DTYPE)
    plans = np.zeros((len(usable), n_mpps, 2), np.int32)
    counts = np.array([r["n_runs"] for r in usable], np.int64).reshape(-1)  # runs per (slide, mpp), row-major
    starts = np.concatenate([[0], np.cumsum(counts)])
    segments = np.stack([starts[s * n_mpps: (s + 1) * n_mpps + 1] for s in range(len(usable))])
    path_bytes = [r["path"].encode() for r in usable]
    path_start = np.cumsum([0] + [len(p) for p in path_bytes])
    level_start = 0
    for s, r in enumerate(usable):
        slides[s] = (r["row"], r["mpp"], r["weight"], group_id[r["group"]], r["mask_scale"], level_start,
                     len(r["levels"]), path_start[s], len(path_bytes[s]))
        levels[level_start: level_start + len(r["levels"])] = r["levels"]
        level_start += len(r["levels"])
        plans[s] = r["plans"]
    arrays = {"slides.npy": slides, "levels.npy": levels, "plans.npy": plans, "segments.npy": segments}
    for name, array in arrays.items():
        _atomic(out / name, lambda f, a=array: np.save(f, a))
    _copy_runs(out, usable, where, int(starts[-1]))
    _atomic(out / "paths.bin", lambda f: f.write(b"".join(path_bytes)))
    _atomic(out / "unusable.csv", lambda f: _write_unusable(f, bad, entries))
    meta = {"format": FORMAT, "params": params.as_dict(), "groups": groups, "path_bytes": int(path_start[-1]),
            "manifest": {"path": str(manifest_path), "rows": len(entries), "sha256": manifest_identity(entries)},
            "slides": len(usable), "unusable": len(bad), "runs": int(starts[-1]),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    _atomic(out / "index.json", lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    shutil.rmtree(parts)  # every record is in the arrays now
    return SlideIndex(out)


def _copy_runs(out: Path, usable: list[dict], where: dict, total: int) -> None:
    """runs.npy and ends.npy, filled slide by slide from the journals (slides in manifest order)."""
    tmp_runs, tmp_ends = _temporary(out / "runs.npy"), _temporary(out / "ends.npy")
    runs = np.lib.format.open_memmap(tmp_runs, "w+", np.uint16, (total, 2))
    ends = np.lib.format.open_memmap(tmp_ends, "w+", np.uint32, (total,))
    handles, at = {}, 0
    for r in usable:
        path, offset, length = where[r["row"]]
        f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
        f.seek(offset)
        for cells, cum in pickle.loads(f.read(length)) if length else []:
            runs[at: at + len(cells)] = cells
            ends[at: at + len(cells)] = cum
            at += len(cells)
    for f in handles.values():
        f.close()
    runs.flush()
    ends.flush()
    del runs, ends
    os.replace(tmp_runs, out / "runs.npy")
    os.replace(tmp_ends, out / "ends.npy")


def _write_unusable(f, bad, entries):
    import io

    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["row", "path", "reason"])
    for r in bad:
        w.writerow([r["row"] + 2, r["path"], r["reason"]])  # manifest row as a spreadsheet shows it
    f.write(text.getvalue().encode())


def _temporary(path: Path) -> Path:
    """A fresh name beside `path`, unique across processes, threads and nodes (pids repeat across nodes)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npy", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it private; an index is shared with the lab
    return Path(name)


def _atomic(path: Path, write) -> None:
    """Write through a unique temporary file and rename: readers see the old file or the new one."""
    tmp = _temporary(path)
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def build_index(entries: list[SlideEntry], out, params: IndexParams, *, workers: int = 0, mask_dir=None,
                manifest_path: str = "", progress: bool = True, timeout_s: float = DESCRIBE_TIMEOUT_S) -> SlideIndex:
    """Build (or finish, or just open) the index of `entries` in `out` on this machine."""
    out = Path(out)
    if (out / "index.json").exists():
        index = SlideIndex(out)
        index.check(params, manifest_identity(entries))
        return index
    build_part(entries, out, params, workers=workers, mask_dir=mask_dir, progress=progress, timeout_s=timeout_s)
    return merge_parts(entries, out, params, manifest_path=manifest_path)


def summary(index: SlideIndex) -> str:
    m = index.meta
    per_mpp = {mpp: int((index.plans[:, j, 0] >= 0).sum()) for j, mpp in enumerate(index.params.mpps)}
    return (f"slide index {index.folder}: {m['slides']} usable slides of {m['manifest']['rows']} "
            f"({m['unusable']} unusable, listed in {index.folder / 'unusable.csv'}); slides per mpp {per_mpp}; "
            f"{m['runs']} runs, {sum(p.stat().st_size for p in index.folder.glob('*.*') if p.is_file()) / 1e6:.1f} MB")


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    from pathfm.config import DataConfig

    d = DataConfig()
    p = argparse.ArgumentParser(description="Build the slide index of a manifest on this machine (resumable). "
                                            "On SLURM: python launch/index.py (the same options).")
    add_build_args(p, d)
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    a = p.parse_args(argv)
    try:
        entries = read_manifest(a.manifest)
        start = time.perf_counter()
        index = build_index(entries, a.output, params_from_args(a), workers=a.workers, mask_dir=a.mask_dir,
                            manifest_path=a.manifest, timeout_s=a.timeout)
    except SlideError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary(index)}; {time.perf_counter() - start:.1f} s")
    return 0


def add_build_args(p: argparse.ArgumentParser, d) -> None:
    """The options shared with launch/index.py; defaults from the config's data section."""
    p.add_argument("manifest")
    p.add_argument("-o", "--output", required=True, help="index folder")
    p.add_argument("--tile-size", type=int, default=d.tile_size)
    p.add_argument("--mpps", type=float, nargs="+", default=d.mpps)
    p.add_argument("--tissue-threshold", type=float, default=d.tissue_threshold)
    p.add_argument("--mask-dir", default=None, help="tissue-mask cache (default: INDEX/masks)")
    p.add_argument("--timeout", type=float, default=d.index_timeout_s,
                   help="seconds one slide may take to open, read and describe; a slide over it is listed unusable "
                        "(0: no limit)")


def params_from_args(a) -> IndexParams:
    return IndexParams(a.tile_size, tuple(a.mpps), a.tissue_threshold)


if __name__ == "__main__":
    sys.exit(main())
