"""Dataset readers of pathfm/data/folders.py: real CRC tiles, fake trees in the published layouts, bad input."""

import numpy as np
import pytest
from PIL import Image

from eval.datasets import (BACH_CLASSES, CRC_CLASSES, DatasetError, bach, breakhis, crc, csv_dataset, image_folder,
                                 mhist, open_dataset, pcam)


def _png(path, value=128, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_real_crc_tiles_through_crc_adapter_and_image_folder(shared_data):
    root = shared_data / "tiles" / "nct_crc_he_100k_sample9"
    ds = open_dataset(f"crc:{root}:train")  # the split folder itself holds ADI/ ... TUM/
    assert ds.classes == CRC_CLASSES and ds.labels == list(range(9))
    image, label = ds[8]
    assert image.size == (224, 224) and image.mode == "RGB" and label == 8 and "TUM" in ds.items[8]
    plain = open_dataset(str(root))
    assert plain.classes == CRC_CLASSES and plain.items == ds.items


def test_crc_published_layout_train_and_val(tmp_path):
    for split, n in (("NCT-CRC-HE-100K", 2), ("CRC-VAL-HE-7K", 1)):
        for c in ("ADI", "TUM"):
            for i in range(n):
                _png(tmp_path / split / c / f"{c}-X{i}.tif")
    train, val = crc(tmp_path, "train"), crc(tmp_path, "val")
    assert len(train) == 4 and len(val) == 2
    assert val.labels == [CRC_CLASSES.index("ADI"), CRC_CLASSES.index("TUM")]
    (tmp_path / "CRC-VAL-HE-7K" / "CATS").mkdir()
    with pytest.raises(DatasetError, match="CATS"):
        crc(tmp_path, "val")


def test_bach_uses_eva_split_sizes(tmp_path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    for c in BACH_CLASSES:
        (photos / c).mkdir(parents=True)
        for i in range(100):  # listing only: files need not be decodable here
            (photos / c / f"{c.lower()}{i + 1:03d}.tif").touch()
    train, val = bach(tmp_path, "train"), bach(tmp_path, "val")
    assert (len(train), len(val)) == (268, 132)
    assert not set(train.items) & set(val.items)
    assert train.items[0].endswith("Benign/benign001.tif") and val.items[0].endswith("Benign/benign042.tif")
    normal = BACH_CLASSES.index("Normal")  # photos 300-399 in the sorted list
    assert (train.labels.count(normal), val.labels.count(normal)) == (77, 23)


def test_mhist_reads_partition_and_labels(tmp_path):
    rows = [("a.png", "SSA", "6", "train"), ("b.png", "HP", "1", "train"), ("c.png", "HP", "0", "test")]
    (tmp_path / "annotations.csv").write_text("Image Name,Majority Vote Label,Number of Annotators who Selected SSA "
                                              "(Out of 7),Partition\n" + "".join(",".join(r) + "\n" for r in rows))
    for name, *_ in rows:
        _png(tmp_path / "images" / name)
    train, test = mhist(tmp_path, "train"), mhist(tmp_path, "test")
    assert train.labels == [0, 1] and test.labels == [1] and train.classes == ["SSA", "HP"]
    assert train[0][0].size == (8, 8)


def test_pcam_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(0).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    y = np.array([0, 1, 1, 0, 1], np.uint8).reshape(5, 1, 1, 1)
    for name, data in (("x", x), ("y", y)):
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_valid_{name}.h5", "w") as f:
            f.create_dataset(name, data=data)
    ds = open_dataset(f"pcam:{tmp_path}:val")
    assert ds.labels == [0, 1, 1, 0, 1] and len(ds) == 5
    image, label = ds[2]
    assert np.array_equal(np.asarray(image), x[2]) and label == 1
    with pytest.raises(DatasetError, match="camelyonpatch_level_2_split_test_x.h5"):
        pcam(tmp_path, "test")


def test_breakhis_patient_split_and_magnification(tmp_path):
    base = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    files = ["benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png",
             "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png",
             "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-16184/40X/SOB_M_DC-14-16184-40-001.png",
             "malignant/SOB/papillary_carcinoma/SOB_M_PC_14-9146/40X/SOB_M_PC-14-9146-40-002.png"]
    for f in files:
        (base / f).parent.mkdir(parents=True, exist_ok=True)
        (base / f).touch()
    train, val = breakhis(tmp_path, "train"), breakhis(tmp_path, "val")
    assert [train.classes[i] for i in train.labels] == ["A"]  # the 100X image is not used (eva: 40X)
    assert [val.classes[i] for i in val.labels] == ["DC", "PC"]


def test_csv_dataset_splits_relative_paths_and_unknown_class(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    (tmp_path / "d.csv").write_text("path,label,split\nimg/a.png,tumor,train\nimg/b.png,normal,test\n")
    train = open_dataset(f"{tmp_path / 'd.csv'}:train")
    assert train.items == [str(tmp_path / "img" / "a.png")] and train.classes == ["tumor"]
    with pytest.raises(DatasetError, match=r"d.csv row 3: unknown class 'normal'"):
        csv_dataset(tmp_path / "d.csv", split="test", classes=["tumor"])


def test_empty_folder_and_unreadable_image(tmp_path):
    (tmp_path / "empty" / "classA").mkdir(parents=True)
    with pytest.raises(DatasetError, match="classA: class folder with no images"):
        image_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad" / "c" / "x.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    image, label = image_folder(tmp_path / "bad")[0]
    assert image is None and label == 0
