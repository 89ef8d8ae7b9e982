"""The slide fuzzer: mutated copies of a synthetic slide (TIFF tags and their counts, tile offsets and byte counts,
stored tile and level sizes, JPEG frame headers, random bytes in the directories and the tiles, truncation) are each
indexed and read under a 3 GB address-space cap, with a time limit per slide. Every one must be refused with a
reason naming it, or read: never a hang, a crash of the build, or an allocation the file's bytes do not warrant."""

import json
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from pathfm.data.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
HUGE32 = 0xFFFFFFFF


def _entry(path, page, code):
    """(entry offset, value offset, count) of a tag of one TIFF page (classic TIFF, little endian)."""
    with tifffile.TiffFile(path) as t:
        tag = t.pages[page].tags[code]
        return tag.offset, tag.valueoffset, tag.count


def _tile(path, page, i=0):
    with tifffile.TiffFile(path) as t:
        p = t.pages[page]
        return p.dataoffsets[i], p.databytecounts[i]


def mutants(base: Path, out: Path, seed: int = 0) -> list[Path]:
    """Mutated copies of `base`, each changing one thing (or a few random bytes); deterministic in seed."""
    data, rng, made = base.read_bytes(), np.random.default_rng(seed), []

    def mutant(name, *patches, cut=None):
        b = bytearray(data[:cut] if cut else data)
        for at, value in patches:
            b[at:at + len(value)] = value
        made.append(out / f"{name}.svs")
        made[-1].write_bytes(bytes(b))

    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    for page in (0, 1):  # level 0 and the top level
        # (a level 0 of 1024 x 10**7 px is not here: OpenSlide then reads 10 Gpx for the mask, which only the
        # build's time limit ends; tests/test_data_faults.py tests that limit)
        for code, values in ((256, (0, 10**7, HUGE32)), (257, (0, HUGE32) if page == 0 else (0, 10**7, HUGE32)),
                             (322, (0, 16, 65535, HUGE32)), (323, (0, 65535))):
            entry, _, _ = _entry(base, page, code)
            for v in values:
                mutant(f"p{page}-tag{code}-value{v}", (entry + 8, u32(v)))
        for code in (324, 325):  # tile offsets / byte counts: a count claiming GBs of values
            entry, _, _ = _entry(base, page, code)
            for v in (1, 2**28, HUGE32):
                mutant(f"p{page}-tag{code}-count{v}", (entry + 4, u32(v)))
        _, counts_at, _ = _entry(base, page, 325)
        _, offsets_at, _ = _entry(base, page, 324)
        mutant(f"p{page}-tile0-bytes-huge", (counts_at, u32(0x7FFFFFFF)))
        mutant(f"p{page}-tile0-offset-past-end", (offsets_at, u32(len(data) - 10)))
        tile_at, tile_bytes = _tile(base, page)
        sof = data.index(b"\xff\xc0", tile_at, tile_at + tile_bytes)  # the frame header: height, width
        for h, w in ((65500, 65500), (1, 1), (0, 0), (128, 65500)):
            mutant(f"p{page}-tile0-sof-{w}x{h}", (sof + 5, struct.pack(">HH", h, w)))
    mutant("ifd-entries-ffff", (int.from_bytes(data[4:8], "little"), b"\xff\xff"))
    for frac in (0.001, 0.3, 0.9):
        mutant(f"cut-{frac}", cut=max(8, int(len(data) * frac)))
    for k in range(6):  # random bytes in the directories of level 0, then in its first tiles
        region = (8, 1024) if k < 3 else (_tile(base, 0)[0], _tile(base, 0)[0] + 4096)
        at = rng.integers(*region, 8)
        mutant(f"random-{k}", *((int(a), bytes([int(rng.integers(256))])) for a in at))
    return made


CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a 12 GiB tile, or GBs of tag values, fail under it
import numpy as np, openslide
from pathfm.data import index as I
from pathfm.data.jpegtiles import JpegTiffReader
from pathfm.data.slides import SlideEntry
paths, out = json.loads(sys.argv[1]), sys.argv[2]
entries = [SlideEntry(p, mpp=0.5) for p in paths]
index = I.build_index(entries, out, I.IndexParams(64, (0.5, 2.0), 0.1), workers=2, timeout_s=20, progress=False)
result = {r["path"]: r["reason"] for r in index.unusable()}
for i in range(len(index)):  # the slides the build kept: read tiles of every level, as the sampler would
    s = index.slide(i)
    start = time.process_time()  # CPU seconds this process spent: the work, whatever the machine's load
    try:
        try:
            reader = JpegTiffReader(s.info.path, s.info.dimensions)
        except ValueError:
            reader = None
        for level, (w, h) in enumerate(s.info.dimensions):
            for x, y in ((0, 0), (w - 64, h - 64), (w // 3, h // 2)):
                if reader is not None:
                    reader.read(level, x, y, 64, 64)
                else:
                    slide = openslide.OpenSlide(s.info.path)
                    ds = s.info.downsamples[level]
                    slide.read_region((round(x * ds), round(y * ds)), level, (64, 64))
        result[s.info.path] = "read"
    except (OSError, openslide.OpenSlideError) as e:  # a read error: the sampler counts it and drops the slide
        result[s.info.path] = f"read error: {s.info.path}: {e}"
    assert time.process_time() - start < 20, s.info.path
print(json.dumps(result))
"""


def test_mutated_slides_are_refused_with_a_reason_or_read(tmp_path):
    base = tmp_path / "base.svs"
    write_synthetic_slide(base, 1024, seed=3, tile=128, min_level_size=256)
    made = mutants(base, tmp_path)
    assert len(made) == 57
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(m) for m in made]), str(tmp_path / "index")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.splitlines()[-1])
    assert sorted(result) == sorted(str(m) for m in made)
    for path, what in result.items():
        assert "MemoryError" not in what and "Unable to allocate" not in what, (path, what)
        assert what == "read" or Path(path).name in what, (path, what)  # a reason names the file
    name = lambda stem: str(tmp_path / f"{stem}.svs")  # noqa: E731
    # the 65500 x 65500 frame header and the tags claiming GBs are refused, not allocated
    assert "its JPEG header says 65500x65500 px, the TIFF's tiles are 128x128" in result[name("p0-tile0-sof-65500x65500")]
    assert result[name("cut-0.9")] != "read" and result[name("p0-tag324-count4294967295")] != "read"
    assert sum(v == "read" for v in result.values()) >= 5  # harmless mutations still read
