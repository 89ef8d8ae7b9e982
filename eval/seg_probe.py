"""Dense probe: semantic segmentation from frozen patch tokens, a linear head per token, upsampled to pixels.

    python eval/seg_probe.py --ckpt runs/x/export --train /data/seg/train --test /data/seg/test --classes 5
    python eval/seg_probe.py --timm vit_small_patch16_224 --train ... --test ... --class-names bg,tumour,stroma
    -> <run>/eval/<checkpoint>/<task>/seg_linear/results.json (or eval_results/<model>/..., or --out)

Data: a folder with images/ (png, jpg, tif) and masks/ (PNG, same file stem, one class index a pixel; --ignore (255)
marks pixels that count nowhere). Images are resized to --img-size (bilinear; masks nearest) when they differ.

Model: the backbone's patch tokens (the `patches` embedding: class and register tokens removed), (N, h*w, D),
extracted once and cached in <out>/../embeddings/patches-<size>px/ like the tile probes' embeddings. A patch grid
that does not divide the image is refused in one line; pathfm ViTs take any multiple of their patch size, timm
models are built for --img-size. Head: Linear(D, classes) per token -> (B, classes, h, w) logits, bilinearly upsampled
to (H, W), cross-entropy over the labelled pixels; AdamW lr 1e-3, --steps steps of --probe-batch-size images; --runs
seeds. Scores on the test set, counted over all its labelled pixels: IoU = TP / (TP + FP + FN) and
Dice = 2 TP / (2 TP + FP + FN) per class, and their mean over the classes that occur (in the masks or predictions).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python eval/seg_probe.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

IGNORE = 255
DEFAULTS = dict(steps=500, lr=1e-3, weight_decay=1e-4, batch_size=16)


# ---------------------------------------------------------------------------------------------
# metrics


def dense_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """(3, C) int64 counts over the labelled pixels of (B, H, W) predictions and targets: rows are the pixels
    both call class c (intersection), the pixels predicted c, the pixels labelled c."""
    valid = target != ignore
    p = F.one_hot(pred[valid].long(), num_classes)  # (P, C)
    t = F.one_hot(target[valid].long(), num_classes)  # (P, C)
    return torch.stack([(p * t).sum(0), p.sum(0), t.sum(0)])  # summed over pixels, one number per class


def dense_metrics(counts: torch.Tensor) -> dict:
    """IoU and Dice per class and their means over the classes present (labelled or predicted) from dense_counts."""
    inter, predicted, labelled = counts.double()
    union = predicted + labelled - inter
    present = union > 0
    iou = torch.where(present, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    dice = torch.where(present, 2 * inter / (predicted + labelled).clamp(min=1), torch.full_like(inter, float("nan")))
    out = {"mean_iou": iou[present].mean().item(), "mean_dice": dice[present].mean().item(),
           "pixel_accuracy": (inter.sum() / labelled.sum().clamp(min=1)).item()}
    for c in range(len(inter)):
        out[f"iou/{c}"], out[f"dice/{c}"] = iou[c].item(), dice[c].item()
    return out


# ---------------------------------------------------------------------------------------------
# data


class SegFolder:
    """images/ + masks/ of one split: (image (3, S, S) float in [0, 1], mask (S, S) int64) pairs."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

    def __init__(self, root, size: int):
        self.root, self.size = Path(root), size
        images = self.root / "images"
        if not images.is_dir() or not (self.root / "masks").is_dir():
            raise FileNotFoundError(f"{self.root}: expected images/ and masks/ (PNG class indices, same file stems)")
        self.items = sorted(p for p in images.iterdir() if p.suffix.lower() in self.EXTENSIONS)
        if not self.items:
            raise FileNotFoundError(f"{images}: no images ({', '.join(self.EXTENSIONS)})")
        missing = [p.name for p in self.items if not (self.root / "masks" / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.root / 'masks'}: no mask for {len(missing)} image(s), e.g. {missing[:3]} "
                                    "(expected masks/<image stem>.png)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.items[i]) as im:
            image = im.convert("RGB")
        with Image.open(self.root / "masks" / f"{self.items[i].stem}.png") as m:
            mask = m.copy()
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{self.root / 'masks' / self.items[i].stem}.png: mode {mask.mode}; expected a one-channel "
                             "PNG of class indices")
        if image.size != mask.size:
            raise ValueError(f"{self.items[i]}: image {image.size} and mask {mask.size} differ in size")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
            mask = mask.resize((self.size, self.size), Image.NEAREST)  # class indices: never interpolated
        x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)  # (3, S, S)
        return x, torch.from_numpy(np.asarray(mask).astype(np.int64))


def patch_size_of(model) -> int:
    ps = getattr(model, "patch_size", None) or model.patch_embed.patch_size
    return ps if isinstance(ps, int) else ps[0]


def check_grid(model, size: int) -> None:
    """Refuse an image size the model's patch grid does not divide, in one line."""
    if not hasattr(model, "num_prefix_tokens"):
        raise ValueError("the dense probe needs a ViT (patch tokens); this model only gives a pooled output")
    p = patch_size_of(model)
    if size % p:
        raise ValueError(f"image size {size} px is not a multiple of the model's patch size {p}; give --img-size "
                         f"{size // p * p or p} or {(size // p + 1) * p}")


def extract_patches(backbone, ds: SegFolder, batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    """{"patches": (N, h*w, D) float16, "masks": (N, S, S) uint8 or int16, "grid": (h, w), "items"}."""
    from tqdm import tqdm

    from eval.extract import embed

    check_grid(backbone.model, ds.size)
    model = backbone.model.to(device).eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    patches, masks = [], []
    with torch.inference_mode():
        for x, m in tqdm(loader, desc=f"patch tokens {ds.root.name}", unit="batch", disable=not progress):
            patches.append(embed(model, ((x - mean) / std).to(device), "patches").half().cpu())  # (B, h*w, D)
            masks.append(m)
    h = ds.size // patch_size_of(model)
    return {"patches": torch.cat(patches), "masks": torch.cat(masks).to(torch.int16), "grid": (h, h),
            "items": [str(p) for p in ds.items]}


# ---------------------------------------------------------------------------------------------
# the probe


def logits_of(head, patches, grid, size: int):
    """(B, h*w, D) tokens -> (B, C, S, S): the linear head per token, bilinearly upsampled to the pixels."""
    B = patches.shape[0]
    h, w = grid
    x = head(patches.float())  # (B, h*w, C)
    x = x.transpose(1, 2).reshape(B, -1, h, w)  # (B, C, h, w)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def train_seg_head(train: dict, num_classes: int, *, seed: int = 0, steps: int = DEFAULTS["steps"], lr=DEFAULTS["lr"],
                   weight_decay=DEFAULTS["weight_decay"], batch_size: int = DEFAULTS["batch_size"], ignore: int = IGNORE,
                   device: str = "cpu"):
    torch.manual_seed(seed)
    head = torch.nn.Linear(train["patches"].shape[-1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    size, n = train["masks"].shape[-1], len(train["masks"])
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=g)
        logits = logits_of(head, train["patches"][idx].to(device), train["grid"], size)
        loss = F.cross_entropy(logits, train["masks"][idx].long().to(device), ignore_index=ignore)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.cpu()


def evaluate_seg(head, data: dict, num_classes: int, ignore: int = IGNORE, batch_size: int = 32) -> dict:
    counts = torch.zeros(3, num_classes, dtype=torch.long)
    size = data["masks"].shape[-1]
    with torch.no_grad():
        for start in range(0, len(data["masks"]), batch_size):
            logits = logits_of(head, data["patches"][start:start + batch_size], data["grid"], size)
            counts += dense_counts(logits.argmax(1), data["masks"][start:start + batch_size].long(), num_classes, ignore)
    return dense_metrics(counts)


def run_seg_probe(train: dict, test: dict, num_classes: int, runs: int = 3, **kw) -> dict:
    from eval.metrics import aggregate

    bad = int(((train["masks"] >= num_classes) & (train["masks"] != kw.get("ignore", IGNORE))).sum())
    if bad:
        raise ValueError(f"{bad} training mask pixels hold a class index >= {num_classes} (and not the ignore value "
                         f"{kw.get('ignore', IGNORE)}); give the right --classes / --ignore")
    per_run = []
    for seed in range(runs):
        head = train_seg_head(train, num_classes, seed=seed, **kw)
        per_run.append({"seed": seed, "test": evaluate_seg(head, test, num_classes, kw.get("ignore", IGNORE))})
    values = [{k: v for k, v in r["test"].items() if not (isinstance(v, float) and math.isnan(v))} for r in per_run]
    common = set.intersection(*(set(v) for v in values))
    return {"metrics": {"test": aggregate([{k: v[k] for k in sorted(common)} for v in values])}, "per_run": per_run}


def cached_patches(backbone, spec: str, split: str, folder: Path, size: int, overwrite: bool, **kw) -> dict:
    """Patch tokens of dataset folder `spec`, reused from `folder` when made by the same model, data and size."""
    entry = {"dataset": str(spec), "embedding": "patches", "model": backbone.describe(), "img_size": size}
    path = folder / f"{split}.pt"
    if path.is_file() and not overwrite:
        old = torch.load(path, map_location="cpu", weights_only=False)
        if old.get("manifest") == entry:
            return old
        raise FileExistsError(f"{path} holds patch tokens of another model / dataset / size; pass --overwrite")
    data = extract_patches(backbone, SegFolder(spec, size), **kw)
    data["manifest"] = entry
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(data, folder / f"{split}.pt.tmp")
    (folder / f"{split}.pt.tmp").rename(path)
    return data


def write_seg_results(out, task: str, classes: list[str], backbone, folders, data: dict, r: dict, config: dict) -> dict:
    """results.json (the tile probes' layout, level dense, headline test mean Dice) and results.md in `out`."""
    from eval.common import markdown_table, write_results

    results = {"protocol": "seg_linear", "task": task, "level": "dense", "classes": classes,
               "model": backbone.describe(), "embedding": "patches",
               "datasets": {"train": str(folders[0]), "test": str(folders[1])},
               "counts": {s: len(d["masks"]) for s, d in data.items()}, "config": config, "metrics": r["metrics"],
               "headline": {"metric": "test/mean_dice", **r["metrics"]["test"]["mean_dice"]}, "per_run": r["per_run"]}
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in r["metrics"]["test"].items() if k.startswith(("mean", "pixel"))}
    write_results(Path(out), results, markdown_table({"test": summary}, f"segmentation probe (linear), {task}, "
                                                                        f"{len(r['per_run'])} runs"))
    return results


def probe_backbone(backbone, train_dir, test_dir, out, *, img_size: int | None = None, num_classes: int | None = None,
                   max_images: int = 0, runs: int = 3, steps: int = DEFAULTS["steps"], device: str = "cpu",
                   batch_size: int = 32, ignore: int = IGNORE, task: str = "seg") -> dict:
    """A segmentation task for one model, start to end (what the probes during training run at each checkpoint):
    patch tokens of at most max_images images a split (a fixed subset), the probe, out/results.json. The classes
    are the mask values seen in the training masks when num_classes is not given."""
    data = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        ds = SegFolder(folder, img_size or 0)
        if not img_size:
            from PIL import Image

            with Image.open(ds.items[0]) as im:
                ds.size = img_size = im.size[0]
        if max_images and len(ds) > max_images:  # the same images at every checkpoint
            keep = np.sort(np.random.default_rng(0).choice(len(ds), max_images, replace=False))
            ds.items = [ds.items[k] for k in keep]
        data[split] = extract_patches(backbone, ds, batch_size=batch_size, device=device, progress=False)
    if num_classes is None:
        m = data["train"]["masks"]
        num_classes = int(m[m != ignore].max()) + 1
    r = run_seg_probe(data["train"], data["test"], num_classes, runs=runs, steps=steps, ignore=ignore)
    results = write_seg_results(out, task, [str(c) for c in range(num_classes)], backbone, (train_dir, test_dir), data, r,
                                {"steps": steps, "runs": runs, "img_size": img_size, "ignore": ignore,
                                 "max_images": max_images})
    return results


def main(argv=None):
    from eval.common import default_out, prepare_out
    from eval.extract import add_model_args, backbone_from_args, extract_kwargs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--train", required=True, help="folder with images/ and masks/")
    p.add_argument("--test", required=True, help="folder with images/ and masks/")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--classes", type=int, help="number of classes (mask values 0..N-1)")
    g.add_argument("--class-names", help="comma-separated names, in mask-value order")
    p.add_argument("--ignore", type=int, default=IGNORE, help="mask value of unlabelled pixels")
    p.add_argument("--runs", type=int, default=3, help="seeds")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--probe-batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--task", help="task name (default: the train folder's parent's name)")
    p.add_argument("--out", help="results folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(embeddings=None, embedding=None)
    args = p.parse_args(argv)
    if args.embedding not in (None, "patches"):  # add_model_args offers it for the tile probes
        raise SystemExit(f"error: --embedding {args.embedding}: the segmentation probe always reads the patch tokens; "
                         "leave --embedding out")
    args.task = args.task or Path(args.train).resolve().parent.name
    if args.img_size is None:  # the images' own size
        from PIL import Image

        with Image.open(SegFolder(args.train, 0).items[0]) as im:
            args.img_size = im.size[0]
    names = args.class_names.split(",") if args.class_names else [str(c) for c in range(args.classes)]
    try:
        backbone = backbone_from_args(args)
        check_grid(backbone.model, args.img_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out) if args.out else default_out(args, "seg_linear")
    out = prepare_out(argparse.Namespace(out=str(out), overwrite=args.overwrite), "seg_linear")
    folder = out.parent / "embeddings" / f"patches-{args.img_size}px"
    kw = extract_kwargs(args)
    try:
        data = {s: cached_patches(backbone, spec, s, folder, args.img_size, args.overwrite,
                                  batch_size=kw["batch_size"], device=kw["device"])
                for s, spec in (("train", args.train), ("test", args.test))}
        r = run_seg_probe(data["train"], data["test"], len(names), runs=args.runs, steps=args.steps, lr=args.lr,
                          batch_size=args.probe_batch_size, ignore=args.ignore)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None
    write_seg_results(out, args.task, names, backbone, (args.train, args.test), data, r,
                      {"steps": args.steps, "lr": args.lr, "batch_size": args.probe_batch_size, "runs": args.runs,
                       "img_size": args.img_size, "ignore": args.ignore})

if __name__ == "__main__":
    main()
