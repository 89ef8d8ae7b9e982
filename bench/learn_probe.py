"""The kNN probe of bench/learn.py: tissue type on held-out real tissue, split in space.

The nine labelled NCT-CRC-HE-100K tiles (../shared/data/tiles, one 224 px tile per class at 0.5 µm/px,
from patients and a lab that the training slides never saw) are cut into 64 px sub-tiles at stride 16.
Train: sub-tiles inside the left half of each tile (x + 64 <= 112); test: those inside the right half
(x >= 112). No test pixel is in any training sub-tile, so neighbours cannot match by overlap.
9 classes x 4 columns x 11 rows = 396 train and 396 test sub-tiles; chance is 1/9.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CROP, STRIDE = 64, 16


def crc_split(root: str | Path, crop: int = CROP, stride: int = STRIDE) -> dict:
    """{"train": (images uint8 (N, 3, crop, crop), labels (N,)), "test": (...), "classes": [...]}."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    parts = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(classes):
        (path,) = sorted((root / name).iterdir())
        tile = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
        half = tile.shape[2] // 2
        for y in range(0, tile.shape[1] - crop + 1, stride):
            for x in range(0, tile.shape[2] - crop + 1, stride):
                split = "train" if x + crop <= half else "test" if x >= half else None
                if split:
                    parts[split][0].append(tile[:, y:y + crop, x:x + crop])
                    parts[split][1].append(label)
    out = {k: (torch.stack(v[0]), torch.tensor(v[1])) for k, v in parts.items()}
    out["classes"] = classes
    return out


def colour_normalise(split: dict) -> dict:
    """The same split with every sub-tile's per-channel mean and std set to the set's averages (Reinhard
    colour normalisation in RGB): what is left to tell the classes apart is tissue structure."""
    allx = torch.cat([split["train"][0], split["test"][0]]).float()
    target_mean, target_std = allx.mean((0, 2, 3)).view(1, 3, 1, 1), allx.std((2, 3)).mean(0).view(1, 3, 1, 1)

    def norm(x):
        x = x.float()
        z = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True).clamp(min=1.0)
        return (z * target_std + target_mean).clamp(0, 255).round().to(torch.uint8)

    return {"train": (norm(split["train"][0]), split["train"][1]), "test": (norm(split["test"][0]), split["test"][1]),
            "classes": split["classes"]}


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.float() / 255  # (N, 3, H, W)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def cls_features(vit, images: torch.Tensor, mean, std, batch: int = 128) -> torch.Tensor:
    """(N, D) CLS tokens of a pathfm ViT (normalised by its final norm, as exported)."""
    vit.eval()
    return torch.cat([vit.forward_features(normalise(b, mean, std))[:, 0] for b in images.split(batch)])


def pixel_features(images: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Raw pixels, (N, 3 * (H/pool)^2), mean-centred per channel over the set; pool > 1 averages blocks first."""
    x = F.avg_pool2d(images.float() / 255, pool) if pool > 1 else images.float() / 255
    x = x.flatten(1)
    return x - x.mean(0)


def knn_accuracy(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20) -> float:
    """Top-1 accuracy of DINOv2's weighted kNN (cosine, T = 0.07) with k neighbours."""
    from eval.knn import knn_predict

    pred = knn_predict(train_x, train_y, test_x, num_classes, ks=(k,))[k]
    return float((pred == test_y).float().mean())
