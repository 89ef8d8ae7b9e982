"""Build a manifest CSV from a folder of slides, reporting every file that cannot be used.

    python -m pathfm.data.manifest /data/slides -o manifest.csv [--ext .svs .tif] [--group-from-parent]

Each file is opened with OpenSlide; per file it says what is wrong: unreadable, not a slide, or
no resolution metadata (written to the CSV anyway, with an empty `mpp` to fill in, since the
slide itself is fine). Exit status 1 when no file is usable. A DICOM slide is a folder of
instances (one .dcm per pyramid level or frame group): it is one row, named by its first
instance, from which OpenSlide finds the others in the same folder.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pathfm.data.slides import SlideError, open_slide, slide_mpp

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".dcm", ".czi")


def scan(folder: Path, extensions=SLIDE_EXTENSIONS, group_from_parent: bool = False):
    """-> (rows [{path, mpp, weight, group}], problems [(path, message)])."""
    rows, problems = [], []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    first_instance = {}
    for p in files:
        if p.suffix.lower() == ".dcm":
            first_instance.setdefault(p.parent, p)  # files are sorted: each DICOM folder's first instance
    files = [p for p in files if p.suffix.lower() != ".dcm" or first_instance[p.parent] == p]
    for path in files:
        group = path.parent.name if group_from_parent else ""
        try:
            slide = open_slide(str(path))
        except SlideError as e:
            problems.append((str(path), str(e)))
            continue
        try:
            mpp = f"{slide_mpp(slide, str(path), None):g}"
        except SlideError as e:
            problems.append((str(path), str(e)))
            mpp = ""
        finally:
            slide.close()
        rows.append({"path": str(path), "mpp": mpp, "weight": "1", "group": group})
    return rows, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--ext", nargs="+", default=list(SLIDE_EXTENSIONS), help="file extensions to scan")
    parser.add_argument("--group-from-parent", action="store_true", help="group = the file's parent folder")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"{args.folder}: not a folder", file=sys.stderr)
        return 1
    rows, problems = scan(args.folder, tuple(e.lower() for e in args.ext), args.group_from_parent)
    for path, message in problems:
        print(f"PROBLEM {message}", file=sys.stderr)
    with open(args.output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "mpp", "weight", "group"])
        writer.writeheader()
        writer.writerows(rows)
    missing = sum(1 for r in rows if not r["mpp"])
    print(f"{args.output}: {len(rows)} slides ({missing} without mpp: fill the 'mpp' column), "
          f"{len(problems) - missing} unusable files")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
