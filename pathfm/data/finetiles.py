"""Tiles read at twice the pixels: the same field of view at half the µm/px, for Gram anchoring at gram.scale 2.

DINOv3's Gram teacher sees each global crop at twice the resolution. Upsampling the crop would add no detail; on a
slide the detail exists, one pyramid level down. So for every tile of the batch (slide, mpp, level-0 x, y) a second
tile of 2T px is read at mpp / 2 from the level that serves it, covering the same tissue (to within one decode-grid
step of that level, under one output pixel), and the global crops' boxes, doubled, cut the Gram teacher's crops out
of it (MultiCrop.geometric). Where the slide has no finer pixels (the tile's mpp is already its level 0's), the
region is upsampled: nothing finer exists.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from PIL import Image

from pathfm.data.index import IndexedSlide
from pathfm.data.slides import decode_scale, plan_read

log = logging.getLogger(__name__)


def fine_read(slide: IndexedSlide, location: tuple, tile_size: int) -> tuple[IndexedSlide, int, int]:
    """(the slide planned for the 2x read, level-0 x, y aligned for it): TileReader.read(fine, mpp, x, y, 2 * tile_size)
    then returns the tile at `location` = (slide index, mpp, x, y) with twice the pixels."""
    _, mpp, x, y = location
    size = 2 * tile_size
    plan = plan_read(slide.info, mpp / 2, size)
    lw, lh = slide.info.dimensions[plan.level]
    scale = decode_scale(plan.region, size)  # a scaled JPEG decode must start on its grid, as the sampler's _place
    lx = min(round(x / plan.downsample), lw - plan.region)
    ly = min(round(y / plan.downsample), lh - plan.region)
    lx, ly = max(lx - lx % scale, 0), max(ly - ly % scale, 0)
    return dataclasses.replace(slide, plans={mpp: plan}), round(lx * plan.downsample), round(ly * plan.downsample)


def read_fine_tiles(reader, slide_of, tiles: np.ndarray, locations: list) -> np.ndarray:
    """(B, 2T, 2T, 3) uint8: each tile of tiles (B, T, T, 3) read again at twice the pixels (fine_read). reader: the
    dataset's TileReader; slide_of(index) -> IndexedSlide. A read that fails (the tile itself was read) falls back
    to the tile upsampled, with a warning: the batch and the stream stay as they are."""
    B, T = tiles.shape[:2]
    out = np.empty((B, 2 * T, 2 * T, 3), np.uint8)
    for i, location in enumerate(locations):
        slide = slide_of(location[0])
        try:
            fine, x, y = fine_read(slide, location, T)
            out[i] = reader.read(fine, location[1], x, y, 2 * T)
        except Exception as e:  # noqa: BLE001 -- any read error: the coarse tile, upsampled, stands in
            log.warning("reading %s at twice the pixels failed (%s); its tile upsampled stands in", slide.info.path, e)
            out[i] = np.asarray(Image.fromarray(tiles[i]).resize((2 * T, 2 * T), Image.BICUBIC))
    return out
