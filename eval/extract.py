"""Embeddings of a labelled dataset from a frozen backbone, cached on disk with a manifest.

    python eval/extract.py --ckpt runs/x/export --data crc:/data/crc:train --data crc:/data/crc:val \
        --out embeddings/x/crc
    -> embeddings/x/crc/train.pt, val.pt ({"embeddings": (N, D) float32, "labels": (N,), "classes", "items"})
       and manifest.json (model, datasets, preprocessing, embedding choice, counts, skipped files)

Preprocessing is eva's: resize the shorter side to 224, centre crop 224, the checkpoint's mean / std.
Embedding choices (the embedding contract; timm ViTs and pathfm ViTs alike, after the final norm; "patch
tokens" are the tokens after the model's num_prefix_tokens class and register tokens):
  cls        the class token (eva's default)                                                  (B, D)
  mean       the mean of the patch tokens                                                     (B, D)
  cls_mean   [class token, mean of patch tokens]: what the Midnight paper, PathoROB, kaiko use (B, 2D)
  patches    the patch tokens, row-major over the patch grid (dense probes)                   (B, N, D)
  lastN      class tokens of the last N blocks, each normed, concatenated (N*D), DINOv2's linear eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/extract.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EMBEDDINGS = ("cls", "mean", "cls_mean", "patches")  # plus lastN
MAX_BAD_FRACTION = 0.01  # unreadable images beyond this share of a dataset stop extraction


def eval_transform(mean, std, size: int = 224, resize: int | None = None):
    """eva's ResizeAndCrop: shorter side to `resize` (default `size`), centre crop, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize or size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def embed(model, x, how: str = "cls"):
    """(B, 3, H, W) normalised images -> (B, E) embeddings. Works for pathfm and timm ViTs; other timm
    models (CNNs) support only `cls`, which then means their pooled output."""
    import torch

    if not hasattr(model, "num_prefix_tokens"):
        if how != "cls":
            raise ValueError(f"embedding '{how}' needs a ViT; this model only gives its pooled output ('cls')")
        return model(x)
    if how == "cls":
        return model.forward_features(x)[:, 0]
    if how in ("mean", "cls_mean", "patches"):
        tokens = model.forward_features(x)  # (B, prefix + N, D): class token, registers, patch tokens
        patches = tokens[:, model.num_prefix_tokens:]  # (B, N, D)
        if how == "patches":
            return patches
        if how == "mean":
            return patches.mean(1)
        return torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)  # (B, 2D)
    if how.startswith("last") and how[4:].isdigit():
        outs = model.get_intermediate_layers(x, n=int(how[4:]), return_prefix_tokens=True, norm=True)
        return torch.cat([prefix[:, 0] for _, prefix in outs], dim=-1)  # (B, N*D)
    raise ValueError(f"unknown embedding '{how}'; expected {', '.join(EMBEDDINGS)} or lastN (e.g. last4)")


class _Transformed:
    """Dataset view that applies the transform and marks unreadable images (tensor None)."""

    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, label = self.ds[i]
        return i, (None if image is None else self.transform(image)), label


def _collate(batch):
    import torch

    ok = [b for b in batch if b[1] is not None]
    bad = [b[0] for b in batch if b[1] is None]
    if not ok:
        return None, None, None, bad
    return (torch.tensor([b[0] for b in ok]), torch.stack([b[1] for b in ok]), torch.tensor([b[2] for b in ok]), bad)


def extract(backbone, ds, how: str = "cls", batch_size: int = 64, num_workers: int = 0, device: str = "cpu",
            img_size: int = 224, max_bad: float = MAX_BAD_FRACTION, progress: bool = True) -> dict:
    """Embed every image of `ds`. Unreadable images are skipped and listed; more than `max_bad` of them
    is an error (a wrong folder should not turn into a quiet, small evaluation).

    Returns {"embeddings": (N, E) float32, "labels": (N,) int64, "classes", "items", "skipped": [paths]}.
    """
    import torch
    from tqdm import tqdm

    model = backbone.model.to(device).eval()
    loader = torch.utils.data.DataLoader(_Transformed(ds, eval_transform(backbone.mean, backbone.std, img_size)),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    cuda = torch.device(device).type == "cuda"
    embs, labels, kept, skipped = [], [], [], []
    bar = tqdm(total=len(ds), desc=f"embedding {ds.name}", unit="img", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 on CUDA only
        for index, x, y, bad in loader:
            skipped += [ds.describe(i) for i in bad]
            if len(skipped) > max_bad * len(ds):
                raise RuntimeError(f"{ds.name}: {len(skipped)} unreadable images (more than {max_bad:.0%} of "
                                   f"{len(ds)}), e.g. {skipped[:3]}; check the dataset path and files")
            if x is not None:
                embs.append(embed(model, x.to(device, non_blocking=True), how).float().cpu())
                labels.append(y)
                kept.append(index)
            bar.update(len(bad) + (0 if x is None else len(x)))
            if skipped:
                bar.set_postfix(skipped=len(skipped))
    bar.close()
    if not embs:
        raise RuntimeError(f"{ds.name}: no image could be read (e.g. {skipped[:3]})")
    kept = torch.cat(kept).tolist()
    return {"embeddings": torch.cat(embs), "labels": torch.cat(labels), "classes": list(ds.classes),
            "items": [ds.describe(i) for i in kept], "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# the on-disk cache


def save_split(folder, split: str, result: dict, manifest_entry: dict) -> None:
    """`<folder>/<split>.pt` plus its entry in `<folder>/manifest.json`, both written atomically."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{split}.pt.tmp"
    torch.save(result, tmp)
    tmp.rename(folder / f"{split}.pt")
    manifest = read_manifest(folder)
    manifest[split] = {**manifest_entry, "count": len(result["labels"]), "dim": result["embeddings"].shape[1],
                       "skipped": len(result["skipped"]), "classes": result["classes"]}
    (folder / "manifest.json.tmp").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "manifest.json.tmp").rename(folder / "manifest.json")


def read_manifest(folder) -> dict:
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_split(folder, split: str) -> dict:
    import torch

    path = Path(folder) / f"{split}.pt"
    if not path.is_file():
        have = sorted(p.stem for p in Path(folder).glob("*.pt"))
        raise FileNotFoundError(f"no '{split}' embeddings in {folder} (found {have or 'none'}); run eval/extract.py")
    result = torch.load(path, map_location="cpu", weights_only=True)
    result["manifest"] = read_manifest(folder).get(split, {})  # which model / dataset / embedding made them
    return result


def cached_or_extract(backbone, spec: str, split: str, folder, how: str, *, classes=None, overwrite=False,
                      **kwargs) -> dict:
    """Embeddings of dataset `spec` as `split` in `folder`: reused when the manifest says they come from the
    same model, dataset and embedding; recomputed with `overwrite`; otherwise an error (never replaced
    silently)."""
    from eval.datasets import open_dataset

    entry = {"dataset": spec, "embedding": how, "model": backbone.describe(), "img_size": kwargs.get("img_size", 224)}
    old = read_manifest(folder).get(split)
    if old is not None and (Path(folder) / f"{split}.pt").is_file() and not overwrite:
        same = {k: old.get(k) for k in entry} == entry
        if same:
            return load_split(folder, split)
        raise FileExistsError(f"{folder}/{split}.pt holds embeddings of another model / dataset / embedding "
                              f"({old.get('model', {}).get('source')}, {old.get('dataset')}, {old.get('embedding')}); "
                              "pass --overwrite to replace them or choose another folder")
    ds = open_dataset(spec, classes=classes)
    result = extract(backbone, ds, how, **kwargs)
    save_split(folder, split, result, entry)
    return load_split(folder, split)


# ---------------------------------------------------------------------------------------------
# command-line plumbing for the model (shared by every eval script)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --ckpt / --timm)")
    g.add_argument("--ckpt", help="pathfm checkpoint step folder, checkpoints/last, run folder or export folder")
    g.add_argument("--timm", metavar="NAME", help="a baseline: a timm architecture (random init without --weights), "
                   "local-dir:PATH (a public model's folder: config.json + model.safetensors) or hf-hub:ORG/NAME "
                   "(read from the local Hugging Face cache, never downloaded)")
    g.add_argument("--weights", help="local weights file for a plain --timm architecture")
    g.add_argument("--timm-args", type=json.loads, default=None, metavar="JSON",
                   help="model_args for a local-dir: / hf-hub: model beyond its config.json, e.g. "
                        "'{\"mlp_layer\": \"timm.layers.SwiGLUPacked\", \"act_layer\": \"torch.nn.SiLU\"}' (Virchow2)")
    g.add_argument("--embedding", default="cls", help="cls (eva default), mean (patch tokens), cls_mean (Midnight), "
                   "lastN (e.g. last4); patches (B, N, D) for dense probes")
    g.add_argument("--img-size", type=int, default=None,
                   help="centre crop size (default: eva's 224; a local-dir: / hf-hub: model's own input size)")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers for image decoding")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--max-bad", type=float, default=MAX_BAD_FRACTION, help="unreadable-image share that is an error")


def backbone_from_args(args):
    """The model of --ckpt / --timm; a --timm baseline is built for the probe's --img-size (timm defaults
    the DINOv2 family to 518 px, which would refuse 224 px inputs)."""
    from eval.backbone import load_eval_backbone

    try:
        backbone = load_eval_backbone(args.ckpt, args.timm, args.weights, img_size=args.img_size,
                                      timm_args=getattr(args, "timm_args", None))
    except (ValueError, FileNotFoundError) as e:  # the user's path or name: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    args.img_size = args.img_size or backbone.input_size
    return backbone


def extract_kwargs(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, img_size=args.img_size,
                max_bad=args.max_bad)



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", action="append", required=True, metavar="SPEC[=SPLIT]",
                   help="dataset (crc:ROOT:train, folder, file.csv:test, ...), optionally =NAME to name the split; "
                        "repeat for several")
    p.add_argument("--out", required=True, help="folder for <split>.pt files and manifest.json")
    p.add_argument("--overwrite", action="store_true", help="replace embeddings of another model in --out")
    args = p.parse_args(argv)
    backbone = backbone_from_args(args)
    classes = None
    for item in args.data:
        spec, _, name = item.partition("=")
        name = name or _split_name(spec)
        r = cached_or_extract(backbone, spec, name, args.out, args.embedding, classes=classes,
                              overwrite=args.overwrite, **extract_kwargs(args))
        classes = classes or r["classes"]
        print(f"{name}: {tuple(r['embeddings'].shape)} from {spec}, {len(r['skipped'])} skipped -> {args.out}/{name}.pt")


def _split_name(spec: str) -> str:
    last = spec.rsplit(":", 1)[-1]
    return last if last in ("train", "val", "test") else Path(spec.rstrip("/")).name


if __name__ == "__main__":
    main()
