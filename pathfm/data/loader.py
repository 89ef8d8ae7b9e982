"""From the config to batches of views: slide index -> tile stream -> multi-crop + iBOT masks -> DataLoader.

Two modes. CPU mode (default): loader workers read tiles and make the views. Device mode
(data.device_augment): workers only read and decode; `Views` runs batched on the training device.
Both draw every random parameter from the same per-step generator, so they produce the same views.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch

from pathfm.data.augment import MultiCrop
from pathfm.data.failures import DIED, ReadFailures, killed_slides, readings
from pathfm.data.masking import block_masks
from pathfm.data.index import (IndexParams, SlideIndex, build_part, cpu_count, index_folder, manifest_identity,
                               merge_parts)
from pathfm.data.sampler import SlideTileDataset, views_generator, worker_steps
from pathfm.data.slides import SlideEntry, read_manifest
from pathfm.data.synthetic import ensure_synthetic_slides
from pathfm.gram import fine_tiles_from


def multicrop(crops_cfg) -> MultiCrop:
    """The config's crops section as the multi-crop transform."""
    c = crops_cfg
    return MultiCrop(
        global_size=c.global_size, local_size=c.local_size, n_local=c.n_local,
        global_scale=(c.global_scale_min, c.global_scale_max), local_scale=(c.local_scale_min, c.local_scale_max),
        color_jitter=c.color_jitter, grayscale=c.grayscale, blur_global=c.blur_global, blur_local=c.blur_local,
        solarize=c.solarize, hed_jitter=c.hed_jitter, mean=tuple(c.mean), std=tuple(c.std),
    )


class Views:
    """uint8 tiles (B, 3, T, T) -> {"global_crops", "local_crops", "masks"}; picklable for workers. The global crops
    get iBOT block masks when the step plan says so (plan.mask_crops), else all-False masks."""

    def __init__(self, cfg, plan):
        c = cfg.crops
        self.multicrop = multicrop(c)
        self.grid = c.global_size // cfg.model.patch_size
        self.mask_crops = plan.mask_crops
        s = cfg.ssl
        self.mask_args = (s.mask_ratio_min, s.mask_ratio_max, s.mask_probability)

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator, fine: torch.Tensor | None = None) -> dict:
        """fine: the same tiles at twice the pixels (gram.scale 2): "gram_crops" (2B, 3, 2G, 2G) are then the global
        crops' regions cut from them, with their flips and rotations but no colour op (pathfm/gram.py)."""
        params = self.multicrop.sample_params(tiles.shape[0], tiles.shape[2], tiles.shape[3], generator)
        out = self.multicrop.apply(tiles, params)
        if fine is not None:
            g = self.multicrop.global_size
            out["gram_crops"] = self.multicrop.geometric(fine.to(tiles.device), params[0], 2 * g, fine.shape[-1] // tiles.shape[-1])
        n_global = out["global_crops"].shape[0]
        if self.mask_crops:
            out["masks"] = block_masks(n_global, self.grid, *self.mask_args, generator).to(tiles.device)
        else:
            out["masks"] = torch.zeros(n_global, self.grid * self.grid, dtype=torch.bool, device=tiles.device)
        return out


class RandomViews(torch.utils.data.IterableDataset):
    """data.source=random: views of random pixels, no slides and no I/O (compute benchmarks, equivalence
    tests). Image i of step s (i counted over the global batch) is drawn from (seed, i, s) alone, and rank
    r makes images [r*B, (r+1)*B): the stream is the same whatever the number of ranks."""

    def __init__(self, cfg, views: Views, *, rank: int, world_size: int, start_step: int):
        self.cfg, self.views, self.rank, self.start = cfg, views, rank, start_step

    def batch(self, step: int) -> dict:
        c, B, grid = self.cfg.crops, self.cfg.optim.batch_size, self.views.grid
        g_crops, l_crops, masks, gram_crops = [], [], [], []
        fine_from = fine_tiles_from(self.cfg)  # gram.scale 2: random Gram crops at twice the pixels too
        for i in range(self.rank * B, (self.rank + 1) * B):
            g = views_generator(self.cfg.train.seed, i, step)
            g_crops.append(torch.randn(2, 3, c.global_size, c.global_size, generator=g))
            l_crops.append(torch.randn(c.n_local, 3, c.local_size, c.local_size, generator=g))
            masked = self.views.mask_crops
            masks.append(block_masks(2, grid, *self.views.mask_args, g) if masked else torch.zeros(2, grid * grid, dtype=torch.bool))
            if fine_from is not None and step >= fine_from:
                gram_crops.append(torch.randn(2, 3, 2 * c.global_size, 2 * c.global_size, generator=g))
        # (crops, B, ...) -> crop-major (crops * B, ...), as Views returns
        crops = {k: torch.stack(v, 1).flatten(0, 1) for k, v in
                 (("global_crops", g_crops), ("local_crops", l_crops), ("masks", masks), ("gram_crops", gram_crops)) if v}
        return {"step": step, "tiles": crops, "skipped": 0}

    def __iter__(self):
        return (self.batch(step) for step in worker_steps(self.start))


def slide_entries(cfg) -> list[SlideEntry]:
    d = cfg.data
    if d.source == "synthetic":
        paths = ensure_synthetic_slides(Path(d.cache_dir) / "synthetic", d.synthetic_slides, d.synthetic_size, seed=0)
        return [SlideEntry(str(p)) for p in paths]
    if not Path(d.manifest).is_file():
        raise FileNotFoundError(f"data.manifest '{d.manifest}' does not exist; build one with "
                                "`python -m pathfm.data.manifest SLIDE_DIR -o manifest.csv`")
    return read_manifest(d.manifest)


def index_params(cfg) -> IndexParams:
    d = cfg.data
    return IndexParams(d.tile_size, tuple(d.mpps), d.tissue_threshold)


def slide_index(cfg, *, rank: int = 0, world_size: int = 1, wait=lambda: None) -> SlideIndex | None:
    """The run's slide index (None for data.source=random): data.index as given (checked against the
    run's manifest and sampling parameters), else the manifest's own index, built on first use with
    each rank describing a share of the slides, `wait()` between the shares and the merge. On a resume
    or requeue the built index is only opened: nothing per slide is recomputed."""
    d = cfg.data
    if d.source == "random":
        return None
    params = index_params(cfg)
    if d.index:
        index = SlideIndex(d.index)
        index.check(params, manifest_identity(read_manifest(d.manifest)) if d.manifest else None)
        return index
    if d.source == "synthetic" and rank != 0:
        wait()  # rank 0 writes the synthetic slides
    entries = slide_entries(cfg)
    if d.source == "synthetic" and rank == 0:
        wait()
    folder = index_folder(d.cache_dir, entries, params, Path(d.manifest).stem if d.source == "manifest" else "synthetic")
    if not (folder / "index.json").exists():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the node's CPUs are shared by its ranks
        workers = d.index_workers or max(1, cpu_count() // local)
        build_part(entries, folder, params, part=f"rank-{rank:05d}", share=(rank, world_size), workers=workers,
                   mask_dir=Path(d.cache_dir) / "masks", progress=rank == 0, timeout_s=d.index_timeout_s)
        wait()
        if rank == 0 and not (folder / "index.json").exists():
            merge_parts(entries, folder, params, manifest_path=d.manifest)
        wait()
    index = SlideIndex(folder)
    index.check(params, manifest_identity(entries))
    return index


def tile_dataset(cfg, index: SlideIndex, *, rank: int, world_size: int, start_step: int = 0, transform=None,
                 seed: int | None = None, batch_size: int | None = None, failures_dir=None,
                 fine_from_step: int | None = None) -> SlideTileDataset:
    """The config's tile stream; the RankMe held-out batch uses it too, so it sees the same filters."""
    d = cfg.data
    return SlideTileDataset(
        index, batch_size=batch_size or cfg.optim.batch_size, tile_size=d.tile_size, mpps=d.mpps,
        mpp_weights=d.mpp_weights or None, seed=cfg.train.seed if seed is None else seed, rank=rank,
        world_size=world_size, start_step=start_step, reader=d.reader, grid_aligned=d.grid_aligned,
        hsv_filter=d.hsv_filter, group_balance=d.group_balance, transform=transform,
        tiles_per_visit=d.tiles_per_visit, failures_dir=failures_dir,
        excluded=killed_slides(failures_dir) if failures_dir else (), read_ahead_bytes=int(d.read_ahead_mb * 2**20), read_threads=d.read_threads,
        fine_from_step=fine_from_step)


def build_loader(cfg, index: SlideIndex | None, *, rank: int, world_size: int, start_step: int, views: Views,
                 failures_dir=None):
    d = cfg.data
    if d.source == "random":
        dataset = RandomViews(cfg, views, rank=rank, world_size=world_size, start_step=start_step)
    else:
        dataset = tile_dataset(cfg, index, rank=rank, world_size=world_size, start_step=start_step,
                               transform=None if d.device_augment else views, failures_dir=failures_dir,
                               fine_from_step=fine_tiles_from(cfg))
        for stale in Path(failures_dir).glob(f"rank{rank:05d}-*.reading") if failures_dir else ():
            stale.unlink(missing_ok=True)  # an earlier launch's workers: never name their slides in this one
    # a private generator: creating the loader must not consume the global RNG (exact resume). timeout: the
    # longest wait for one batch (data.stall_timeout_s; only with workers: without, reads run in this process)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=d.num_workers, persistent_workers=d.num_workers > 0,
        prefetch_factor=2 if d.num_workers > 0 else None, generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
        timeout=d.stall_timeout_s if d.num_workers > 0 else 0,
    )


# ---------------------------------------------------------------- a loader that stalls or loses a worker


class LoaderFault(Exception):
    """The loader stalled or lost a worker: the run stops with exit status 75 (requeue) and a one-line reason.
    Raised between steps or while waiting for a batch: the last checkpoint is complete, none is half-written."""


def batches(loader, *, failures_dir, rank: int, start_step: int):
    """Iterate `loader`, turning a stall (DataLoader timeout) or a dead worker into a LoaderFault that names
    the slide the worker was reading and the step."""
    it, step = iter(loader), start_step
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            # how each worker ended: torch's "exited unexpectedly" does not say (a private attribute, read with care)
            codes = {w.pid: w.exitcode for w in getattr(it, "_workers", ()) if getattr(w, "exitcode", None) is not None}
            fault = loader_fault(e, failures_dir, rank, step=step, start_step=start_step, workers=loader.num_workers,
                                 exit_codes=codes)
            if fault is None:
                raise
            del it  # shuts the workers down (a stuck one is terminated after torch's 5 s grace)
            raise fault from None
        step = batch["step"] + 1
        yield batch


def loader_fault(error: BaseException, failures_dir, rank: int, *, step: int | None = None, start_step: int = 0,
                 workers: int = 1, exit_codes: dict | None = None) -> LoaderFault | None:
    """The LoaderFault that a DataLoader RuntimeError stands for, or None when it is something else. A worker's
    death also arrives as torch's SIGCHLD handler raising in the middle of a step: then `step` is None and the
    worker's own record says which step it was making. A slide a worker died on is recorded in failures_dir
    (failures.DIED), so that every later launch of the run skips it."""
    text = str(error)
    seen = readings(Path(failures_dir), rank) if failures_dir else {}
    if text.startswith("DataLoader timed out after"):
        worker = f"worker{(step - start_step) % max(1, workers):03d}"
        pid, _, slide, path = seen.get(worker, (None, None, None, None))
        what = f"was reading {path}" if path else "had read no slide yet"
        return LoaderFault(f"data loader: no batch for {text.split('after ')[1]} (data.stall_timeout_s) while waiting "
                           f"for step {step}; loader worker {worker[6:].lstrip('0') or '0'} (pid {pid}) {what}. Stopped "
                           "for a requeue (exit status 75); the last checkpoint is intact")
    m = re.match(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (is killed by signal: (.+?)\.|exited unexpectedly)", text)
    if m is None:
        return None
    pids = {int(p) for p in re.findall(r"\d+", m.group(1))}
    number = {signal.strsignal(s): s for s in signal.Signals}.get(m.group(3)) if m.group(3) else None
    code = next((c for p, c in (exit_codes or {}).items() if p in pids), None)
    if number is None and code is not None and code < 0:
        number = signal.Signals(-code)
    how = (f"signal {int(number)} ({number.name})" if number else f"signal {m.group(3)}" if m.group(3)
           else f"exit status {code}" if code is not None else "exited")
    dead = [(name, r) for name, r in seen.items() if r[0] in pids]
    stopped = number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # stopped from outside: not the slide's doing
    if failures_dir and not stopped:
        record = ReadFailures(Path(failures_dir), f"rank{rank:05d}-main")
        for _, (_, _, slide, path) in dead:
            record.record(slide, path, f"{DIED}: {how} while reading it")
    where = "; ".join(f"{name} (pid {pid}) was reading {path} for step {s}" for name, (pid, s, _, path) in dead)
    at = f" while training waited for step {step}" if step is not None else ""
    kept = "" if stopped or not dead or not failures_dir else (f"; {'the slide is' if len(dead) == 1 else 'slides are'} recorded in {failures_dir} "
                               "and skipped when the run resumes")
    return LoaderFault(f"data loader worker died{at} ({how}): {where or 'no slide recorded'}{kept}. "
                       "Stopped for a requeue (exit status 75); the last checkpoint is intact")
