"""Embed every tissue tile of every slide of a cohort: one HDF5 file per slide, as MIL codebases read them.

    python -m eval.embed_slides --manifest slides.csv --ckpt runs/x/export --mpp 0.5 --out features/x
    python -m eval.embed_slides --index /data/index/tcga --timm local-dir:/models/UNI --mpp 0.5 --out features/uni
    python launch/eval.py --embed --index /data/index/tcga --ckpt runs/x/export --mpp 0.5 --out features/x \\
        --tasks 16 --profile gpu-8x                                     # a SLURM array: each task its own slides
    -> features/x/<slide>.h5   features (N, D) float32, coords (N, 2) int64 level-0 (x, y) of each tile's top-left
       features/x/embed.json   the settings every file was made with (model, mpp, tile size, embedding, index)
       features/x/failed.csv   slides that could not be embedded, with the reason (failed-task00003.csv per array task)

Which tiles: the training index's tissue masks and threshold (pathfm.data.index, built once per cohort and shared
with training; --manifest builds it into --index or <out>/index if there is none). A slide is cut into a
non-overlapping grid of tiles at the read level the index plans for the mpp; a tile is kept when its top-left mask
cell is one where the sampler may place a tile (>= the tissue threshold under its footprint), so exactly the tissue
training draws from. --max-tiles N keeps a seeded random N of them. Tiles are read with the training reader
(the JPEG-tile fast path where the file allows, OpenSlide otherwise) on --read-threads threads (or, with 0,
--num-workers DataLoader processes), each stored JPEG tile decoded once per batch.

Each file is written to a temporary name and renamed: a file that exists is complete. A rerun skips them, so a
killed run loses only the slides in flight; a slide whose read fails is listed in failed.csv and the run goes on.

File layout (CLAM / TRIDENT / Patho-Bench read `features` and `coords`; TRIDENT's slide encoders read
coords.attrs["patch_size_level0"], CLAM's patching writes coords.attrs["patch_size"] and ["patch_level"]):
    coords.attrs: patch_size (tile px fed to the model), patch_level (pyramid level read), patch_size_level0
                  (tile side in level-0 px), level0_magnification, target_magnification (10 / mpp), mpp
    file attrs:   mpp, slide_mpp (level 0), tile_size, patch_size_level0, embedding, model (JSON), model_source,
                  pathfm_version, slide (path), tissue_threshold, max_tiles
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python eval/embed_slides.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 8  # tiles a side of the blocks a slide's grid is walked in (a 64-tile batch: one block)
SLIDE_EMBEDDINGS = ("cls", "mean", "cls_mean")  # per tile vectors; `patches` would be (N, tokens, D) a slide


def grid_coords(index, i: int, mpp: float, tile_size: int, max_tiles: int | None = None, seed: int = 0) -> np.ndarray:
    """(n, 2) int64 level-0 (x, y) of slide i's tissue tiles on a non-overlapping grid at `mpp`, in blocks.

    The grid is laid in the read level's pixels with the side the reader reads there (TileReader.region), so
    neighbouring tiles touch and never overlap; a tile is tissue when its top-left mask cell is one of the
    index's valid cells (the sampler's criterion). Empty when the slide does not serve `mpp`."""
    from pathfm.data.sampler import TileReader

    view = index.slide(i)
    if mpp not in view.plans:
        return np.zeros((0, 2), np.int64)
    plan = view.plans[mpp]
    _, _, _, side, _ = TileReader.region(view, mpp, 0, 0, tile_size)  # region side read, aligned to the decode scale
    lw, lh = view.info.dimensions[plan.level]
    lx, ly = np.meshgrid(np.arange(lw // side) * side, np.arange(lh // side) * side)  # read-level top-lefts
    x0 = np.round(lx.ravel() * plan.downsample).astype(np.int64)  # level-0 pixels
    y0 = np.round(ly.ravel() * plan.downsample).astype(np.int64)
    rows, cols = (y0 / view.mask_scale).astype(np.int64), (x0 / view.mask_scale).astype(np.int64)
    keep = in_runs(index, i, index.mpp_column(mpp), rows, cols)
    coords = np.stack([x0[keep], y0[keep]], 1)
    if max_tiles is not None and len(coords) > max_tiles:
        pick = np.random.default_rng([seed, i]).choice(len(coords), max_tiles, replace=False)
        coords = coords[np.sort(pick)]
    # blocks of BLOCK x BLOCK tiles, row-major inside and between blocks: a batch then covers a compact patch of
    # the slide, so read_batch decodes each stored JPEG tile about once instead of once per tile that touches it
    step = BLOCK * int(round(side * plan.downsample))
    order = np.lexsort((coords[:, 0], coords[:, 1], coords[:, 0] // step, coords[:, 1] // step))
    return coords[order]


def read_batch(reader, view, mpp: float, coords: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 tiles at level-0 `coords`, the same pixels as reader.read per tile. On the JPEG path
    every stored tile the batch touches is decoded once (neighbouring grid tiles share stored tiles: 224 px tiles on
    a 256 px tile grid touch 3.5 stored tiles each on average)."""
    from PIL import Image

    from pathfm.data.jpegtiles import JpegTiffReader
    from pathfm.data.sampler import TileReader

    out = np.empty((len(coords), size, size, 3), np.uint8)
    handle = reader.handle(view)
    if not isinstance(handle, JpegTiffReader):  # OpenSlide (JPEG 2000, other formats): tile by tile
        for k, (x, y) in enumerate(coords.tolist()):
            out[k] = reader.read(view, mpp, x, y, size)
        return out
    decoded = {}  # (col, row) -> the stored tile at 1/scale
    try:
        for k, (x, y) in enumerate(coords.tolist()):
            level, lx, ly, r, scale = TileReader.region(view, mpp, x, y, size)
            lv = handle.levels[level]
            tw, th, s = lv.tile_w // scale, lv.tile_h // scale, r // scale
            sx, sy = lx // scale, ly // scale  # the region's top-left at 1/scale (the grid keeps lx, ly on it)
            region = out[k] if s == size else np.empty((s, s, 3), np.uint8)  # pasted in place when no resize follows
            for col, row in handle.stored_tiles(level, lx, ly, r, r):
                tile = decoded.get((col, row))
                if tile is None:
                    tile = decoded[col, row] = handle.decode_tile(level, col, row, scale=scale)
                tx, ty = col * tw, row * th  # overlap of the stored tile and the region, at 1/scale
                ax, ay, bx, by = max(sx, tx), max(sy, ty), min(sx + s, tx + tw), min(sy + s, ty + th)
                region[ay - sy:by - sy, ax - sx:bx - sx] = tile[ay - ty:by - ty, ax - tx:bx - tx]
            if s != size:  # the remainder between the level's mpp and the target, as TileReader.read resizes it
                out[k] = np.asarray(Image.fromarray(region).resize((size, size), Image.BILINEAR))
    except Exception:
        reader.forget(view.info.path)
        raise
    return out


def in_runs(index, i: int, j: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n,) bool: whether mask cells (rows, cols) are valid top-left cells of slide i at mpp column j, looked up in
    the index's runs (about 3 a mask row) by one binary search each, without listing the slide's valid cells."""
    a, b = int(index.segments[i, j]), int(index.segments[i, j + 1])
    if a == b:
        return np.zeros(len(rows), bool)
    run_rows, run_cols = index.runs[a:b, 0].astype(np.int64), index.runs[a:b, 1].astype(np.int64)
    lengths = np.diff(index.ends[a:b].astype(np.int64), prepend=0)
    starts = run_rows * 65536 + run_cols  # row-major keys (the index keeps rows and columns below 2**16)
    k = np.searchsorted(starts, rows * 65536 + cols, side="right") - 1  # the last run starting at or before
    kk = np.maximum(k, 0)
    return (k >= 0) & (run_rows[kk] == rows) & (cols < run_cols[kk] + lengths[kk])


def tile_side_level0(index, i: int, mpp: float, tile_size: int) -> tuple[int, int]:
    """(read level, tile side in level-0 px) of slide i's grid at mpp."""
    from pathfm.data.sampler import TileReader

    view = index.slide(i)
    plan = view.plans[mpp]
    side = TileReader.region(view, mpp, 0, 0, tile_size)[3]
    return plan.level, int(round(side * plan.downsample))


class SlideGridTiles:
    """An IterableDataset over the tiles of `jobs` (index rows), in batches of one slide each.

    Every worker walks the same sequence of (slide, batch) items, numbered g = 0, 1, 2, ... over all slides,
    and makes those with g % workers == its id: the DataLoader collects workers round-robin, so the batches
    arrive in sequence order and a slide's batches arrive together (at most a slide or two are in flight).
    Item: {"job", "batch", "batches", "coords" (b, 2), "tiles" uint8 (b, 3, T, T)} or, when a read fails,
    {"job", "batch", "batches", "error"}; a slide without tissue tiles at the mpp is one item with 0 tiles."""

    def __init__(self, index, jobs: list[int], mpp: float, tile_size: int, batch_size: int, max_tiles=None,
                 seed: int = 0, reader: str = "auto"):
        self.index, self.jobs, self.mpp, self.tile_size = index, jobs, mpp, tile_size
        self.batch_size, self.max_tiles, self.seed, self.reader = batch_size, max_tiles, seed, reader

    def plan(self, worker: int = 0, workers: int = 1):
        """(item, index row, the batch's coords or None, error or None) of this worker's share, in sequence order."""
        g = 0
        for job, i in enumerate(self.jobs):
            error = None
            try:
                coords = grid_coords(self.index, i, self.mpp, self.tile_size, self.max_tiles, self.seed)
            except Exception as e:  # a broken index row: listed like a read failure
                coords, error = None, f"tiling failed: {type(e).__name__}: {e}"
            batches = max(1, math.ceil(len(coords) / self.batch_size)) if coords is not None else 1
            for b in range(batches):
                mine, g = g % workers == worker, g + 1
                if mine:
                    part = None if coords is None else coords[b * self.batch_size:(b + 1) * self.batch_size]
                    yield {"job": job, "batch": b, "batches": batches}, i, part, error

    def load(self, reader, item: dict, i: int, part, error) -> dict:
        """One planned item read: its tiles, or the error (a failed read lists the slide; the run goes on)."""
        import torch

        if part is None:
            return {**item, "error": error}
        try:
            tiles = read_batch(reader, self.index.slide(i), self.mpp, part, self.tile_size)  # (b, T, T, 3)
        except Exception as e:
            return {**item, "error": f"read failed: {type(e).__name__}: {e}"}
        return {**item, "coords": torch.from_numpy(part), "tiles": torch.from_numpy(tiles).permute(0, 3, 1, 2)}

    def __iter__(self):  # a DataLoader worker's share
        import torch

        from pathfm.data.sampler import TileReader

        info = torch.utils.data.get_worker_info()
        reader = TileReader(self.reader)
        try:
            for planned in self.plan(*((info.id, info.num_workers) if info else (0, 1))):
                yield self.load(reader, *planned)
        finally:
            for path in list(reader.handles):
                reader.forget(path)


def threaded_batches(ds: SlideGridTiles, threads: int):
    """ds's items in sequence order, read on `threads` threads of this process (one TileReader each). The JPEG
    decode, pread and OpenSlide's reads release the GIL, and the tiles need no hand-off between processes (about
    170-300 µs a 150 KB tile through a DataLoader worker's shared memory)."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from pathfm.data.sampler import TileReader

    local, readers = threading.local(), []

    def load(planned):
        if not hasattr(local, "reader"):
            local.reader = TileReader(ds.reader)
            readers.append(local.reader)
        return ds.load(local.reader, *planned)

    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="pathfm-embed") as pool:
            pending = deque()
            for planned in ds.plan():
                pending.append(pool.submit(load, planned))
                if len(pending) >= 2 * threads:  # bounded read-ahead: 2 batches a thread
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        for reader in readers:
            for path in list(reader.handles):
                reader.forget(path)


def tile_loader(ds: SlideGridTiles, num_workers: int, pin_memory: bool = False):
    """A DataLoader over `ds` (made a torch IterableDataset here, so that importing this module needs no torch).
    Workers are forked: the dataset is not pickled, and the index's mapped arrays are shared."""
    import multiprocessing as mp

    import torch

    class Tiles(SlideGridTiles, torch.utils.data.IterableDataset):
        pass

    tiles = Tiles.__new__(Tiles)
    tiles.__dict__.update(ds.__dict__)
    fork = num_workers and "fork" in mp.get_all_start_methods()
    return torch.utils.data.DataLoader(tiles, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       prefetch_factor=4 if num_workers else None,
                                       multiprocessing_context="fork" if fork else None)


# ---------------------------------------------------------------------------------------------
# the per-slide files


def slide_name(path: str) -> str:
    """A slide's file name without its extension (TCGA names are unique; duplicates are refused up front)."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def write_slide(path: Path, features: np.ndarray, coords: np.ndarray, coord_attrs: dict, file_attrs: dict) -> None:
    """The slide's HDF5 file, written to a temporary name beside it and renamed: it exists only complete."""
    import h5py

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32))  # (N, D)
        c = f.create_dataset("coords", data=coords.astype(np.int64))  # (N, 2) level-0 (x, y)
        for k, v in coord_attrs.items():
            c.attrs[k] = v
        for k, v in file_attrs.items():
            f.attrs[k] = v
    os.replace(tmp, path)


def read_slide(path) -> dict:
    """{"features" (N, D) float32, "coords" (N, 2) int64, "attrs", "coord_attrs"} of one slide's file."""
    import h5py

    with h5py.File(path, "r") as f:
        return {"features": f["features"][:], "coords": f["coords"][:], "attrs": dict(f.attrs),
                "coord_attrs": dict(f["coords"].attrs)}


def _write_failed(path: Path, rows: list[tuple[str, str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "path", "reason"])
        w.writerows(rows)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


def open_index(args):
    """The slide index of --index (built from --manifest when it is not there yet), checked for mpp and tile size."""
    from pathfm.config import DataConfig
    from pathfm.data.index import IndexParams, SlideIndex, build_index
    from pathfm.data.slides import read_manifest

    folder = Path(args.index) if args.index else Path(args.out) / "index"
    if (folder / "index.json").is_file():
        index = SlideIndex(folder)
    elif args.manifest:
        threshold = args.tissue_threshold if args.tissue_threshold is not None else DataConfig().tissue_threshold
        params = IndexParams(args.tile_size, (args.mpp,), threshold)
        index = build_index(read_manifest(args.manifest), folder, params, workers=args.index_workers,
                            manifest_path=args.manifest)
    else:
        raise SystemExit(f"error: no slide index at {folder}; give --manifest CSV to build one, or --index DIR "
                         "(the training run's data.index)")
    p = index.params
    if args.mpp not in p.mpps:
        raise SystemExit(f"error: --mpp {args.mpp} is not among the mpps {list(p.mpps)} of the index {folder}; "
                         "choose one of them or build an index with it")
    if args.tile_size != p.tile_size:
        raise SystemExit(f"error: --tile-size {args.tile_size} but the index {folder} plans {p.tile_size} px tiles; "
                         f"give --tile-size {p.tile_size} or build an index for {args.tile_size}")
    return index


def settings(args, backbone, index) -> dict:
    """What every file of --out is made with; a second run with other settings is refused."""
    return {"model": backbone.describe(), "embedding": args.embedding, "mpp": args.mpp, "tile_size": args.tile_size,
            "max_tiles": args.max_tiles, "seed": args.seed, "tissue_threshold": index.params.tissue_threshold,
            "index": str(Path(index.folder).resolve()), "manifest_sha256": index.meta["manifest"]["sha256"]}


def check_settings(out: Path, wanted: dict, overwrite: bool) -> None:
    path = out / "embed.json"
    if path.is_file() and not overwrite:
        have = json.loads(path.read_text())
        diffs = [k for k in wanted if have.get(k) != wanted[k]]
        if diffs:
            raise SystemExit(f"error: {out} holds slide embeddings made with other settings ({', '.join(diffs)}: "
                             f"{[have.get(k) for k in diffs]} vs {[wanted[k] for k in diffs]}); choose another --out "
                             "or pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".embed.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    os.replace(tmp, path)  # array tasks write the same content


def embed_slides(backbone, index, out, *, mpp: float, tile_size: int, embedding: str = "cls", max_tiles=None,
                 seed: int = 0, share: tuple[int, int] = (0, 1), batch_size: int = 64, num_workers: int = 4,
                 device: str = "cpu", reader: str = "auto", overwrite: bool = False, progress: bool = True,
                 rows=None, read_threads: int = 0) -> dict:
    """Embed this share's slides (index rows i with i % n == k; only those in `rows` when given) that --out does
    not hold yet.
    Returns {"written", "skipped" (already there), "failed": [(name, path, reason)], "tiles"}."""
    import torch
    from tqdm import tqdm

    from eval.extract import embed
    from pathfm import __version__

    if embedding not in SLIDE_EMBEDDINGS:
        raise ValueError(f"--embedding {embedding}: slide files hold one vector a tile; expected one of "
                         f"{', '.join(SLIDE_EMBEDDINGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k, n = share
    names = {}
    for i in range(len(index)):
        name = slide_name(index.path(i))
        if name in names:
            raise SystemExit(f"error: two slides would write {name}.h5: {index.path(names[name])} and {index.path(i)}; "
                             "rename one of them")
        names[name] = i
    mine = [i for i in range(len(index)) if i % n == k and (rows is None or i in rows)]
    failed = [(slide_name(r["path"]), r["path"], f"not in the index: {r['reason']}") for r in index.unusable()
              if (int(r["row"]) - 2) % n == k and rows is None]
    todo = [i for i in mine if overwrite or not (out / f"{slide_name(index.path(i))}.h5").exists()]
    skipped = len(mine) - len(todo)
    failed_csv = out / ("failed.csv" if n == 1 else f"failed-task{k:05d}.csv")
    model = backbone.model.to(device).eval()
    cuda = torch.device(device).type == "cuda"
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    tiles_ds = SlideGridTiles(index, todo, mpp, tile_size, batch_size, max_tiles, seed, reader)
    loader = (threaded_batches(tiles_ds, read_threads) if read_threads else
              tile_loader(tiles_ds, num_workers, pin_memory=cuda))
    slides_bar = tqdm(total=len(todo), desc=f"slides ({k + 1}/{n})" if n > 1 else "slides", unit="slide",
                      disable=not progress, position=0, dynamic_ncols=True)
    tiles_bar = tqdm(desc="tiles", unit="tile", disable=not progress, position=1, dynamic_ncols=True)
    pending, dropped, written, tiles = {}, set(), 0, 0
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for item in loader:
            job = item["job"]
            i, name = todo[job], slide_name(index.path(todo[job]))
            if job in dropped:
                continue
            if "error" in item:
                dropped.add(job)
                pending.pop(job, None)
                failed.append((name, index.path(i), item["error"]))
                _write_failed(failed_csv, failed)
                slides_bar.update()
                continue
            parts = pending.setdefault(job, {})
            if len(item["tiles"]):
                x = (item["tiles"].to(device, non_blocking=True).float() - mean) / std  # (b, 3, T, T)
                parts[item["batch"]] = (embed(model, x, embedding).float().cpu().numpy(), item["coords"].numpy())
                tiles_bar.update(len(x))
                tiles += len(x)
            else:
                parts[item["batch"]] = None
            if len(parts) < item["batches"]:
                continue
            del pending[job]
            slides_bar.update()
            kept = [parts[b] for b in range(item["batches"]) if parts[b] is not None]
            if not kept:
                failed.append((name, index.path(i), f"no tile at mpp {mpp} is >= {index.params.tissue_threshold:.0%} "
                                                   "tissue on its mask"))
                _write_failed(failed_csv, failed)
                continue
            level, side0 = tile_side_level0(index, i, mpp, tile_size)
            slide_mpp = float(index.slides[i]["mpp"])
            coord_attrs = {"patch_size": tile_size, "patch_level": level, "patch_size_level0": side0,
                           "level0_magnification": 10.0 / slide_mpp, "target_magnification": 10.0 / mpp, "mpp": mpp}
            file_attrs = {"mpp": mpp, "slide_mpp": slide_mpp, "tile_size": tile_size, "patch_size_level0": side0,
                          "embedding": embedding, "model": json.dumps(backbone.describe()),
                          "model_source": backbone.source, "pathfm_version": __version__, "slide": index.path(i),
                          "tissue_threshold": index.params.tissue_threshold, "max_tiles": max_tiles or 0}
            write_slide(out / f"{name}.h5", np.concatenate([f for f, _ in kept]), np.concatenate([c for _, c in kept]),
                        coord_attrs, file_attrs)
            written += 1
    slides_bar.close()
    tiles_bar.close()
    _write_failed(failed_csv, failed)
    return {"written": written, "skipped": skipped, "failed": failed, "tiles": tiles, "failed_csv": str(failed_csv)}


def add_embed_args(p: argparse.ArgumentParser) -> None:
    """The options shared with launch/eval.py --embed (besides the model's)."""
    g = p.add_argument_group("slides")
    g.add_argument("--manifest", help="slide manifest (path[,mpp][,weight][,group]); builds --index when it is missing")
    g.add_argument("--index", help="a built slide index folder (the training run's data.index; default <out>/index)")
    g.add_argument("--mpp", type=float, required=True, help="µm/px of the tiles (one of the index's mpps)")
    g.add_argument("--tile-size", type=int, default=None, help="tile px at --mpp (default: the model's input size)")
    g.add_argument("--max-tiles", type=int, default=None, help="at most N tiles a slide, a seeded random subset of "
                   "the grid (default: every tissue tile)")
    g.add_argument("--seed", type=int, default=0, help="seed of the --max-tiles subset")
    g.add_argument("--tissue-threshold", type=float, default=None, help="for an index built here (default: the "
                   "training default, data.tissue_threshold)")
    g.add_argument("--index-workers", type=int, default=0, help="processes for building the index (0: one per CPU)")
    g.add_argument("--reader", default="auto", choices=("auto", "openslide", "jpeg"), help="the training tile reader")
    g.add_argument("--read-threads", type=int, default=4, help="threads reading tiles in this process (the decode "
                   "releases the GIL; no hand-off between processes); 0: --num-workers DataLoader processes instead")
    g.add_argument("--out", required=True, help="folder for <slide>.h5, embed.json and failed.csv")
    g.add_argument("--overwrite", action="store_true", help="embed slides that --out holds already, or with other settings")


def main(argv=None, share: tuple[int, int] = (0, 1)):
    from eval.extract import add_model_args, backbone_from_args, extract_kwargs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_embed_args(p)
    args = p.parse_args(argv)
    from eval.backbone import input_size_hint
    from pathfm.data.slides import SlideError

    args.tile_size = args.tile_size or args.img_size or input_size_hint(args.timm)
    args.img_size = args.img_size or args.tile_size  # a timm model is built for the tiles it will see
    try:  # the index first: a wrong mpp or tile size is refused before a model is built
        index = open_index(args)
    except SlideError as e:
        raise SystemExit(f"error: {e}") from None
    backbone = backbone_from_args(args)
    out = Path(args.out)
    check_settings(out, settings(args, backbone, index), args.overwrite)
    kw = extract_kwargs(args)
    start = time.perf_counter()
    try:
        r = embed_slides(backbone, index, out, mpp=args.mpp, tile_size=args.tile_size, embedding=args.embedding,
                         max_tiles=args.max_tiles, seed=args.seed, share=share, batch_size=kw["batch_size"],
                         num_workers=kw["num_workers"], device=kw["device"], reader=args.reader,
                         overwrite=args.overwrite, read_threads=args.read_threads)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{r['written']} slides embedded ({r['tiles']} tiles, {time.perf_counter() - start:.1f} s), {r['skipped']} "
          f"already there, {len(r['failed'])} failed" + (f" (listed in {r['failed_csv']})" if r["failed"] else "")
          + f" -> {out}")
    return r


if __name__ == "__main__":
    main()
