"""Whole-slide images: the manifest, opening slides, resolution, pyramid levels, tissue masks.

    entries = read_manifest("tcga.csv")                  # [SlideEntry(path, mpp, weight, group)]
    info = open_slide_info(entries[0])                    # SlideInfo: mpp, level sizes and downsamples
    mask = load_or_compute_tissue_mask(info, ".cache")    # (h, w) uint8 at info-independent 8 µm/px

A tile at a target resolution is read from the pyramid level closest to it from below and only
the remainder is resized (`plan_read`), at coordinates aligned to that level's downsample: a
224 px tile at 2 µm/px read from level 0 of a 0.25 µm/px slide costs 64x the pixels, and an
unaligned read at a higher level makes OpenSlide interpolate (slower and blurred).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from pathfm.data.jpegtiles import COUNTS, OFFSETS, JpegTiffReader, tiff_pages

# A level serves a target mpp "exactly" when its mpp is within this relative distance: scanners
# write 0.2527 or 0.499 for nominal 0.25 and 0.5, and a 1% resize only blurs.
MPP_TOLERANCE = 0.05
MASK_MPP = 8.0  # µm/px of the tissue mask: a 224 px tile at 0.25 µm/px still spans 7 mask pixels
MASK_MAX_SIDE = 4096  # coarser than MASK_MPP for slides larger than 4096 * 8 µm = 3.3 cm
MASK_VERSION = 1  # bump when the mask computation changes, so stale cached masks are not used
MASK_READ_MAX_PX = 64_000_000  # most pixels read at once for one row of the tissue mask (192 MB of RGB)
MAX_REGION_FACTOR = 16  # a tile is read from a region at most 16x its side (a level at most 16x finer than the target)
# What the sizes in a slide file (its level sizes, downsamples, mpp) can make pathfm allocate, and why:
# - the tissue mask is at most MASK_MAX_SIDE a side (mask_scale), whatever the level-0 size claims;
# - making it reads one band of the level at a time: at most MASK_READ_MAX_PX for one mask row, else the
#   slide is refused (a level far wider than its pyramid warrants: a real 200k px single-level scan needs 10 Mpx);
# - a tile is a region of at most MAX_REGION_FACTOR x the tile side (usable_mpps), inside the level;
# - TIFF tag counts, tile offsets and byte counts, stored tile and JPEG frame sizes: pathfm.data.jpegtiles.


class SlideError(Exception):
    """A slide or manifest that cannot be used; the message names the file and the fix."""


@dataclass
class SlideEntry:
    """One manifest row."""

    path: str
    mpp: float | None = None  # level-0 µm/px; overrides the file's metadata
    weight: float = 1.0  # sampling weight of this slide
    group: str = ""  # cohort / project, for group-balanced sampling


def read_manifest(path) -> list[SlideEntry]:
    """Read a manifest CSV: `path` required; `mpp`, `weight`, `group` optional.

    Relative slide paths are taken relative to the manifest's folder. Errors name the row
    (1-based, header = row 1) and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"manifest {path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise SlideError(f"manifest {path}: no 'path' column (found {columns}); "
                             "the header must have path[,mpp][,weight][,group]")
        unknown = set(columns) - {"path", "mpp", "weight", "group"}
        if unknown:
            raise SlideError(f"manifest {path}: unknown column(s) {sorted(unknown)}; "
                             "allowed: path, mpp, weight, group")
        entries = []
        for row_number, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            where = f"manifest {path} row {row_number}"
            if not row["path"]:
                raise SlideError(f"{where}: empty 'path'")
            slide_path = Path(row["path"])
            if not slide_path.is_absolute():
                slide_path = path.parent / slide_path
            mpp = _positive(row.get("mpp", ""), f"{where} column 'mpp'", allow_empty=True)
            weight = _positive(row.get("weight", ""), f"{where} column 'weight'", allow_empty=True)
            entries.append(SlideEntry(str(slide_path), mpp, 1.0 if weight is None else weight,
                                      row.get("group", "")))
    if not entries:
        raise SlideError(f"manifest {path}: no rows")
    return entries


def _positive(text: str, where: str, allow_empty: bool) -> float | None:
    if text == "" and allow_empty:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SlideError(f"{where}: {text!r} is not a number (expected a positive number)") from None
    if not (value > 0 and math.isfinite(value)):
        raise SlideError(f"{where}: {text!r} must be a positive finite number")
    return value


@dataclass
class SlideInfo:
    """What the sampler needs to know about a slide, small and picklable (no handle)."""

    path: str
    mpp: float  # level-0 µm/px
    dimensions: list[tuple[int, int]]  # (width, height) per level
    downsamples: list[float]  # per level, relative to level 0
    file_id: str  # path + size + mtime: the key of cached tissue masks


def file_identity(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def open_slide(path: str, cache: openslide.OpenSlideCache | None = None) -> openslide.OpenSlide:
    """Open with OpenSlide, turning every failure into a SlideError that names the file."""
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise SlideError(f"{path}: empty file (0 bytes); copy the slide again")
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(truncated(path) or f"{path}: not a slide OpenSlide can read (unsupported or not an image)") from None
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(truncated(path) or f"{path}: unreadable slide ({e})") from None
    if cache is not None:
        slide.set_cache(cache)  # one bounded cache shared by every handle in this process
    return slide


def truncated(path: str) -> str:
    """A message when `path` is a TIFF cut short (its directories or tiles point past its end), else ""."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            pages = tiff_pages(f)
    except ValueError as e:
        return f"{path}: truncated TIFF ({size:,} bytes): {e}; copy the slide again" if "truncated" in str(e) else ""
    for tags in pages:
        if OFFSETS in tags and COUNTS in tags and len(tags[OFFSETS]) == len(tags[COUNTS]):
            end = int((tags[OFFSETS] + tags[COUNTS]).max(initial=0))
            if end > size:
                return f"{path}: truncated ({size:,} bytes, its tiles reach byte {end:,}); copy the slide again"
    return ""


def slide_mpp(slide: openslide.OpenSlide, path: str, manifest_mpp: float | None) -> float:
    """Level-0 µm/px: the manifest's value, else the file's metadata, else a SlideError."""
    if manifest_mpp is not None:
        return float(manifest_mpp)
    props = slide.properties
    try:
        mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        raise SlideError(f"{path}: no resolution (mpp) in the file's metadata; "
                         "add an 'mpp' column with its level-0 µm/px to the manifest") from None
    if not (mpp_x > 0 and abs(mpp_x - mpp_y) <= MPP_TOLERANCE * mpp_x):
        raise SlideError(f"{path}: unusable resolution mpp-x={mpp_x}, mpp-y={mpp_y}; "
                         "give the level-0 mpp in the manifest")
    return mpp_x


def open_slide_info(entry: SlideEntry) -> SlideInfo:
    slide = open_slide(entry.path)
    try:
        mpp = slide_mpp(slide, entry.path, entry.mpp)
        return SlideInfo(entry.path, mpp, list(slide.level_dimensions),
                         [float(d) for d in slide.level_downsamples], file_identity(entry.path))
    finally:
        slide.close()


@dataclass(frozen=True)
class ReadPlan:
    """How to produce a tile of `size` px at a target mpp: read `region` px at `level`, resize."""

    level: int
    downsample: float  # of that level
    region: int  # side of the region read at that level, in that level's pixels
    footprint: float  # side of the tile in level-0 pixels


def plan_read(info: SlideInfo, target_mpp: float, size: int) -> ReadPlan:
    """Pick the coarsest level whose mpp is at most the target (within MPP_TOLERANCE).

    A target finer than level 0 (e.g. 0.25 µm/px on a 0.5 µm/px scan) would need upsampling;
    the sampler does not use such magnifications for that slide (see `usable_mpps`).
    """
    best = 0
    for level, ds in enumerate(info.downsamples):
        if info.mpp * ds <= target_mpp * (1 + MPP_TOLERANCE):
            best = level  # downsamples increase with the level
    ds = info.downsamples[best]
    ratio = target_mpp / (info.mpp * ds)  # remaining scale factor, >= 1 - tolerance
    region = size if abs(ratio - 1) <= MPP_TOLERANCE else round(size * ratio)
    return ReadPlan(best, ds, region, region * ds)


def usable_mpps(info: SlideInfo, mpps: list[float], size: int) -> list[float]:
    """Target mpps this slide can serve: not finer than level 0, tile not larger than the slide."""
    width, height = info.dimensions[0]
    out = []
    for mpp in mpps:
        if mpp < info.mpp * (1 - MPP_TOLERANCE):
            continue
        plan = plan_read(info, mpp, size)
        w, h = info.dimensions[plan.level]
        if plan.region <= w and plan.region <= h and plan.region <= MAX_REGION_FACTOR * size:
            out.append(mpp)
    return out


# ---------------------------------------------------------------- tissue masks


def tissue_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail -> (h, w) bool tissue.

    Stained tissue is coloured; glass is white or light grey and pen marks / dust are dark. HSV
    saturation (max - min) / max > 0.08 with value (max) in [40, 245] of 255 separates them on
    H&E scans without a per-slide threshold that would split an all-tissue slide in two.
    """
    r, g, b = np.moveaxis(rgb, -1, 0).copy()  # contiguous planes: 20x faster than reducing over axis -1
    value = np.maximum(np.maximum(r, g), b)
    chroma = (value - np.minimum(np.minimum(r, g), b)).astype(np.int16)  # uint8 - smaller uint8: no wrap
    return (chroma * 100 > 8 * np.maximum(value, 1).astype(np.int16)) & (value >= 40) & (value <= 245)


def mask_scale(info: SlideInfo) -> float:
    """Level-0 pixels per mask pixel."""
    width, height = info.dimensions[0]
    scale = MASK_MPP / info.mpp
    return max(scale, max(width, height) / MASK_MAX_SIDE, 1.0)


def mask_shape(info: SlideInfo) -> tuple[int, int]:
    """(h, w) of the slide's tissue mask: at most MASK_MAX_SIDE a side."""
    scale = mask_scale(info)
    width, height = info.dimensions[0]
    return max(1, math.ceil(height / scale)), max(1, math.ceil(width / scale))


def compute_tissue_mask(info: SlideInfo, slide: openslide.OpenSlide) -> np.ndarray:
    """(h, w) uint8 0/1 mask; mask pixel (r, c) covers level-0 [c*s, (c+1)*s) x [r*s, (r+1)*s)."""
    scale = mask_scale(info)
    h, w = mask_shape(info)
    # The coarsest level that still has at least the mask's resolution, read whole and shrunk.
    level = max(i for i, ds in enumerate(info.downsamples) if ds <= scale or i == 0)
    lw, lh = info.dimensions[level]
    per_row = scale / info.downsamples[level]  # level rows per mask row
    if lw * min(lh, math.ceil(per_row)) > MASK_READ_MAX_PX:
        raise SlideError(f"{info.path}: level {level} claims {lw}x{lh} px, so one row of the tissue mask would read "
                         f"{lw * min(lh, math.ceil(per_row)) / 1e6:,.0f} Mpx at once (limit {MASK_READ_MAX_PX / 1e6:.0f} Mpx); "
                         "its level sizes do not fit a slide pyramid")
    # Read in horizontal bands of about 16 Mpx, so a single-level 100k px scan fits in memory.
    band = max(1, int(16e6 / (lw * per_row * per_row)))
    try:  # JPEG-tiled TIFF: decode the stored tiles directly (the same pixels, 10x faster than OpenSlide)
        jpeg = JpegTiffReader(info.path, info.dimensions)
        # a band is often thinner than a row of stored tiles (16 level rows on a 40000 px single-level slide):
        # keep two rows of decoded tiles for the next bands, or each tile is decoded once per band it meets
        # (16 times there: 71 s of CPU for one 2 x 2 cm slide)
        jpeg.decode_tile = functools.lru_cache(maxsize=2 * jpeg.levels[level].cols)(jpeg.decode_tile)
    except Exception:  # any other format: OpenSlide
        jpeg = None
    rows = []
    try:
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            y0, y1 = round(r0 * per_row), min(lh, round(r1 * per_row))
            if y1 <= y0:  # the mask's last row lies past the level's rounded edge
                rows.append(np.full((r1 - r0, w, 3), 255, np.uint8))
                continue
            if jpeg is not None:
                rgb = Image.fromarray(np.ascontiguousarray(jpeg.read(level, 0, y0, lw, y1 - y0)))
            else:
                region = slide.read_region((0, round(y0 * info.downsamples[level])), level, (lw, y1 - y0))
                # premultiplied RGBA, transparent (0) outside the scanned area: make it white
                rgb = Image.new("RGB", region.size, (255, 255, 255))
                rgb.paste(region, mask=region.split()[3])
            rows.append(np.asarray(rgb.resize((w, r1 - r0), Image.BOX)))
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"{info.path}: unreadable slide while making the tissue mask ({e})") from None
    finally:
        if jpeg is not None:
            jpeg.decode_tile.cache_clear()
            jpeg.close()
    thumb = np.concatenate(rows)  # (h, w, 3)
    return tissue_from_rgb(thumb).astype(np.uint8)


def tissue_mask_path(info: SlideInfo, cache_dir) -> Path:
    key = hashlib.sha1(f"{info.file_id}|{MASK_VERSION}|{mask_scale(info)}".encode()).hexdigest()[:20]
    return Path(cache_dir) / "tissue" / f"{Path(info.path).stem}-{key}.npy"


def load_or_compute_tissue_mask(info: SlideInfo, cache_dir, slide=None) -> tuple[np.ndarray, Path]:
    """The slide's tissue mask, computed once and cached on disk keyed by the file's identity.

    The file is written under a temporary name and renamed, so a concurrent reader (another
    rank preparing the same manifest) never sees half a mask.
    """
    path = tissue_mask_path(info, cache_dir)
    if path.exists():
        try:  # mapped first: a corrupt header cannot make np.load allocate what it claims
            cached = np.load(path, mmap_mode="r")
            if cached.shape == mask_shape(info) and cached.dtype == np.uint8:
                return np.array(cached), path
        except (OSError, ValueError):
            pass  # corrupt cache file: recompute below
    own = slide is None
    slide = open_slide(info.path) if own else slide
    try:
        mask = compute_tissue_mask(info, slide)
    finally:
        if own:
            slide.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, mask)
    os.replace(tmp, path)
    return mask, path


# ---------------------------------------------------------------- colour filter


@dataclass(frozen=True)
class HSVFilter:
    """Virchow2-style colour filter: keep a tile when >= `min_share` of its pixels fall in the box.

    Units: hue in degrees [0, 360), saturation and value in [0, 255]. The defaults are the
    published ranges written in OpenCV units (H 90-180 of 180, S 8-255, V 103-255): hues from
    cyan through blue and purple to pink, which admits haematoxylin and eosin and rejects
    white glass, black pen and most blur/debris.
    """

    hue: tuple[float, float] = (180.0, 360.0)
    saturation: tuple[float, float] = (8.0, 255.0)
    value: tuple[float, float] = (103.0, 255.0)
    min_share: float = 0.6

    def share(self, rgb: np.ndarray) -> float:
        """(H, W, 3) uint8 -> share of pixels inside the HSV box."""
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.float32)  # all in 0-255
        hue = hsv[..., 0] * (360.0 / 256.0)
        inside = ((hue >= self.hue[0]) & (hue <= self.hue[1])
                  & (hsv[..., 1] >= self.saturation[0]) & (hsv[..., 1] <= self.saturation[1])
                  & (hsv[..., 2] >= self.value[0]) & (hsv[..., 2] <= self.value[1]))
        return float(inside.mean())

    def accepts(self, rgb: np.ndarray) -> bool:
        return self.share(rgb) >= self.min_share


def decode_scale(region: int, size: int) -> int:
    """1, 2, 4 or 8: the JPEG reader decodes a region of `region` px read for a tile of `size` px at
    1/scale (libjpeg-turbo's scaled IDCT), the largest scale that leaves at least `size` px. A 1 µm/px
    tile from a 0.5 µm/px level (448 px -> 224) is then 4-9 half-size decodes and no resize, instead of
    full decodes and an antialiased resize; the pixels differ from that resize by 2.2 grey levels on average
    (median PSNR 37 dB over 300 tiles of bench/data.py's slide)."""
    scale = 1
    while scale < 8 and region >= 2 * scale * size:
        scale *= 2
    return scale
