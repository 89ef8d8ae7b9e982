"""Label-free quality measures of a backbone's embeddings, on tiles from slides or an image folder.

    python eval/unsupervised.py --ckpt runs/<run>/export --manifest slides.csv --num-tiles 4096 --mpp 0.5
    python eval/unsupervised.py --ckpt runs/<run>/export --images /data/tiles --num-tiles 4096

  rankme               exp(entropy of the normalised singular values) of the (N, D) embedding matrix, between
                       1 and min(N, D) (Garrido et al. 2023); the kaiko.ai paper's label-free metric
  participation_ratio  (sum of covariance eigenvalues)^2 / sum of their squares: how many directions carry the
                       variance; a second rank measure that, unlike RankMe, ignores directions of tiny variance
  uniformity           log E exp(-2 |u - v|^2) over pairs of L2-normalised embeddings (Wang & Isola 2020); lower
                       is more uniform on the sphere; near 0 means collapse
  alignment            E |u - u'|^2 between two augmented views (random resized crop + flip) of the same tile;
                       lower is more invariant

The metric functions are pure functions of tensors with no side effects on import (the trainer reuses
`rankme`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as `python eval/unsupervised.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pathfm.metrics import rankme  # noqa: E402  (the trainer logs the same RankMe)


def participation_ratio(embeddings: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2 over the eigenvalues of the embeddings' covariance."""
    z = embeddings.double()
    lam = torch.linalg.svdvals(z - z.mean(0)) ** 2  # proportional to the covariance eigenvalues
    return (lam.sum() ** 2 / (lam**2).sum()).item()


def uniformity(embeddings: torch.Tensor, t: float = 2.0, max_samples: int = 4096) -> float:
    """log of the mean Gaussian potential exp(-t |u - v|^2) over distinct pairs of normalised embeddings."""
    u = F.normalize(embeddings[:max_samples].double(), dim=1)  # (n, D); n^2 pairs, so capped
    sq = (2 - 2 * u @ u.T).clamp_min(0)  # |u - v|^2 for unit vectors, (n, n)
    off = ~torch.eye(len(u), dtype=torch.bool)
    return torch.log(torch.exp(-t * sq[off]).mean()).item()


def alignment(view1: torch.Tensor, view2: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean |u - u'|^alpha between normalised embeddings of paired views, both (N, D)."""
    return (F.normalize(view1.double(), dim=1) - F.normalize(view2.double(), dim=1)).norm(dim=1).pow(alpha).mean().item()


def all_metrics(base: torch.Tensor, view1: torch.Tensor | None = None, view2: torch.Tensor | None = None) -> dict:
    out = {"n": len(base), "dim": base.shape[1], "rankme": rankme(base),
           "participation_ratio": participation_ratio(base), "uniformity": uniformity(base)}
    if view1 is not None:
        out["alignment"] = alignment(view1, view2)
    return out


# ---------------------------------------------------------------------------------------------
# tiles and their embeddings


def folder_tiles(folder, num: int, seed: int = 0):
    """Up to `num` images (a seeded random subset) from anywhere under `folder`, as (3, H, W) floats in [0, 1]."""
    from torchvision.transforms.functional import to_tensor

    from eval.datasets import DatasetError, LabelledImages, images_under

    paths = [str(p) for p in images_under(Path(folder))]
    if not paths:
        raise DatasetError(f"{folder}: no images found")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    ds = LabelledImages(Path(folder).name, [], [paths[i] for i in order], [0] * len(order))
    skipped = 0
    for i in range(len(ds)):
        image = ds.load(i)
        if image is None:
            skipped += 1
            continue
        yield to_tensor(image)
    if skipped:
        print(f"skipped {skipped} unreadable images in {folder}", file=sys.stderr)


def slide_tiles(manifest, num: int, mpp: float, tile_size: int = 224, seed: int = 0, cache_dir=".cache/tissue"):
    """`num` tissue tiles sampled online from the slides of a manifest (pathfm.data.sampler), (3, T, T) in [0, 1]."""
    from pathfm.data.index import IndexParams, build_index, index_folder
    from pathfm.data.sampler import SlideTileDataset
    from pathfm.data.slides import read_manifest

    entries, params = read_manifest(manifest), IndexParams(tile_size, (mpp,), 0.4)
    index = build_index(entries, index_folder(cache_dir, entries, params), params, mask_dir=Path(cache_dir) / "masks")
    ds = SlideTileDataset(index, batch_size=min(64, num), tile_size=tile_size, mpps=[mpp], mpp_weights=None,
                          seed=seed, rank=0, world_size=1)
    made, step = 0, 0
    while made < num:
        for tile in ds.batch(step)["tiles"][: num - made]:  # (3, T, T) uint8
            made += 1
            yield tile.float() / 255
        step += 1


def embed_tiles(backbone, tiles, how: str = "cls", size: int = 224, batch_size: int = 64, device: str = "cpu",
                seed: int = 0, num: int | None = None, view_tiles: int = 1024):
    """Embeddings of each tile (resize + centre crop, as for probes), and of two random views of each of the
    first `view_tiles` tiles (alignment needs no more; views cost two forwards a tile): ((N, E), (M, E), (M, E))."""
    from tqdm import tqdm

    from torchvision import transforms as T

    from eval.extract import embed

    base_t = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)])
    view_t = T.Compose([T.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True), T.RandomHorizontalFlip()])
    norm = T.Normalize(backbone.mean, backbone.std)
    model = backbone.model.to(device).eval()
    outs, batch = ([], [], []), ([], [], [])
    cuda = torch.device(device).type == "cuda"

    def flush():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for store, images in zip(outs, batch):
                if images:
                    store.append(embed(model, torch.stack(images).to(device), how).float().cpu())
                    images.clear()

    bar = tqdm(tiles, total=num, desc="embedding tiles", unit="tile", dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random views
        for i, tile in enumerate(bar):
            for images, t in zip(batch if i < view_tiles else batch[:1], (base_t, view_t, view_t)):
                images.append(norm(t(tile)))
            if len(batch[0]) == batch_size:
                flush()
        if batch[0]:
            flush()
    if not outs[0]:
        raise RuntimeError("no tiles to embed")
    return tuple(torch.cat(o) if o else None for o in outs)


def main(argv=None):
    from eval.common import collapse_warnings, default_out, write_results
    from eval.extract import add_model_args, backbone_from_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="slide manifest CSV (path[,mpp][,weight][,group]); tiles sampled online")
    src.add_argument("--images", help="folder of tile images (searched recursively)")
    p.add_argument("--num-tiles", type=int, default=4096)
    p.add_argument("--mpp", type=float, default=0.5, help="slide tiles: microns per pixel")
    p.add_argument("--cache-dir", default=".cache/tissue", help="slide tiles: tissue mask cache")
    p.add_argument("--view-tiles", type=int, default=1024, help="tiles whose two augmented views give alignment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results folder (default: <run>/eval/<checkpoint>/<source>/unsupervised)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    source = args.manifest or args.images
    args.task, args.train, args.embeddings = Path(source.rstrip("/")).stem, None, None
    out = Path(args.out) if args.out else default_out(args, "unsupervised")
    if (out / "results.json").exists() and not args.overwrite:
        raise SystemExit(f"{out}/results.json exists; pass --overwrite to replace it or --out to write elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone_from_args(args)
    tiles = (slide_tiles(args.manifest, args.num_tiles, args.mpp, args.img_size, args.seed, args.cache_dir)
             if args.manifest else folder_tiles(args.images, args.num_tiles, args.seed))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, v1, v2 = embed_tiles(backbone, tiles, args.embedding, args.img_size, args.batch_size, device, args.seed,
                               num=args.num_tiles, view_tiles=args.view_tiles)
    metrics = all_metrics(base, v1, v2)
    warnings = collapse_warnings({"tile": {"embeddings": base}})
    results = {"protocol": "unsupervised", "task": args.task, "source": source, "model": backbone.describe(),
               "embedding": args.embedding, "metrics": metrics,
               "headline": {"metric": "rankme", "mean": metrics["rankme"], "stdev": 0.0, "values": [metrics["rankme"]]},
               "warnings": warnings}
    table = "\n".join([f"### label-free metrics, {source}", "", "| metric | value |", "|---|---:|"] +
                      [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()])
    write_results(out, results, table)


if __name__ == "__main__":
    main()
