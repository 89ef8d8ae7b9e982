"""Fast reader for tiled TIFF / SVS slides whose tiles are JPEG: find the stored tiles, decode them.

OpenSlide composites every pixel it returns and reaches only a fraction of the raw JPEG decode
rate of the same tiles. For the common case (Aperio SVS, generic tiled TIFF, JPEG tiles) this
reader locates the stored tiles once (its own reading of the TIFF directories: the tags it needs,
10x cheaper than a full parse, which matters when a worker opens a file per visit of a few tiles),
reads their bytes with os.pread and decodes them with libjpeg-turbo (simplejpeg). It returns the same pixels as OpenSlide for reads aligned
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
import struct

import numpy as np
import simplejpeg

_JPEG = 7  # TIFF Compression tag value for "new-style" JPEG
_PHOTOMETRIC_RGB = 2
# APP14 "Adobe" segment, length 14, version 100, flags 0, 0, transform 0 (components are RGB)
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


# TIFF tags read: width, length, bits per sample, compression, photometric, samples per pixel,
# planar configuration, tile width, tile length, tile offsets, tile byte counts, JPEG tables
WIDTH, LENGTH, BITS, COMPRESSION, PHOTOMETRIC, SAMPLES, PLANAR = 256, 257, 258, 259, 262, 277, 284
TILE_W, TILE_H, OFFSETS, COUNTS, TABLES = 322, 323, 324, 325, 347
_TAGS = {WIDTH, LENGTH, BITS, COMPRESSION, PHOTOMETRIC, SAMPLES, PLANAR, TILE_W, TILE_H, OFFSETS, COUNTS, TABLES}
_TYPES = {1: "u1", 3: "u2", 4: "u4", 7: "u1", 16: "u8"}  # BYTE, SHORT, LONG, UNDEFINED, LONG8
MAX_PAGES = 256
# The TIFF directories and their tag values are read through a buffer this large: a directory and the values
# written after it (tile offsets, byte counts, JPEG tables) come in one read instead of one each. On storage
# that adds 5 ms a read, opening bench/data.py's slide took 63-67 ms with the default buffer (4 KB here) and
# 42-44 ms with 64 KB (1 MB: 44-56 ms, more bytes a read; bench/readahead_cost.py --opens). A 10,000-slide
# cohort's tile rate at +5 ms did not change with it: opens ahead already hid them (bench/storage.py --cohort).
DIRECTORY_READ = 64 << 10
MAX_TILE_SIDE = 4096  # a stored tile's side: 50 MB decoded (Aperio writes 240-256 px, others up to 1024)


def tiff_pages(f) -> list[dict]:
    """The top-level pages (IFDs) of a classic or Big TIFF: {tag: values} for the tags above only.
    Raises ValueError on anything that is not a well-formed TIFF.

    What the file says is believed only as far as its size allows, so no field makes this allocate more
    than the file holds: at most MAX_PAGES directories, each with at most (file size / entry size)
    entries, each tag's values at most the file's size in bytes (more is "truncated"); see _Level and
    JpegTiffReader.tile_bytes for tile sizes, offsets and byte counts."""
    try:
        return _tiff_pages(f)
    except struct.error as e:  # a directory cut short
        raise ValueError(f"truncated TIFF ({e})") from None


def _tiff_pages(f) -> list[dict]:
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        raise ValueError("not a TIFF file")
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic not in (42, 43):
        raise ValueError(f"not a TIFF file (magic {magic})")
    big = magic == 43
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    pointer, count_fmt, entry = ("Q", "Q", 20) if big else ("I", "H", 12)
    next_ifd = struct.unpack(order + pointer, head[8:16] if big else head[4:8])[0]
    pages, seen = [], set()
    while next_ifd and next_ifd not in seen and len(pages) < MAX_PAGES:
        seen.add(next_ifd)
        f.seek(next_ifd)
        (n,) = struct.unpack(order + count_fmt, f.read(struct.calcsize(count_fmt)))
        if n * entry > file_size:  # a BigTIFF count can claim 2**64 entries
            raise ValueError(f"truncated TIFF directory ({n} entries, the file has {file_size:,} bytes)")
        raw = f.read(n * entry)
        next_ifd = struct.unpack(order + pointer, f.read(struct.calcsize(pointer)))[0]
        if len(raw) != n * entry:
            raise ValueError("truncated TIFF directory")
        tags = {}
        for e in (raw[i * entry:(i + 1) * entry] for i in range(n)):
            tag, typ, count = struct.unpack(order + ("HHQ" if big else "HHI"), e[:12 if big else 8])
            if tag not in _TAGS or typ not in _TYPES:
                continue
            dtype = np.dtype(order + _TYPES[typ])
            inline = e[12:] if big else e[8:]
            size = dtype.itemsize * count
            if size > file_size:  # read() would allocate the claimed size before finding the end of the file
                raise ValueError(f"truncated TIFF tag {tag} ({count:,} values, the file has {file_size:,} bytes)")
            if size <= len(inline):
                data = inline[:size]
            else:
                f.seek(struct.unpack(order + pointer, inline)[0])
                data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"truncated TIFF tag {tag}")
            tags[tag] = data if tag == TABLES else np.frombuffer(data, dtype).astype(np.int64)
        pages.append(tags)
    return pages


class _Level:
    """One pyramid level: tile grid, byte ranges and the JPEG prefix to put before each tile."""

    def __init__(self, tags: dict, file_size: int):
        self.width, self.height = int(tags[WIDTH][0]), int(tags[LENGTH][0])
        self.tile_w, self.tile_h = int(tags[TILE_W][0]), int(tags[TILE_H][0])
        # bounds on what the tags make this allocate: a tile (decoded, or blank when never scanned) is at
        # most MAX_TILE_SIDE a side; a tile's bytes lie inside the file, so a read is at most the file's size
        if not (0 < self.tile_w <= MAX_TILE_SIDE and 0 < self.tile_h <= MAX_TILE_SIDE):
            raise ValueError(f"stored tiles of {self.tile_w}x{self.tile_h} px (this reader takes 1-{MAX_TILE_SIDE} px a side)")
        self.cols = -(-self.width // self.tile_w)
        self.offsets, self.counts = tags[OFFSETS], tags[COUNTS]
        if not len(self.offsets) == len(self.counts) == self.cols * -(-self.height // self.tile_h):
            raise ValueError(f"{len(self.offsets)} tile offsets for a {self.width}x{self.height} level")
        if len(self.counts) and (self.counts.min() < 0 or (self.offsets + self.counts).max() > file_size):
            raise ValueError(f"tiles reach byte {int((self.offsets + self.counts).max()):,} of a {file_size:,} byte file")
        tables = tags.get(TABLES, b"")
        # prefix replaces each tile's SOI marker: SOI [+ Adobe RGB] [+ tables without SOI/EOI]
        photometric = int(tags[PHOTOMETRIC][0]) if PHOTOMETRIC in tags else -1
        self.prefix = b"\xff\xd8" + (_ADOBE_RGB if photometric == _PHOTOMETRIC_RGB else b"")
        self.prefix += tables[2:-2] if tables else b""


def _is_rgb_jpeg_tiled(tags: dict) -> bool:
    value = lambda tag, default: int(tags[tag][0]) if tag in tags else default  # noqa: E731
    return (TILE_W in tags and TILE_H in tags and OFFSETS in tags and COUNTS in tags
            and value(COMPRESSION, 1) == _JPEG and value(SAMPLES, 1) == 3 and value(PLANAR, 1) == 1
            and all(int(b) == 8 for b in tags.get(BITS, [1])))


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
        with open(path, "rb", buffering=DIRECTORY_READ) as f:
            size = os.fstat(f.fileno()).st_size
            for tags in tiff_pages(f):
                if _is_rgb_jpeg_tiled(tags) and (int(tags[WIDTH][0]), int(tags[LENGTH][0])) not in pages:
                    pages[(int(tags[WIDTH][0]), int(tags[LENGTH][0]))] = _Level(tags, size)
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
        count = int(lv.counts[i])
        return self._stream(level, col, row, os.pread(self._fd, count, int(lv.offsets[i])), count)

    def _stream(self, level: int, col: int, row: int, data: bytes, count: int) -> bytes:
        """A stored tile's `count` bytes as read from the file -> its complete JPEG stream, checked."""
        lv = self.levels[level]
        if len(data) != count or data[:2] != b"\xff\xd8":
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}) is truncated or not JPEG")
        stream = lv.prefix + data[2:]
        # the decoder allocates what the frame header (SOF) says: check it against the TIFF's tile size first
        # (a header claiming 65500 x 65500 px would make it allocate 12 GiB); 4 µs a tile
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(stream)
        except ValueError as e:
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}): {e}") from None
        if (w, h) != (lv.tile_w, lv.tile_h):
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}): its JPEG header says {w}x{h} px, "
                          f"the TIFF's tiles are {lv.tile_w}x{lv.tile_h}")
        return stream

    def tile_runs(self, level: int, x: int, y: int, w: int, h: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """The stored tiles that region (x, y, w, h) of a level covers, as runs that lie back to back in the
        file: [(offset of the run, its bytes, [(col, row, byte count), ...])], in read order. Writers store a level's tiles
        row by row, so a region's tiles in one row are usually one run: read_runs reads each run with one
        os.pread (on a network file system a read costs milliseconds, whatever its size). Tiles stored with
        zero bytes (never scanned, decoded as blank) are left out."""
        lv = self.levels[level]
        runs, tiles, start, end = [], None, -1, -1
        for col, row in self.stored_tiles(level, x, y, w, h):
            i = row * lv.cols + col
            offset, count = int(lv.offsets[i]), int(lv.counts[i])
            if count == 0:
                continue
            if offset != end:  # not right after the previous tile: a new run
                if tiles:
                    runs.append((start, end - start, tiles))
                start, tiles = offset, []
            tiles.append((col, row, count))
            end = offset + count
        if tiles:
            runs.append((start, end - start, tiles))
        return runs

    def read_runs(self, level: int, runs) -> dict[tuple[int, int], bytes]:
        """{(col, row): JPEG stream} of the tiles of tile_runs(), one os.pread a run (errors as tile_bytes')."""
        streams = {}
        for offset, size, tiles in runs:
            data = os.pread(self._fd, size, offset)
            start = 0
            for col, row, count in tiles:
                streams[col, row] = self._stream(level, col, row, data[start:start + count], count)
                start += count
        return streams

    def stored_tiles(self, level: int, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
        """(col, row) of the stored tiles that region (x, y, w, h) of a level covers, in read order."""
        lv = self.levels[level]
        return [(col, row) for row in range(y // lv.tile_h, (y + h - 1) // lv.tile_h + 1)
                for col in range(x // lv.tile_w, (x + w - 1) // lv.tile_w + 1)]

    def decode_tile(self, level: int, col: int, row: int, data: bytes | None = None, scale: int = 1) -> np.ndarray:
        """(tile_h, tile_w, 3) uint8 / scale, including any padding past the image edge. data: the tile's
        stream when already read (tile_bytes); scale 2, 4 or 8: libjpeg-turbo's scaled IDCT, which decodes
        straight to 1/scale of the size (cheaper than a full decode, and no resize afterwards)."""
        lv = self.levels[level]
        if lv.counts[row * lv.cols + col] == 0:  # never scanned: blank, as OpenSlide renders it
            return np.full((lv.tile_h // scale, lv.tile_w // scale, 3), 255, np.uint8)
        try:
            data = self.tile_bytes(level, col, row) if data is None else data
            if scale == 1:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=lv.tile_w // scale, min_height=lv.tile_h // scale)
        except ValueError as e:  # simplejpeg reports corrupt streams as ValueError
            raise OSError(f"{self.path}: level {level} tile ({col}, {row}): {e}") from None

    def read(self, level: int, x: int, y: int, w: int, h: int, *, scale: int = 1, fetched=None) -> np.ndarray:
        """(h, w, 3) uint8 region (possibly a strided view) whose top-left is (x, y) in level pixels;
        with scale s, the region decoded at 1/s of its size, (h/s, w/s, 3): x, y, w, h and the stored
        tile size must then be multiples of s. fetched: {(col, row): the tile's stream} of tiles already
        read (read_runs, ahead of the decode); the others are read here.

        The region must lie inside the level. One stored tile is decoded when it fits in one.
        """
        lv = self.levels[level]
        if x < 0 or y < 0 or x + w > lv.width or y + h > lv.height:
            raise ValueError(f"{self.path}: region ({x}, {y}, {w}, {h}) outside level {level} "
                             f"of size {lv.width}x{lv.height}")
        if (x | y | w | h | lv.tile_w | lv.tile_h) % scale:
            raise ValueError(f"{self.path}: region ({x}, {y}, {w}, {h}) not on the 1/{scale} grid of level {level}")
        data = (fetched or {}).get
        c0, c1 = x // lv.tile_w, (x + w - 1) // lv.tile_w
        r0, r1 = y // lv.tile_h, (y + h - 1) // lv.tile_h
        x, y, w, h, tw, th = x // scale, y // scale, w // scale, h // scale, lv.tile_w // scale, lv.tile_h // scale
        if c0 == c1 and r0 == r1:  # the grid-aligned case: no copy into a mosaic
            tile = self.decode_tile(level, c0, r0, data((c0, r0)), scale)
            ox, oy = x - c0 * tw, y - r0 * th
            return tile[oy:oy + h, ox:ox + w]  # a view: the caller's np.stack copies it once
        out = np.empty((h, w, 3), np.uint8)
        for row in range(r0, r1 + 1):
            for col in range(c0, c1 + 1):
                tile = self.decode_tile(level, col, row, data((col, row)), scale)
                # overlap of this tile with the region, in (scaled) level coordinates
                tx, ty = col * tw, row * th
                ax, ay = max(x, tx), max(y, ty)
                bx, by = min(x + w, tx + tw), min(y + h, ty + th)
                out[ay - y:by - y, ax - x:bx - x] = tile[ay - ty:by - ty, ax - tx:bx - tx]
        return out
