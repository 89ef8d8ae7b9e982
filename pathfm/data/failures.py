"""Read failures of every loader worker on every rank, shared through one folder of the run folder.

    failures = ReadFailures(run_dir / "read_failures", name="rank00003-worker02")
    failures.record(slide, path, reason)      # append one line to this worker's own file
    failures.counts()                          # {slide: failures} over every worker and rank
    summarise(run_dir / "read_failures", run_dir / "skipped_slides.csv", drop_at=3)
    killed_slides(run_dir / "read_failures")    # slides a reader process died on: a resumed run skips them

Each worker appends to its own file, so no two processes write one file (no locks, safe on network
file systems), and every worker reads the others' new lines at most every REFRESH_S seconds: a slide
that fails `drop_at` times anywhere is dropped everywhere within seconds. Slides are index positions.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

REFRESH_S = 5.0
DIED = "reader process died"  # how a failure that killed its loader worker starts (pathfm.data.loader)


def _parse(text: str) -> list[tuple[int, str, str]]:
    return [(int(r[0]), r[1], r[2]) for r in csv.reader(io.StringIO(text)) if len(r) == 3]


class ReadFailures:
    """This worker's failure file plus what it has read of everybody's (folder None: in memory only)."""

    def __init__(self, folder: Path | None, name: str):
        self.folder, self.name = (Path(folder) if folder else None), name
        self.mine: Counter = Counter()
        self.everyone: Counter = Counter()
        self._offsets: dict[str, int] = {}
        self._next_refresh = 0.0

    def record(self, slide: int, path: str, reason: str) -> None:
        self.mine[slide] += 1
        self.everyone[slide] += 1
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        line = io.StringIO()
        csv.writer(line).writerow([slide, path, " ".join(reason.split())[:500]])
        own = self.folder / f"{self.name}.csv"
        with open(own, "a") as f:
            f.write(line.getvalue())
        self._offsets[own.name] = self._offsets.get(own.name, 0) + len(line.getvalue().encode())

    def counts(self, force: bool = False) -> Counter:
        """{slide: failures} seen anywhere; the files are re-read at most every REFRESH_S seconds."""
        now = time.monotonic()
        if self.folder is None or not (force or now >= self._next_refresh) or not self.folder.is_dir():
            return self.everyone
        self._next_refresh = now + REFRESH_S
        for entry in os.scandir(self.folder):
            if not entry.name.endswith(".csv") or entry.name == f"{self.name}.csv":
                continue
            start = self._offsets.get(entry.name, 0)
            if entry.stat().st_size <= start:
                continue
            with open(entry.path, "rb") as f:
                f.seek(start)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
            self._offsets[entry.name] = start + len(complete)
            for slide, _, _ in _parse(complete.decode(errors="replace")):
                self.everyone[slide] += 1
        return self.everyone


def summarise(folder: Path, out_csv: Path, drop_at: int) -> tuple[int, int]:
    """Merge every worker's failures into out_csv (path, failures, dropped, last reason), atomically.
    Returns (read failures in total, slides dropped)."""
    per_slide: dict[int, list] = {}
    if Path(folder).is_dir():
        for p in sorted(Path(folder).glob("*.csv")):
            text = p.read_bytes()
            for slide, path, reason in _parse(text[: text.rfind(b"\n") + 1].decode(errors="replace")):
                row = per_slide.setdefault(slide, [path, 0, ""])
                row[1] += 1
                row[2] = reason
    if not per_slide:
        return 0, 0
    out_csv = Path(out_csv)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_csv.name}.", suffix=".tmp", dir=out_csv.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "read_failures", "dropped", "last_reason"])
        for slide, (path, n, reason) in sorted(per_slide.items(), key=lambda kv: -kv[1][1]):
            w.writerow([path, n, int(n >= drop_at or reason.startswith(DIED)), reason])
    os.replace(tmp, out_csv)
    return (sum(r[1] for r in per_slide.values()),
            sum(r[1] >= drop_at or r[2].startswith(DIED) for r in per_slide.values()))


def killed_slides(folder: Path) -> set[int]:
    """Slides (index positions) whose read killed a loader worker, in any rank or earlier launch of the run:
    a resumed or requeued run skips them instead of dying on them again."""
    killed = set()
    if Path(folder).is_dir():
        for p in sorted(Path(folder).glob("*.csv")):
            text = p.read_bytes()
            killed.update(s for s, _, reason in _parse(text[: text.rfind(b"\n") + 1].decode(errors="replace"))
                          if reason.startswith(DIED))
    return killed


class Reading:
    """What one loader worker is reading: "pid step slide path" on one line of a file of its own
    (FOLDER/NAME.reading), rewritten only when the step or slide changes (a few µs, once per visit). When the
    worker stalls or dies, the trainer reads it to name the slide and the step."""

    def __init__(self, folder: Path | None, name: str):
        self.path = Path(folder) / f"{name}.reading" if folder else None
        self.fd, self.pid, self.last = None, None, None

    def note(self, step: int, slide: int, path: str) -> None:
        if self.path is None or (step, slide) == self.last:
            return
        if self.pid != os.getpid():  # opened in the process that reads (a worker), not inherited
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd, self.pid = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644), os.getpid()
        line = f"{self.pid}\t{step}\t{slide}\t{path}\n".encode()
        os.pwrite(self.fd, line, 0)
        os.ftruncate(self.fd, len(line))
        self.last = (step, slide)


def readings(folder: Path, rank: int) -> dict[str, tuple[int, int, int, str]]:
    """{worker name: (pid, step, slide, path)} of this rank's loader workers, as they last wrote them."""
    out = {}
    for p in sorted(Path(folder).glob(f"rank{rank:05d}-*.reading")) if folder else []:
        fields = p.read_text(errors="replace").rstrip("\n").split("\t")
        if len(fields) == 4 and all(f.lstrip("-").isdigit() for f in fields[:3]):
            out[p.name[len(f"rank{rank:05d}-"):-len(".reading")]] = (int(fields[0]), int(fields[1]), int(fields[2]), fields[3])
    return out
