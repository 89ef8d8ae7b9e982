"""Slides: manifest parsing, mpp and level choice, tissue masks, synthetic slides, the JPEG fast path."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest

from pathfm.data import slides as S
from pathfm.data.jpegtiles import JpegTiffReader
from pathfm.data.synthetic import ensure_synthetic_slides, write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "slides"
CMU = REAL / "CMU-1-Small-Region.svs"
TCGA = REAL / "TCGA-CR-7395-01A-01-TS1.svs"


def need_real():
    if not CMU.exists():
        pytest.skip(f"real slides not found in {REAL}")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "s.svs", 2048, seed=3)


# ---------------------------------------------------------------- manifest


def write(path, text):
    path.write_text(text)
    return path


def test_manifest_reads_optional_columns_and_relative_paths(tmp_path):
    m = write(tmp_path / "m.csv", "path,mpp,weight,group\na.svs,0.25,2,tcga\n/x/b.svs,,,\n")
    entries = S.read_manifest(m)
    assert entries == [S.SlideEntry(str(tmp_path / "a.svs"), 0.25, 2.0, "tcga"),
                       S.SlideEntry("/x/b.svs", None, 1.0, "")]


@pytest.mark.parametrize("text, message", [
    ("file,mpp\na.svs,1\n", "no 'path' column"),
    ("path,mpp\na.svs,abc\n", "row 2 column 'mpp': 'abc' is not a number"),
    ("path,weight\na.svs,1\nb.svs,-1\n", "row 3 column 'weight'"),
    ("path,magnification\na.svs,20\n", "unknown column(s) ['magnification']"),
    ("path\n", "no rows"),
])
def test_manifest_errors_name_row_and_column(tmp_path, text, message):
    with pytest.raises(S.SlideError, match=None) as err:
        S.read_manifest(write(tmp_path / "m.csv", text))
    assert message in str(err.value) and "m.csv" in str(err.value)


def test_manifest_cli_reports_problems(tmp_path, synth):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(synth, folder / "good.svs")
    (folder / "text.svs").write_text("not a slide")
    out = tmp_path / "m.csv"
    run = subprocess.run([sys.executable, "-m", "pathfm.data.manifest", str(folder), "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "text.svs: not a slide" in run.stderr
    assert [e.mpp for e in S.read_manifest(out)] == [0.5]


def hsv_tile(colours_and_shares, size=100):
    """A hand-made (size, size, 3) tile: horizontal bands of RGB colours covering the given shares."""
    rows, start = np.zeros((size, size, 3), np.uint8), 0
    for rgb, share in colours_and_shares:
        rows[start:start + round(share * size)] = rgb
        start += round(share * size)
    return rows


HAEMATOXYLIN, EOSIN = (120, 60, 160), (230, 150, 200)  # hue 276 and 323 deg, S 159 and 89, V 160 and 230 (of 255)
GLASS, PEN, GREEN = (245, 245, 245), (20, 20, 30), (60, 160, 60)  # S 0; V 30 (< 103); hue 120 deg


@pytest.mark.parametrize("tile, kept", [
    ([(HAEMATOXYLIN, 1.0)], True),
    ([(EOSIN, 1.0)], True),
    ([(HAEMATOXYLIN, 0.4), (EOSIN, 0.3), (GLASS, 0.3)], True),  # 70% stained
    ([(HAEMATOXYLIN, 0.5), (GLASS, 0.5)], False),  # 50% < the 60% share
    ([(GLASS, 1.0)], False),
    ([(PEN, 1.0)], False),
    ([(GREEN, 1.0)], False),
])
def test_hsv_filter_on_hand_made_tiles(tile, kept):
    # Midnight / Virchow: >= 60% of pixels with hue 90-180 of OpenCV's 180 (= 180-360 deg), S 8-255, V 103-255
    f = S.HSVFilter()
    assert (f.hue, f.saturation, f.value, f.min_share) == ((180.0, 360.0), (8.0, 255.0), (103.0, 255.0), 0.6)
    assert f.accepts(hsv_tile(tile)) == kept


def test_manifest_lists_a_dicom_slide_once(tmp_path, monkeypatch):
    # a DICOM WSI is a folder of instances: one row per folder, named by its first instance
    from pathfm.data import manifest

    opened = []

    class FakeSlide:
        def close(self):
            pass

    monkeypatch.setattr(manifest, "open_slide", lambda path: opened.append(path) or FakeSlide())
    monkeypatch.setattr(manifest, "slide_mpp", lambda slide, path, mpp: 0.25)
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        for i in range(3):
            (tmp_path / case / f"level{i}.dcm").write_bytes(b"")
    (tmp_path / "other.svs").write_bytes(b"")
    rows, problems = manifest.scan(tmp_path)
    assert not problems
    assert sorted(r["path"] for r in rows) == sorted(str(tmp_path / p) for p in ("case1/level0.dcm", "case2/level0.dcm", "other.svs"))
    assert len(opened) == 3


# ---------------------------------------------------------------- resolution and levels


def info(mpp, downsamples, size=40000):
    dims = [(int(size / d), int(size / d)) for d in downsamples]
    return S.SlideInfo("x.svs", mpp, dims, list(downsamples), "id")


def test_plan_read_uses_closest_level_from_below():
    slide = info(0.25, [1, 4, 16])  # levels at 0.25, 1.0, 4.0 µm/px
    assert S.plan_read(slide, 0.25, 224) == S.ReadPlan(0, 1, 224, 224)
    assert S.plan_read(slide, 0.5, 224) == S.ReadPlan(0, 1, 448, 448)  # level 0, shrink 2x
    assert S.plan_read(slide, 1.0, 224) == S.ReadPlan(1, 4, 224, 896)  # native level, no resize
    assert S.plan_read(slide, 2.0, 224) == S.ReadPlan(1, 4, 448, 1792)  # never level 0 and shrink 8x
    # 0.2527 is "0.25" within the tolerance: read as is, no 1% resize
    assert S.plan_read(info(0.2527, [1, 4]), 0.25, 224).region == 224


def test_usable_mpps_drops_upsampling_and_too_small():
    assert S.usable_mpps(info(0.5, [1, 4]), [0.25, 0.5, 1, 2], 224) == [0.5, 1, 2]
    # 800 px slide at 0.5: a 224 px tile at 2 µm/px needs 896 px
    assert S.usable_mpps(info(0.5, [1], size=800), [0.5, 1, 2], 224) == [0.5, 1]


@pytest.mark.skipif(not TCGA.exists(), reason="real slides not in ../shared/data")
def test_tcga_without_mpp_is_refused_and_accepted_with_manifest_mpp():
    with pytest.raises(S.SlideError, match="TCGA-CR-7395.*add an 'mpp' column"):
        S.open_slide_info(S.SlideEntry(str(TCGA)))
    assert S.open_slide_info(S.SlideEntry(str(TCGA), mpp=0.5)).mpp == 0.5


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(S.SlideError, match="missing.svs: no such file"):
        S.open_slide(str(tmp_path / "missing.svs"))
    (tmp_path / "notes.svs").write_text("hello")
    with pytest.raises(S.SlideError, match="notes.svs: not a slide"):
        S.open_slide(str(tmp_path / "notes.svs"))


# ---------------------------------------------------------------- tissue


def test_tissue_from_rgb_is_the_saturation_and_value_rule_everywhere():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    x = rgb.astype(np.int64)
    value, chroma = x.max(-1), x.max(-1) - x.min(-1)
    expected = (chroma / np.maximum(value, 1) > 0.08) & (value >= 40) & (value <= 245)
    assert np.array_equal(S.tissue_from_rgb(rgb), expected)


@pytest.mark.parametrize("which", ["synthetic", "cmu", "tcga"])
def test_tissue_mask_is_the_same_through_the_jpeg_path_and_openslide(which, synth, monkeypatch):
    if which != "synthetic":
        need_real()
    path = {"synthetic": synth, "cmu": CMU, "tcga": TCGA}[which]
    slide = openslide.OpenSlide(str(path))
    info = S.SlideInfo(str(path), 0.5, list(slide.level_dimensions), [float(d) for d in slide.level_downsamples], "")
    fast = S.compute_tissue_mask(info, slide)
    monkeypatch.setattr(S, "JpegTiffReader", lambda *a: (_ for _ in ()).throw(ValueError("not JPEG")))
    slow = S.compute_tissue_mask(info, slide)
    assert fast.any() and np.array_equal(fast, slow)


def test_tissue_mask_decodes_each_stored_tile_once(tmp_path, monkeypatch):
    """A single-level 8192 px slide at 0.5 µm/px: the mask is read in bands of 7 mask rows (112 level rows), thinner
    than a row of 256 px stored tiles; each of its 32 x 32 stored tiles is decoded once, not once per band."""
    path = write_synthetic_slide(tmp_path / "single.svs", 8192, seed=1, min_level_size=8193)
    slide = openslide.OpenSlide(str(path))
    info = S.SlideInfo(str(path), 0.5, list(slide.level_dimensions), [float(d) for d in slide.level_downsamples], "")
    assert len(info.dimensions) == 1
    decoded = []
    real = JpegTiffReader.decode_tile
    monkeypatch.setattr(JpegTiffReader, "decode_tile", lambda self, *a: decoded.append(a[:3]) or real(self, *a))
    mask = S.compute_tissue_mask(info, slide)
    assert mask.shape == (512, 512) and mask.any()
    assert len(decoded) == len(set(decoded)) == 32 * 32


@pytest.mark.parametrize("which", ["synthetic", "bigtiff", "cmu", "tcga"])
def test_tiff_directories_read_as_tifffile_reads_them(which, synth, tmp_path):
    """The JPEG reader's own TIFF directory parsing gives tifffile's tile grid, offsets, counts and tables."""
    import tifffile

    if which in ("cmu", "tcga"):
        need_real()
    path = {"synthetic": synth, "cmu": CMU, "tcga": TCGA}.get(which)
    if which == "bigtiff":
        path = tmp_path / "big.tif"
        rgb = np.random.default_rng(0).integers(0, 255, (600, 520, 3), dtype=np.uint8)
        tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb", bigtiff=True)
    dims = [tuple(d) for d in openslide.OpenSlide(str(path)).level_dimensions] if which != "bigtiff" else [(520, 600)]
    if which == "tcga":  # JPEG 2000 tiles: not for this reader, OpenSlide reads it
        with pytest.raises(ValueError, match="no tiled JPEG RGB page"):
            JpegTiffReader(str(path), dims)
        return
    ours = JpegTiffReader(str(path), dims).levels
    with tifffile.TiffFile(path) as tif:
        ref = {(p.imagewidth, p.imagelength): p for p in reversed(tif.pages) if p.is_tiled and p.compression == 7}
        for level, d in zip(ours, dims):
            page = ref[d]
            assert (level.width, level.height, level.tile_w, level.tile_h) == (*d, page.tilewidth, page.tilelength)
            assert np.array_equal(level.offsets, page.dataoffsets) and np.array_equal(level.counts, page.databytecounts)
            assert level.prefix.endswith((page.jpegtables or b"\xff\xd8\xff\xd9")[2:-2])


def test_tiff_directory_errors_are_value_errors(tmp_path, synth):
    from pathfm.data.jpegtiles import tiff_pages

    for name, data in {"text": b"not a tiff", "cut": synth.read_bytes()[:12]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError), open(tmp_path / name, "rb") as f:
            tiff_pages(f)


def test_empty_and_truncated_slides_say_so(tmp_path, synth):
    from pathfm.data.index import IndexParams, describe_slide

    data = synth.read_bytes()
    cases = {"empty.svs": b"", "header-cut.svs": data[:4000], "tiles-cut.svs": data[: len(data) * 2 // 3]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(S.SlideError, match="empty file .0 bytes"):
        S.open_slide(str(tmp_path / "empty.svs"))
    with pytest.raises(S.SlideError, match="truncated"):
        S.open_slide(str(tmp_path / "header-cut.svs"))
    record = describe_slide(0, S.SlideEntry(str(tmp_path / "tiles-cut.svs")), IndexParams(64, (0.5,), 0.4), str(tmp_path))
    assert "truncated" in record["reason"] and f"{len(data) * 2 // 3:,} bytes" in record["reason"]
    assert S.truncated(str(synth)) == ""  # an intact slide reads as intact


def test_tissue_from_rgb_hand_values():
    rgb = np.array([[[240, 238, 241], [200, 120, 170], [20, 20, 20], [120, 60, 160]]], np.uint8)
    assert S.tissue_from_rgb(rgb).tolist() == [[False, True, False, True]]  # glass, eosin, pen, nucleus


def test_tissue_mask_is_cached_by_file_identity(tmp_path, synth, monkeypatch):
    path = tmp_path / "s.svs"
    shutil.copy(synth, path)
    slide_info = S.open_slide_info(S.SlideEntry(str(path)))
    mask, cached = S.load_or_compute_tissue_mask(slide_info, tmp_path / "cache")
    assert mask.shape == (128, 128) and 0.2 < mask.mean() < 0.8  # 2048 px * 0.5 µm / 8 µm
    monkeypatch.setattr(S, "compute_tissue_mask", lambda *a: pytest.fail("recomputed a cached mask"))
    again, cached_again = S.load_or_compute_tissue_mask(slide_info, tmp_path / "cache")
    assert cached_again == cached and np.array_equal(again, mask)
    os.utime(path, ns=(1, 1))  # a changed file (new mtime) must not reuse the old mask
    assert S.tissue_mask_path(S.open_slide_info(S.SlideEntry(str(path))), tmp_path / "cache") != cached


def test_hsv_filter_share_hand_computed():
    f = S.HSVFilter()
    tile = np.zeros((4, 4, 3), np.uint8)
    tile[:2] = (200, 120, 170)  # pink: hue 326 deg, S 102, V 200 -> inside
    tile[2:] = (245, 245, 245)  # glass: S 0 -> outside
    assert f.share(tile) == 0.5 and not f.accepts(tile)
    tile[2:] = (110, 70, 160)  # purple: hue 267 deg -> inside
    assert f.accepts(tile)


# ---------------------------------------------------------------- synthetic slides


def test_synthetic_slide_opens_as_aperio_with_levels(synth):
    slide = openslide.OpenSlide(str(synth))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties["openslide.mpp-x"]) == 0.5
    assert slide.level_dimensions == ((2048, 2048), (512, 512))
    assert slide.level_downsamples == (1.0, 4.0)
    # H&E-like: tissue is pink/purple (red and blue above green), glass is near white
    rgb = np.asarray(slide.read_region((0, 0), 1, (512, 512)).convert("RGB")).reshape(-1, 3).astype(int)
    tissue = S.tissue_from_rgb(rgb[None])[0]
    assert 0.2 < tissue.mean() < 0.8
    assert (rgb[tissue, 0] > rgb[tissue, 1]).mean() > 0.95 and (rgb[tissue, 2] > rgb[tissue, 1]).mean() > 0.95
    assert rgb[~tissue].mean() > 225


def test_ensure_synthetic_slides_reuses_files(tmp_path):
    first = ensure_synthetic_slides(tmp_path, n=2, size=1024, seed=7)
    stamps = [p.stat().st_mtime_ns for p in first]
    again = ensure_synthetic_slides(tmp_path, n=2, size=1024, seed=7)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamps
    assert first[0].read_bytes() != first[1].read_bytes()  # different seeds, different slides


# ---------------------------------------------------------------- JPEG fast path == OpenSlide


def same_as_openslide(path, regions):
    slide = openslide.OpenSlide(str(path))
    reader = JpegTiffReader(str(path), slide.level_dimensions)
    for level, x, y, w, h in regions:
        ds = slide.level_downsamples[level]
        ref = np.asarray(slide.read_region((round(x * ds), round(y * ds)), level, (w, h)).convert("RGB"))
        assert np.array_equal(reader.read(level, x, y, w, h), ref), (path.name, level, x, y, w, h)


def test_jpeg_reader_matches_openslide_on_synthetic_ycbcr(synth):
    same_as_openslide(synth, [(0, 0, 0, 256, 256), (0, 100, 37, 300, 500), (0, 1800, 1800, 248, 248),
                              (1, 0, 0, 512, 512), (1, 130, 90, 224, 224)])


def test_jpeg_reader_matches_openslide_on_aperio_rgb_with_tables():
    need_real()  # real Aperio: abbreviated JPEG tiles + JPEGTables, stored as RGB
    same_as_openslide(CMU, [(0, 0, 0, 240, 240), (0, 100, 130, 300, 257), (0, 1900, 2700, 320, 267)])


def test_jpeg_reader_refuses_jpeg2000():
    if not TCGA.exists():
        pytest.skip("real slides not found")
    with pytest.raises(ValueError, match="no tiled JPEG"):
        JpegTiffReader(str(TCGA), [(4443, 3567), (2221, 1783)])


def test_zero_length_tile_reads_blank_as_openslide_renders_it(tmp_path, synth):
    import tifffile

    path = tmp_path / "hole.svs"
    shutil.copy(synth, path)
    with tifffile.TiffFile(path, mode="r+b") as tif:  # tile (0, 0) of level 0 stored with no bytes
        counts = list(tif.pages[0].tags["TileByteCounts"].value)
        counts[0] = 0
        tif.pages[0].tags["TileByteCounts"].overwrite(counts)
    slide = openslide.OpenSlide(str(path))
    rgba = np.asarray(slide.read_region((0, 0), 0, (300, 300)))
    assert rgba[:256, :256, 3].max() == 0 and rgba[-1, -1, 3] == 255  # OpenSlide: transparent where the tile is missing
    white = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3])  # what the sampler makes of transparent pixels
    reader = JpegTiffReader(str(path), slide.level_dimensions)
    assert np.array_equal(reader.read(0, 0, 0, 300, 300), white)


def test_jpeg_reader_corrupt_tile_is_an_oserror(tmp_path, synth):
    path = tmp_path / "corrupt.svs"
    shutil.copy(synth, path)
    reader = JpegTiffReader(str(path), [(2048, 2048), (512, 512)])
    offset = int(reader.levels[0].offsets[0])
    with open(path, "r+b") as f:  # wipe the first tile's JPEG header
        f.seek(offset)
        f.write(b"\0" * 64)
    with pytest.raises(OSError, match="corrupt.svs: level 0 tile \\(0, 0\\)"):
        reader.read(0, 0, 0, 64, 64)
