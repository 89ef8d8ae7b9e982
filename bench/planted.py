"""Planted-signal fixtures for the slide-level and dense probes, and the benchmark that scores models on them.

    python bench/planted.py --model runs/h28_learn/run --out bench/out/planted          # learn_cpu vs random init

Pixels come from known sources: three of the nine real NCT-CRC-HE-100K tiles in ../shared/data (stroma, tumour,
lymphocytes) and pathfm's synthetic H&E texture (pathfm.data.synthetic). Training crops are cut from the left half
of each source and test crops from the right half, so no test pixel was seen in training.

  segmentation  S x S images: a background source and one or two rectangles of other sources on the patch grid;
                masks/<name>.png holds each pixel's source index (a few pixels get the ignore value 255)
  slide-level   bags of T tiles of the common sources; a positive bag holds 1-3 tiles of the rare source (tumour)

An oracle feature (the true source of each patch / tile, one-hot, plus noise) must score Dice / AUROC near 1, and the
same features with shuffled labels chance: tests/test_eval_planted.py checks both, cheaply. This script embeds the
real pixels with a model and with the same architecture at random initialisation and reports both probes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TILES = ROOT.parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"
SOURCES = ("STR", "TUM", "LYM", "synthetic")  # mask value = index here
RARE = 1  # the slide-level label: a bag holds tumour tiles


def source_images(data_tiles: Path = TILES) -> list[np.ndarray]:
    """(224, 224, 3) uint8 per source."""
    from PIL import Image

    from pathfm.data.synthetic import _tissue_tile

    out = []
    for name in SOURCES[:-1]:
        path = next((data_tiles / name).glob("*.tif"))
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    out.append(_tissue_tile(np.random.default_rng(7), 224))
    return out


def crop(source: np.ndarray, size: int, split: str, rng: np.random.Generator) -> np.ndarray:
    """A size x size crop from the left (train) or right (test) half of a 224 px source."""
    half = source.shape[1] // 2
    x0 = (0 if split == "train" else half) + int(rng.integers(0, half - size + 1))
    y0 = int(rng.integers(0, source.shape[0] - size + 1))
    return source[y0:y0 + size, x0:x0 + size]


def write_seg_fixture(out, n: int, split: str, size: int = 64, patch: int = 16, seed: int = 0, sources=None) -> Path:
    """out/<split>/images/*.png and masks/*.png: regions of known sources on the patch grid."""
    from PIL import Image

    sources = sources if sources is not None else source_images()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    folder = Path(out) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    g = size // patch
    for k in range(n):
        background = int(rng.integers(len(sources)))
        image = crop(sources[background], size, split, rng).copy()
        mask = np.full((size, size), background, np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            c = int(rng.choice([s for s in range(len(sources)) if s != background]))
            r0, c0 = rng.integers(0, g, 2)
            r1, c1 = r0 + rng.integers(1, g - r0 + 1), c0 + rng.integers(1, g - c0 + 1)
            ys, xs = slice(r0 * patch, r1 * patch), slice(c0 * patch, c1 * patch)
            image[ys, xs] = crop(sources[c], size, split, rng)[ys, xs]
            mask[ys, xs] = c
        mask[0, :3] = 255  # a few unlabelled pixels: they must count nowhere
        Image.fromarray(image).save(folder / "images" / f"{split}{k:04d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{split}{k:04d}.png")
    return folder


def oracle_patches(masks, patch: int, num_classes: int, noise: float = 0.1, seed: int = 0):
    """(N, h*w, C) float: each patch's majority mask class one-hot, plus Gaussian noise (the perfect feature)."""
    import torch

    m = torch.as_tensor(np.asarray(masks)).long()
    m = torch.where(m == 255, torch.zeros_like(m), m)
    N, S, _ = m.shape
    g = S // patch
    onehot = torch.nn.functional.one_hot(m, num_classes).float()  # (N, S, S, C)
    votes = onehot.view(N, g, patch, g, patch, num_classes).sum((2, 4))  # (N, g, g, C)
    best = torch.nn.functional.one_hot(votes.argmax(-1), num_classes).float().view(N, g * g, num_classes)
    gen = torch.Generator().manual_seed(seed)
    return best + noise * torch.randn(best.shape, generator=gen)


def mil_bags(n_bags: int, tiles: int, seed: int = 0):
    """Tile sources of n_bags bags and their labels: half the bags hold 1-3 tiles of the rare source."""
    rng = np.random.default_rng(seed)
    common = [s for s in range(len(SOURCES)) if s != RARE]
    bags, labels = [], []
    for b in range(n_bags):
        kinds = rng.choice(common, tiles)
        positive = b % 2 == 1
        if positive:
            kinds[rng.choice(tiles, int(rng.integers(1, 4)), replace=False)] = RARE
        bags.append(kinds)
        labels.append(int(positive))
    return bags, np.array(labels)


def oracle_bag_features(bags, noise: float = 0.3, dim: int = 8, seed: int = 0):
    """Each tile: its source one-hot in `dim` dimensions, plus noise."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for kinds in bags:
        x = torch.nn.functional.one_hot(torch.as_tensor(kinds).long(), dim).float()
        out.append(x + noise * torch.randn(x.shape, generator=gen))
    return out


# ---------------------------------------------------------------------------------------------
# the benchmark: a model's embeddings of the real pixels against the same architecture at random init


def embed_tiles(backbone, images: np.ndarray, how: str, batch: int = 64):
    import torch

    from eval.extract import embed

    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        return torch.cat([embed(backbone.model, (x[i:i + batch] - mean) / std, how).float()
                          for i in range(0, len(x), batch)])


def bench_model(backbone, sources, out: Path, size: int, seg_n: int, bags: int, tiles: int) -> dict:
    from eval.seg_probe import SegFolder, extract_patches, run_seg_probe
    from eval.slide_probe import run_slide_probe

    seg = {}
    for split, n in (("train", seg_n), ("test", seg_n // 2)):
        seg[split] = extract_patches(backbone, SegFolder(out / "seg" / split, size), progress=False)
    s = run_seg_probe(seg["train"], seg["test"], len(SOURCES), runs=3, steps=300)
    result = {"seg_mean_dice": s["metrics"]["test"]["mean_dice"], "seg_mean_iou": s["metrics"]["test"]["mean_iou"]}
    kinds, y = mil_bags(bags, tiles, seed=3)
    rng = np.random.default_rng(5)
    split_of = ["train" if b < bags * 2 // 3 else "test" for b in range(bags)]
    images = [np.stack([crop(sources[k], size, split_of[b], rng) for k in bag]) for b, bag in enumerate(kinds)]
    feats = [embed_tiles(backbone, im, "cls") for im in images]
    for protocol in ("abmil", "meanpool"):
        r = run_slide_probe(feats, y, 2, protocol, folds=3, seeds=3, epochs=40, max_tiles=None)
        result[f"mil_{protocol}_auroc"] = r["metrics"]["test"]["auroc"]
        result[f"mil_{protocol}_balanced_accuracy"] = r["metrics"]["test"]["balanced_accuracy"]
    return result


def main(argv=None):
    import torch

    from eval.backbone import load_eval_backbone

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pathfm run / checkpoint / export (its random init is the baseline)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "planted"))
    p.add_argument("--size", type=int, default=64, help="image / tile px (the learn_cpu model's global crop)")
    p.add_argument("--seg-images", type=int, default=96)
    p.add_argument("--bags", type=int, default=60)
    p.add_argument("--tiles", type=int, default=24, help="tiles per bag")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    sources = source_images()
    for split, n in (("train", a.seg_images), ("test", a.seg_images // 2)):
        write_seg_fixture(out / "seg", n, split, a.size, 16, seed=0, sources=sources)
    trained = load_eval_backbone(a.model)
    random = load_eval_backbone(a.model)
    from pathfm.vit import build_vit

    torch.manual_seed(0)
    random.model = build_vit(trained.model.args).eval()  # the same architecture, initialised as training starts
    random.source += " (random init)"
    start = time.process_time()
    rows = {}
    for name, bb in (("trained", trained), ("random init", random)):
        rows[name] = bench_model(bb, sources, out, a.size, a.seg_images, a.bags, a.tiles)
        print(name, json.dumps(rows[name]), flush=True)
    rows["cpu_s"] = time.process_time() - start
    rows["loadavg"] = open("/proc/loadavg").read().strip()
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
