"""Fast reader for tiled TIFF / SVS slides whose tiles are JPEG: find the stored tiles, decode them.

OpenSlide composites every pixel it returns and reaches only a fraction of the raw JPEG decode
rate of the same tiles. For the common case (Aperio SVS, generic tiled TIFF, JPEG tiles) this
reader locates the stored tiles with tifffile once, reads their bytes with os.pread and decodes
them with libjpeg-turbo (simplejpeg). It returns the same pixels as OpenSlide for reads aligned
to the level's pixel grid (tested). Any other slide goes through OpenSlide.

Three quirks of TIFF JPEG tiles:
- abbreviated streams: the quantisation / Huffman tables live once in the JPEGTables tag and
  each tile holds only its scan, so the tables are spliced in front of every tile;
- Aperio writes tiles in RGB (photometric RGB) without an Adobe marker, which libjpeg would
  decode as YCbCr; an Adobe APP14 segment with transform 0 says "no colour transform";
- a tile stored with zero bytes was never scanned (glass the scanner skipped): OpenSlide renders it
  transparent, which the sampler composites onto white, so it decodes here as a white tile, not an error.
"""

from __future__ import annotations

import os

import numpy as np
import simplejpeg
import tifffile

_JPEG = 7  # TIFF Compression tag value for "new-style" JPEG
_PHOTOMETRIC_RGB = 2
# APP14 "Adobe" segment, length 14, version 100, flags 0, 0, transform 0 (components are RGB)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class _Level:
    """One pyramid level: tile grid, byte ranges and the JPEG prefix to put before each tile."""

    def __init__(self, page: tifffile.TiffPage):
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_w, self.tile_h = page.tilewidth, page.tilelength
        self.cols = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        tables = page.jpegtables or b""
        # prefix replaces each tile's SOI marker: SOI [+ Adobe RGB] [+ tables without SOI/EOI]
        self.prefix = b"\xff\xd8" + (_ADOBE_RGB if page.photometric == _PHOTOMETRIC_RGB else b"")
        self.prefix += tables[2:-2] if tables else b""


class JpegTiffReader:
    """Reads regions of the JPEG-tiled levels of one TIFF file. Not picklable; open per worker."""

    def __init__(self, path: str, level_dimensions: list[tuple[int, int]]):
        """Match OpenSlide's levels (`level_dimensions`) to the file's tiled JPEG pages.

        Raises ValueError when some level has no tiled JPEG RGB page of that size: the caller
        then uses OpenSlide for this slide.
        """
        self.path = path
        self._fd = None
        pages = {}
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                ok = (page.is_tiled and page.compression == _JPEG and page.samplesperpixel == 3
                      and page.bitspersample == 8 and page.planarconfig == 1)
                if ok and (page.imagewidth, page.imagelength) not in pages:
                    pages[(page.imagewidth, page.imagelength)] = _Level(page)
        missing = [d for d in level_dimensions if tuple(d) not in pages]
        if missing:
            raise ValueError(f"{path}: no tiled JPEG RGB page for level size(s) {missing}")
        self.levels = [pages[tuple(d)] for d in level_dimensions]
        self._fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def tile_bytes(self, level: int, col: int, row: int) -> bytes:
        """The complete JPEG stream of one stored tile."""
        lv = self.levels[level]
        i = row * lv.cols + col
        data = os.pread(self._fd, int(lv.counts[i]), int(lv.offsets[i]))
        if len(data) != lv.counts[i] or data[:2] != b"\xff\xd8":
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}) is truncated or not JPEG")
        return lv.prefix + data[2:]

    def decode_tile(self, level: int, col: int, row: int) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8, including any padding past the image edge."""
        lv = self.levels[level]
        if lv.counts[row * lv.cols + col] == 0:  # never scanned: blank, as OpenSlide renders it
            return np.full((lv.tile_h, lv.tile_w, 3), 255, np.uint8)
        try:
            return simplejpeg.decode_jpeg(self.tile_bytes(level, col, row), colorspace="RGB")
        except ValueError as e:  # simplejpeg reports corrupt streams as ValueError
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}): {e}") from None

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 region (possibly a strided view) whose top-left is (x, y) in level pixels.

        The region must lie inside the level. One stored tile is decoded when it fits in one.
        """
        lv = self.levels[level]
        if x < 0 or y < 0 or x + w > lv.width or y + h > lv.height:
            raise ValueError(f"{self.path}: region ({x}, {y}, {w}, {h}) outside level {level} "
                             f"of size {lv.width}x{lv.height}")
        c0, c1 = x // lv.tile_w, (x + w - 1) // lv.tile_w
        r0, r1 = y // lv.tile_h, (y + h - 1) // lv.tile_h
        if c0 == c1 and r0 == r1:  # the grid-aligned case: no copy into a mosaic
            tile = self.decode_tile(level, c0, r0)
            ox, oy = x - c0 * lv.tile_w, y - r0 * lv.tile_h
            return tile[oy:oy + h, ox:ox + w]  # a view: the caller's np.stack copies it once
        out = np.empty((h, w, 3), np.uint8)
        for row in range(r0, r1 + 1):
            for col in range(c0, c1 + 1):
                tile = self.decode_tile(level, col, row)
                # overlap of this tile with the region, in level coordinates
                tx, ty = col * lv.tile_w, row * lv.tile_h
                ax, ay = max(x, tx), max(y, ty)
                bx, by = min(x + w, tx + lv.tile_w), min(y + h, ty + lv.tile_h)
                out[ay - y:by - y, ax - x:bx - x] = tile[ay - ty:by - ty, ax - tx:bx - tx]
        return out
