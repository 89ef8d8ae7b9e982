"""Labelled tile datasets read from local files, for evaluation (nothing is ever downloaded).

    ds = open_dataset("crc:/data/crc:train")      # KIND:ROOT[:SPLIT], or a plain folder / .csv path
    image, label = ds[0]                          # PIL RGB image (or None if unreadable), int label

Readers:
  folder    ROOT/<class>/<image>                 one subfolder per class, classes sorted by name
  csv       path,label[,split]                   paths relative to the CSV's folder
  crc       ROOT/NCT-CRC-HE-100K (train), ROOT/CRC-VAL-HE-7K (val)                  Kather et al. 2018
  bach      ROOT/ICIAR2018_BACH_Challenge/Photos/<class>/*.tif, eva's patient-wise train/val split
  mhist     ROOT/annotations.csv + ROOT/images/*.png, the file's own train/test partition
  pcam      ROOT/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5            (HDF5, h5py)
  breakhis  ROOT/BreaKHis_v1/histology_slides/breast/**/40X/*.png, eva's patient-wise train/val split

Class order and splits follow eva (kaiko-ai/eva, 2024-2025), so label indices and numbers compare.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the file or value and the fix."""


@dataclass
class LabelledImages:
    """A list of (item, label) pairs; an item is an image path or an index into an HDF5 array."""

    name: str
    classes: list[str]
    items: list  # str paths, or ints for h5 datasets
    labels: list[int]
    h5_path: str | None = None  # pcam: the x file; items are row indices
    _h5: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        """(PIL RGB image or None when the file cannot be decoded, label)."""
        return self.load(i), self.labels[i]

    def load(self, i: int) -> Image.Image | None:
        if self.h5_path is not None:
            if self._h5 is None:  # opened lazily, once per DataLoader worker (h5py handles do not pickle)
                import h5py

                self._h5 = h5py.File(self.h5_path, "r")["x"]
            return Image.fromarray(np.asarray(self._h5[self.items[i]]))  # (96, 96, 3) uint8
        try:
            with Image.open(self.items[i]) as im:
                return to_rgb(im)
        except (OSError, ValueError):
            return None

    def describe(self, i: int) -> str:
        return f"{self.h5_path}[{self.items[i]}]" if self.h5_path else str(self.items[i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None
        return state


# ---------------------------------------------------------------------------------------------
# generic readers


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB 8-bit. PIL's convert("RGB") clips 16-bit and 32-bit images (modes I;16*, I, F) at 255, turning them
    white: scale them from their type's range (uint16: 0-65535) instead."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return im.convert("RGB")


def images_under(folder: Path, extensions=IMAGE_EXTENSIONS) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def _checked(ds: LabelledImages, where) -> LabelledImages:
    if not ds.items:
        raise DatasetError(f"{where}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return ds


def image_folder(root, classes: list[str] | None = None, name: str | None = None) -> LabelledImages:
    """ROOT/<class>/**/<image>. With `classes` given, their order fixes the label indices and any other
    subfolder is an error (so train and test folders cannot silently disagree)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root}' does not exist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetError(f"{root}: class folder(s) {unknown} are not among the expected classes {classes}")
    if not classes:
        raise DatasetError(f"{root}: no class subfolders; expected ROOT/<class>/<image files>")
    items, labels = [], []
    for label, c in enumerate(classes):
        if (root / c).is_dir():
            found_here = images_under(root / c)
            if not found_here:
                raise DatasetError(f"{root / c}: class folder with no images ({', '.join(IMAGE_EXTENSIONS)}); add its "
                                   "images or remove the folder")
            for p in found_here:
                items.append(str(p))
                labels.append(label)
    return _checked(LabelledImages(name or root.name, list(classes), items, labels), root)


def csv_dataset(path, split: str | None = None, classes: list[str] | None = None) -> LabelledImages:
    """A CSV with columns path,label[,split]. Class names are sorted unless `classes` is given; then a
    label outside it is an error that names the row."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset CSV '{path}' does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"path", "label"} <= set(columns):
            raise DatasetError(f"{path}: header must be path,label[,split]; found {columns}")
        if split is not None and "split" not in columns:
            raise DatasetError(f"{path}: split '{split}' asked for but the CSV has no 'split' column")
        rows = []
        for n, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if split is None or row["split"] == split:
                rows.append((n, row["path"], row["label"]))
    names = sorted({label for _, _, label in rows}) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(names)}
    items, labels = [], []
    for n, p, label in rows:
        if label not in index:
            raise DatasetError(f"{path} row {n}: unknown class '{label}'; expected one of {names}")
        items.append(str(p if Path(p).is_absolute() else path.parent / p))
        labels.append(index[label])
    where = f"{path}" + (f" (split '{split}')" if split else "")
    return _checked(LabelledImages(path.stem + (f"-{split}" if split else ""), names, items, labels), where)


# ---------------------------------------------------------------------------------------------
# published layouts

CRC_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
BACH_CLASSES = ["Benign", "InSitu", "Invasive", "Normal"]
MHIST_CLASSES = ["SSA", "HP"]  # eva's order
PCAM_CLASSES = ["no_tumor", "tumor"]
BREAKHIS_CLASSES = ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]  # the letters in the file names

# eva's BACH split: index ranges into the 400 photos sorted by (class, file name), chosen so that
# no patient is in both splits
_BACH_TRAIN = [(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)]
_BACH_VAL = [(41, 59), (60, 90), (139, 169), (240, 258), (260, 273), (345, 368)]
# eva's BreakHis validation patients (the rest is train)
_BREAKHIS_VAL = {"18842D", "16184", "8168", "4372", "16716", "9146", "21978AB", "6241", "17901", "12465", "3411F",
                 "18842", "2980", "15570C", "2985", "13413", "3909", "14134E", "2523", "19854C", "19979", "29960CD",
                 "21998AB", "29960AB", "14946"}


def _need_split(kind: str, split, allowed):
    if split not in allowed:
        raise DatasetError(f"{kind}: split '{split}' is not one of {list(allowed)}")


def crc(root, split: str = "train") -> LabelledImages:
    """NCT-CRC-HE-100K (train, 100,000 tiles) / CRC-VAL-HE-7K (val, 7,180 tiles), 9 classes, .tif.
    ROOT may also be the split folder itself (holding ADI/, BACK/, ...)."""
    _need_split("crc", split, ("train", "val"))
    root = Path(root)
    sub = root / {"train": "NCT-CRC-HE-100K", "val": "CRC-VAL-HE-7K"}[split]
    folder = sub if sub.is_dir() else root
    ds = image_folder(folder, classes=CRC_CLASSES, name=f"crc-{split}")
    return ds


def bach(root, split: str | None = "train") -> LabelledImages:
    """ICIAR 2018 BACH microscopy photos (400 .tif, 2048x1536), eva's 268 / 132 train / val split."""
    _need_split("bach", split, ("train", "val", None))
    photos = Path(root) / "ICIAR2018_BACH_Challenge" / "Photos"
    if not photos.is_dir():
        raise DatasetError(f"bach: '{photos}' not found; ROOT must hold ICIAR2018_BACH_Challenge/Photos/<class>/*.tif")
    items, labels = [], []
    for label, c in enumerate(BACH_CLASSES):
        for p in images_under(photos / c, (".tif",)):
            items.append(str(p))
            labels.append(label)
    ranges = {"train": _BACH_TRAIN, "val": _BACH_VAL, None: [(0, len(items))]}[split]
    keep = [i for a, b in ranges for i in range(a, b) if i < len(items)]
    ds = LabelledImages(f"bach-{split}", BACH_CLASSES, [items[i] for i in keep], [labels[i] for i in keep])
    return _checked(ds, photos)


def mhist(root, split: str = "train") -> LabelledImages:
    """MHIST: annotations.csv (Image Name, Majority Vote Label, ..., Partition) + images/; 2,175 / 977."""
    _need_split("mhist", split, ("train", "test"))
    root = Path(root)
    table = root / "annotations.csv"
    if not table.is_file():
        raise DatasetError(f"mhist: '{table}' not found; ROOT must hold annotations.csv and images/")
    items, labels = [], []
    with open(table, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            if row["Partition"].strip() != split:
                continue
            label = row["Majority Vote Label"].strip()
            if label not in MHIST_CLASSES:
                raise DatasetError(f"{table} row {n}: unknown class '{label}'; expected one of {MHIST_CLASSES}")
            items.append(str(root / "images" / row["Image Name"].strip()))
            labels.append(MHIST_CLASSES.index(label))
    return _checked(LabelledImages(f"mhist-{split}", MHIST_CLASSES, items, labels), table)


def pcam(root, split: str = "train") -> LabelledImages:
    """PatchCamelyon HDF5 files: x (N, 96, 96, 3) uint8, y (N, 1, 1, 1); 262,144 / 32,768 / 32,768."""
    _need_split("pcam", split, ("train", "val", "test"))
    import h5py

    stem = Path(root) / f"camelyonpatch_level_2_split_{'valid' if split == 'val' else split}"
    x_path, y_path = Path(f"{stem}_x.h5"), Path(f"{stem}_y.h5")
    for p in (x_path, y_path):
        if not p.is_file():
            raise DatasetError(f"pcam: '{p}' not found (decompress the .h5.gz files from zenodo record 2546921)")
    with h5py.File(y_path, "r") as f:
        y = np.asarray(f["y"]).reshape(-1).astype(int)
    with h5py.File(x_path, "r") as f:
        if f["x"].shape[0] != len(y):
            raise DatasetError(f"pcam: {x_path} has {f['x'].shape[0]} images but {y_path} has {len(y)} labels")
    return _checked(LabelledImages(f"pcam-{split}", PCAM_CLASSES, list(range(len(y))), y.tolist(), str(x_path)),
                    x_path)


def breakhis(root, split: str | None = "train", magnifications=("40X",)) -> LabelledImages:
    """BreaKHis v1 .png images at the given magnifications (eva: 40X only), 8 classes, split by patient.
    File names read SOB_<B|M>_<class>-<year>-<patient>-<mag>-<seq>.png."""
    _need_split("breakhis", split, ("train", "val", None))
    base = Path(root) / "BreaKHis_v1" / "histology_slides"
    if not base.is_dir():
        raise DatasetError(f"breakhis: '{base}' not found; ROOT must hold BreaKHis_v1/histology_slides/breast/...")
    files = sorted(p for m in magnifications for p in base.rglob(f"{m}/*.png"))
    items, labels = [], []
    for p in files:
        parts = p.name.split("-")  # ['SOB_B_A', '14', '22549AB', '40', '001.png']
        cls, patient = parts[0].split("_")[-1], parts[2]
        if cls not in BREAKHIS_CLASSES:
            raise DatasetError(f"breakhis: '{p}' has class '{cls}', not one of {BREAKHIS_CLASSES}")
        if split is None or (patient in _BREAKHIS_VAL) == (split == "val"):
            items.append(str(p))
            labels.append(BREAKHIS_CLASSES.index(cls))
    return _checked(LabelledImages(f"breakhis-{split}", BREAKHIS_CLASSES, items, labels), base)


READERS = {"folder": image_folder, "csv": csv_dataset, "crc": crc, "bach": bach, "mhist": mhist,
           "pcam": pcam, "breakhis": breakhis}
SPLITS = ("train", "val", "valid", "test", "all")


def open_dataset(spec: str, classes: list[str] | None = None) -> LabelledImages:
    """`KIND:ROOT[:SPLIT]` (KIND in READERS), or a plain path: a folder (image folder) or a .csv file,
    optionally followed by :SPLIT. `classes` fixes the label order of folder / csv datasets (pass the
    train set's classes when opening its test set)."""
    kind, rest = spec.split(":", 1) if spec.split(":", 1)[0] in READERS else ("", spec)
    split, given = None, False
    if ":" in rest and rest.rsplit(":", 1)[1] in SPLITS:
        rest, split = rest.rsplit(":", 1)
        given = True
    split = None if split == "all" else ("val" if split == "valid" else split)
    if not kind:
        kind = "csv" if rest.lower().endswith(".csv") else "folder"
    if kind == "folder":
        if split is not None:
            raise DatasetError(f"dataset '{spec}': an image folder has no splits; point at the split's own folder")
        return image_folder(rest, classes=classes)
    if kind == "csv":
        return csv_dataset(rest, split=split, classes=classes)
    return READERS[kind](rest, split) if given else READERS[kind](rest)
