"""From the config to batches of views: slides -> tile stream -> multi-crop + iBOT masks -> DataLoader.

Two modes. CPU mode (default): loader workers read tiles and make the views. Device mode
(data.device_augment): workers only read and decode; `Views` runs batched on the training device.
Both draw every random parameter from the same per-step generator, so they produce the same views.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pathfm.data.augment import MultiCrop
from pathfm.data.masking import block_masks
from pathfm.data.sampler import SlideTileDataset, prepare_slides, views_generator, worker_steps
from pathfm.data.slides import SlideEntry, read_manifest
from pathfm.data.synthetic import ensure_synthetic_slides


class Views:
    """uint8 tiles (B, 3, T, T) -> {"global_crops", "local_crops", "masks"}; picklable for workers."""

    def __init__(self, cfg, patch_size: int, ibot: bool):
        c = cfg.crops
        self.multicrop = MultiCrop(
            global_size=c.global_size, local_size=c.local_size, n_local=c.n_local,
            global_scale=(c.global_scale_min, c.global_scale_max), local_scale=(c.local_scale_min, c.local_scale_max),
            color_jitter=c.color_jitter, grayscale=c.grayscale, blur_global=c.blur_global, blur_local=c.blur_local,
            solarize=c.solarize, hed_jitter=c.hed_jitter, mean=tuple(c.mean), std=tuple(c.std),
        )
        self.grid = c.global_size // patch_size
        self.ibot = ibot
        s = cfg.ssl
        self.mask_args = (s.mask_ratio_min, s.mask_ratio_max, s.mask_probability)

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator) -> dict:
        out = self.multicrop(tiles, generator)
        n_global = out["global_crops"].shape[0]
        if self.ibot:
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
        g_crops, l_crops, masks = [], [], []
        for i in range(self.rank * B, (self.rank + 1) * B):
            g = views_generator(self.cfg.train.seed, i, step)
            g_crops.append(torch.randn(2, 3, c.global_size, c.global_size, generator=g))
            l_crops.append(torch.randn(c.n_local, 3, c.local_size, c.local_size, generator=g))
            ibot = self.views.ibot
            masks.append(block_masks(2, grid, *self.views.mask_args, g) if ibot else torch.zeros(2, grid * grid, dtype=torch.bool))
        # (crops, B, ...) -> crop-major (crops * B, ...), as Views returns
        crops = {k: torch.stack(v, 1).flatten(0, 1) for k, v in
                 (("global_crops", g_crops), ("local_crops", l_crops), ("masks", masks))}
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


def prepare(cfg):
    """(usable slides, skipped [(path, reason)]): run on rank 0 first so cached masks are shared."""
    d = cfg.data
    if d.source == "random":
        return [], []
    return prepare_slides(slide_entries(cfg), cache_dir=Path(d.cache_dir) / "masks", tissue_threshold=d.tissue_threshold,
                          tile_size=d.tile_size, mpps=d.mpps)


def build_loader(cfg, slides, *, rank: int, world_size: int, start_step: int, views: Views):
    d = cfg.data
    if d.source == "random":
        dataset = RandomViews(cfg, views, rank=rank, world_size=world_size, start_step=start_step)
    else:
        dataset = SlideTileDataset(
            slides, batch_size=cfg.optim.batch_size, tile_size=d.tile_size, mpps=d.mpps, mpp_weights=d.mpp_weights or None,
            tissue_threshold=d.tissue_threshold, seed=cfg.train.seed, rank=rank, world_size=world_size,
            start_step=start_step, reader=d.reader, grid_aligned=d.grid_aligned, hsv_filter=d.hsv_filter,
            group_balance=d.group_balance, transform=None if d.device_augment else views,
        )
    # a private generator: creating the loader must not consume the global RNG (exact resume)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=d.num_workers, persistent_workers=d.num_workers > 0,
        prefetch_factor=2 if d.num_workers > 0 else None, generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
    )
