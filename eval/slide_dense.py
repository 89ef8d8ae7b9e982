"""Slide-level and dense probe tasks as eval/watch.py runs them on each checkpoint, beside the tile tasks.

    probes.tasks: ["crc=crc:/data/crc:train,crc:/data/crc:val",              # tile: kNN (eval/knn.py)
                   "subtype@abmil+meanpool=/data/subtype.csv,/data/index",   # slide: eval/slide_probe.py
                   "glands@seg=/data/glas/train,/data/glas/test"]            # dense: eval/seg_probe.py
    probes.max_slides, probes.max_tiles (tiles per slide; images per split), probes.slide_mpp, probes.img_size

A slide task embeds its labelled slides (at most max_slides, the same ones at every checkpoint) with the checkpoint's
backbone, max_tiles tiles each at slide_mpp and img_size px, then trains each protocol on them; a manifest is indexed
once per run into eval/slide_index/<task>. A dense task takes at most max_tiles images a split. Each protocol writes
results.json where the tile probes do (eval/<step>/<task>/<protocol>/); the per-slide files are deleted afterwards.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def check_task(task) -> None:
    """A slide or dense task's files, checked as the probe will read them: a DatasetError naming what is wrong."""
    from eval.datasets import DatasetError

    where = f"probe task '{task.name}'"
    if task.level == "slide":
        from eval.slide_probe import read_labels

        if not Path(task.train).is_file():
            raise DatasetError(f"{where}: labels file '{task.train}' does not exist (expected a CSV slide,label[,split])")
        try:
            read_labels(task.train)
        except (ValueError, OSError) as e:
            raise DatasetError(f"{where}: {e}") from None
        slides = Path(task.test)
        if not ((slides / "index.json").is_file() or slides.is_file()):
            raise DatasetError(f"{where}: '{slides}' is neither a slide index folder (index.json) nor a manifest CSV")
    elif task.level == "dense":
        from eval.seg_probe import SegFolder

        for folder in (task.train, task.test):
            try:
                SegFolder(folder, 0)
            except (FileNotFoundError, ValueError) as e:
                raise DatasetError(f"{where}: {e}") from None


def run_task(backbone, task, protocols: list[str], base: Path, opts: dict, *, device: str = "cpu",
             num_workers: int = 0, batch_size: int = 64, index_dir: Path | None = None) -> dict:
    """{protocol: results dict} of one slide or dense task for one backbone; results.json in base/<protocol>/."""
    if task.level == "slide":
        from eval.slide_probe import probe_backbone

        try:
            return probe_backbone(backbone, task.train, task.test, base, mpp=opts["slide_mpp"],
                                  tile_size=opts["img_size"], protocols=protocols, max_slides=opts["max_slides"],
                                  max_tiles=opts["max_tiles"], device=device, num_workers=num_workers,
                                  batch_size=batch_size, index_dir=index_dir, task=task.name)
        finally:
            shutil.rmtree(base / "features", ignore_errors=True)  # a checkpoint's slide embeddings are not reused
    if task.level == "dense":
        from eval.seg_probe import probe_backbone

        return {"seg": probe_backbone(backbone, task.train, task.test, base / "seg", max_images=opts["max_tiles"],
                                      device=device, batch_size=batch_size, task=task.name)}
    raise ValueError(f"probe task '{task.name}' is a tile task; eval/watch.py runs those itself")
