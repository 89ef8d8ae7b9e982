"""Synthetic whole-slide images: pyramidal JPEG-tiled TIFFs that OpenSlide opens as Aperio SVS.

    paths = ensure_synthetic_slides(".cache/pathfm/synthetic", n=3, size=4096, seed=0)

They stand in for real slides in smoke runs, tests and benchmarks: H&E-like colours (Beer-Lambert
mixing of haematoxylin and eosin optical densities), nuclei-like blobs, fibrous stroma, white
glass, several pyramid levels and the Aperio "MPP = ..." metadata.

Speed (20000 x 20000 px in a few seconds) comes from not rendering 400 Mpx one by one:
- a low-resolution layout field (one value per 64 px) decides tissue vs glass; its bilinear
  interpolation, thresholded, gives smooth tissue outlines at any level;
- tissue texture comes from a bank of pre-rendered tiles; a level-0 tile that is all tissue is
  one of those, whose JPEG bytes are encoded once and reused, and likewise the all-glass tile;
- only tiles on a tissue outline and tiles of the (16x smaller) upper levels are rendered and
  encoded, and tifffile writes the pre-encoded JPEG bytes as they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import simplejpeg
import tifffile
from PIL import Image

SYNTHETIC_VERSION = 1  # part of the file name: bump when the content changes
CELL = 64  # level-0 pixels per value of the layout field
# Ruifrok & Johnston optical-density vectors (R, G, B) of haematoxylin and eosin
H_OD = np.array([0.65, 0.70, 0.29], np.float32)
E_OD = np.array([0.07, 0.99, 0.11], np.float32)
GLASS = np.array([238, 236, 241], np.float32)


def _noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """(size, size) float32 smooth noise in about [-1, 1]: a grid x grid random field, upsampled."""
    small = Image.fromarray(rng.uniform(-1, 1, (grid, grid)).astype(np.float32), mode="F")
    return np.asarray(small.resize((size, size), Image.BICUBIC))


def _tissue_tile(rng: np.random.Generator, t: int) -> np.ndarray:
    """(t, t, 3) uint8 H&E-like texture: eosin stroma with fibres, haematoxylin nuclei."""
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
    fibres = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
                    + 3 * _noise(rng, 4, t))
    eosin = 0.45 + 0.2 * _noise(rng, 8, t) + 0.12 * fibres  # optical density
    haem = 0.08 + 0.04 * _noise(rng, 16, t)
    # nuclei: filled ellipses, from sparse (stroma) to crowded (tumour); radii 3-7 px ~ 2-4 µm
    for _ in range(int(rng.uniform(0.1, 1.0) * t * t / 300)):
        cx, cy = rng.uniform(0, t, 2)
        a, b, theta = rng.uniform(3, 7), rng.uniform(2.5, 5), rng.uniform(0, np.pi)
        x0, x1 = int(max(cx - 8, 0)), int(min(cx + 9, t))
        y0, y1 = int(max(cy - 8, 0)), int(min(cy + 9, t))
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        haem[y0:y1, x0:x1] += np.where(u * u + v * v <= 1, rng.uniform(0.6, 1.1), 0)
    od = haem[..., None] * H_OD + np.clip(eosin, 0.05, None)[..., None] * E_OD  # (t, t, 3)
    rgb = 255 * np.exp(-od) + rng.normal(0, 3, (t, t, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _glass_tile(rng: np.random.Generator, t: int) -> np.ndarray:
    return np.clip(GLASS + rng.normal(0, 2, (t, t, 3)), 0, 255).astype(np.uint8)


class _Layout:
    """Where tissue is, and which texture each level-0 tile shows; renders any level's tile."""

    def __init__(self, rng: np.random.Generator, size: int, tile: int, bank: int = 24):
        self.size, self.tile = size, tile
        n = math.ceil(size / CELL) + 2  # field values at level-0 points (i * CELL, j * CELL)
        scale = max(size / 6, 4 * CELL)  # tissue fragments about a sixth of the slide across
        field = _noise(rng, max(3, round(size / scale) + 2), n) + 0.35 * _noise(rng, max(6, round(4 * size / scale)), n)
        self.field = field - np.quantile(field, 0.5)  # > 0 is tissue: about half the slide
        tiles = math.ceil(size / tile)
        self.variant = rng.integers(0, bank, (tiles, tiles))  # texture of each level-0 tile
        self.bank = np.stack([_tissue_tile(rng, tile) for _ in range(bank)])  # (bank, t, t, 3)
        self.glass = _glass_tile(rng, tile)
        self._small = {}  # downsample -> (bank, m, m, 3) float32 bank shrunk by it

    def _bank_at(self, ds: int) -> np.ndarray:
        if ds not in self._small:
            m = max(1, self.tile // ds)
            self._small[ds] = np.stack([np.asarray(Image.fromarray(b).resize((m, m), Image.BOX))
                                        for b in self.bank]).astype(np.float32)
        return self._small[ds]

    def kind(self, ds: int, col: int, row: int) -> str:
        """'tissue' / 'glass' when the whole tile is one of them, else 'edge'."""
        span = self.tile * ds / CELL  # field cells per tile
        j0, i0 = int(row * span), int(col * span)
        block = self.field[j0:int((row + 1) * span) + 2, i0:int((col + 1) * span) + 2]
        return "tissue" if block.min() > 0 else "glass" if block.max() <= 0 else "edge"

    def render(self, ds: int, col: int, row: int) -> np.ndarray:
        """(t, t, 3) uint8: tile (col, row) of the level with downsample ds."""
        t = self.tile
        # level-0 coordinates of this tile's pixel centres along x and y, (t,)
        xs = (col * t + np.arange(t) + 0.5) * ds
        ys = (row * t + np.arange(t) + 0.5) * ds
        tissue = self._field_at(xs, ys) > 0  # (t, t)
        # texture: which level-0 tile each pixel falls in, and where inside it
        small = self._bank_at(ds)
        m = small.shape[1]
        tx = np.minimum(xs // t, self.variant.shape[1] - 1).astype(np.int64)
        ty = np.minimum(ys // t, self.variant.shape[0] - 1).astype(np.int64)
        ox = ((xs % t) * m / t).astype(np.int64)
        oy = ((ys % t) * m / t).astype(np.int64)
        texture = small[self.variant[ty[:, None], tx[None, :]], oy[:, None], ox[None, :]]  # (t, t, 3)
        out = np.where(tissue[..., None], texture, self.glass)
        return out.astype(np.uint8)

    def _field_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of the field on the grid xs (W,) x ys (H,) -> (H, W)."""
        u, v = xs / CELL, ys / CELL
        f = self.field
        # clipped: padding pixels of edge tiles lie past the slide (their values do not matter)
        i = np.minimum(np.floor(u).astype(np.int64), f.shape[1] - 2)
        j = np.minimum(np.floor(v).astype(np.int64), f.shape[0] - 2)
        fu, fv = np.clip(u - i, 0, 1)[None, :], np.clip(v - j, 0, 1)[:, None]
        top = f[j[:, None], i[None, :]] * (1 - fu) + f[j[:, None], i[None, :] + 1] * fu
        bottom = f[j[:, None] + 1, i[None, :]] * (1 - fu) + f[j[:, None] + 1, i[None, :] + 1] * fu
        return top * (1 - fv) + bottom * fv


def write_synthetic_slide(path, size: int = 4096, *, seed: int = 0, mpp: float = 0.5,
                          tile: int = 256, level_factor: int = 4, min_level_size: int = 512,
                          quality: int = 80) -> Path:
    """Write a size x size synthetic Aperio-style SVS; levels shrink by level_factor down to
    min_level_size. Downsamples are exact when size is divisible by them (e.g. 4096, 20000)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    layout = _Layout(rng, size, tile)
    encode = lambda img: simplejpeg.encode_jpeg(img, quality=quality, colorspace="RGB",
                                                colorsubsampling="420")
    glass_bytes = encode(layout.glass)
    tissue_bytes = [encode(b) for b in layout.bank]

    def tiles(ds: int, w: int, h: int):
        for row in range(math.ceil(h / tile)):
            for col in range(math.ceil(w / tile)):
                kind = layout.kind(ds, col, row)
                if kind == "glass":
                    yield glass_bytes
                elif kind == "tissue" and ds == 1:
                    yield tissue_bytes[layout.variant[row, col]]
                else:
                    yield encode(layout.render(ds, col, row))

    mag = 10 / mpp  # 0.5 µm/px is a "20x" scan, 0.25 is "40x"
    description = (f"Aperio Image Library v12.0.15 (pathfm synthetic, seed {seed})\n"
                   f"{size}x{size} [0,0 {size}x{size}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                   f"|AppMag = {mag:g}|MPP = {mpp}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(tmp, bigtiff=size > 60000) as tw:
        ds = 1
        while ds == 1 or size // ds >= min_level_size:
            w = h = size // ds
            tw.write(tiles(ds, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="jpeg", photometric="rgb", subsampling=(2, 2), metadata=None,
                     description=description if ds == 1 else None, subfiletype=0 if ds == 1 else 1)
            ds *= level_factor
    os.replace(tmp, path)
    return path


def ensure_synthetic_slides(cache_dir, n: int, size: int, seed: int) -> list[Path]:
    """n synthetic slides under cache_dir, written on the first call and reused afterwards."""
    from tqdm import tqdm

    paths = [Path(cache_dir) / f"synthetic-{size}px-seed{seed + i}-v{SYNTHETIC_VERSION}.svs" for i in range(n)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    # a bar only when there is something to write (seconds per slide); a cached set stays silent
    for i, path in tqdm(missing, desc=f"writing synthetic slides ({size} px) to {cache_dir}", unit="slide",
                        disable=not missing):
        write_synthetic_slide(path, size, seed=seed + i)
    return paths
