"""Weights out: timm exports of a checkpoint's EMA, with their heads and release files. Reading weights in any
format (these exports included) is pathfm/weights.py.

    name, kwargs, sd = timm_export(vit)
    timm.create_model(name, num_classes=0, **kwargs).load_state_dict(sd, strict=True)

`kwargs` holds what differs from timm's registered defaults (img_size, init_values, ...); the
export sidecar records them so eva's MODEL_EXTRA_KWARGS can pass them on.

    python -m pathfm.export runs/<name>/checkpoints/last -o runs/<name>/export   # no GPU, no process group
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pathfm.checkpoint import resolve_checkpoint
from pathfm.release import write_release
from pathfm.vit import ARCHS, VisionTransformer
from pathfm.weights import HEADS_FILE, checkpoint_heads, load_ema_backbone

_TIMM_FAMILY = {"vit_tiny": "vit_tiny", "vit_tiny_d6": "vit_tiny", "vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant"}
_TIMM_DEPTH = {"vit_tiny": 12, "vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant": 40}  # registered depths
# timm's registered defaults for the two families: (init_values, reg_tokens, img_size)
_CLASSIC = dict(init_values=None, img_size=224)
_DINOV2 = dict(init_values=1e-5, img_size=518)


def timm_name(arch: str, patch_size: int, num_registers: int) -> str:
    """The timm architecture whose layout matches ours (registered timm names only)."""
    fam = _TIMM_FAMILY[arch]
    if num_registers:
        if num_registers != 4 or patch_size != 14:
            raise ValueError(f"timm has no {arch} with patch {patch_size} and {num_registers} registers; use patch 14 and 4 registers")
        return f"{fam}_patch14_reg4_dinov2"
    if patch_size == 14:
        return f"{fam}_patch14_dinov2"
    if arch == "vit_giant2":
        raise ValueError("timm's giant ViT exists only with patch 14 (vit_giant_patch14_dinov2)")
    return f"{fam}_patch{patch_size}_224"


def timm_export(model: VisionTransformer, img_size: int | None = None) -> tuple[str, dict, dict]:
    """(timm name, create_model kwargs, state dict) for the backbone, loadable with strict=True.

    img_size: the resolution the model was trained at (a high-res post-training's 392 px global crops), by
    default the size its position embeddings are stored at. The embeddings are resampled to that grid here,
    with the interpolation the model itself applies to larger crops, so timm computes at img_size exactly
    what pathfm computed in training. `dynamic_img_size` lets timm take any other multiple of the patch size
    (resampling the embeddings itself).
    """
    a = model.args
    size = img_size or a.img_size
    if size % a.patch_size:
        raise ValueError(f"export img_size {size} is not a multiple of patch_size {a.patch_size}")
    name = timm_name(a.arch, a.patch_size, a.num_registers)
    defaults = _DINOV2 if name.endswith("dinov2") else _CLASSIC
    kwargs = {"img_size": size, "dynamic_img_size": True}
    if model.depth != _TIMM_DEPTH[_TIMM_FAMILY[a.arch]]:  # vit_tiny_d6: timm's vit_tiny with depth=6
        kwargs["depth"] = model.depth
    init_values = a.layerscale if a.layerscale > 0 else None
    if init_values != defaults["init_values"]:
        kwargs["init_values"] = init_values
    if a.ffn != ARCHS[a.arch][3]:
        raise ValueError(f"{a.arch} with ffn={a.ffn} has no timm counterpart")
    # no copy of fp32 CPU weights: an export holds the model once; other dtypes and devices are copied
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "mask_token"}
    if size != a.img_size:
        grid = size // a.patch_size
        with torch.no_grad():
            cls_pos, patch_pos = model.pos_embed_for(grid, grid)  # (1, [1 +] grid^2, D)
            pos = patch_pos if cls_pos is None else torch.cat([cls_pos, patch_pos], dim=1)
        sd["pos_embed"] = pos.detach().float().cpu().clone()
    return name, kwargs, sd


def save_export(model: VisionTransformer, folder: str | Path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                extra: dict | None = None, img_size: int | None = None, run_dir: str | Path | None = None) -> Path:
    """Write `<folder>/model.pth` (plain timm state dict) and `<folder>/model.json` (the sidecar), and the
    release beside them (pathfm.release): config.json, model.safetensors and a README.md model card.

    img_size: the training resolution (see timm_export); the sidecar records it and the sizes accepted.
    run_dir: the run folder the model card reads (config, metrics, probe results); None: a card without them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name, kwargs, sd = timm_export(model, img_size)
    tmp = folder / "model.pth.tmp"
    torch.save(sd, tmp)
    tmp.rename(folder / "model.pth")
    size, p = kwargs["img_size"], model.args.patch_size
    sidecar = {
        "timm_name": name,
        "timm_kwargs": kwargs,
        "img_size": size,  # native: position embeddings stored for this size, outputs exactly as in training
        "input_sizes": f"any multiple of {p} px per side (timm dynamic_img_size); exact at {size} px",
        "patch_size": p,
        "embed_dim": model.embed_dim,
        "num_registers": model.args.num_registers,
        "mean": list(mean),
        "std": list(std),
        "pathfm_args": {**vars(model.args), "img_size": size},
        **(extra or {}),
    }
    (folder / "model.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    write_release(folder, name, kwargs, sd, model, mean, std, Path(run_dir) if run_dir else None, sidecar.get("step"))
    return folder / "model.pth"


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """The EMA backbone of a checkpoint (any number of ranks) -> `out_dir/model.pth` + `model.json`,
    at the global crop size it was trained at. One process, no process group, no GPU; returns model.pth."""
    step_dir = resolve_checkpoint(path)
    vit, meta = load_ema_backbone(step_dir)
    img_size = meta.get("config", {}).get("crops", {}).get("global_size")
    out = save_export(vit, out_dir, mean=meta["mean"], std=meta["std"], img_size=img_size,
                      extra={"step": meta["step"], "checkpoint": str(step_dir.resolve())},
                      run_dir=step_dir.parent.parent)  # <run>/checkpoints/step_N
    if heads := checkpoint_heads(step_dir):  # heads.safetensors: to continue or distil from the export
        save_heads(out_dir, *heads)
    return out


# ---------------------------------------------------------------------------------------------
# heads: heads.safetensors beside the timm weights (timm never reads it), so others can continue or distil
def save_heads(folder: str | Path, heads: dict, args: dict) -> Path:
    """Write `<folder>/heads.safetensors`: the DINO (and iBOT) head tensors, named dino_head.* / ibot_head.*,
    with their args (pathfm.distill.HEAD_KEYS + in_dim) in the file's metadata; model.json, when present,
    gets a "heads" entry naming the file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.items()}, str(tmp),
              metadata={"pathfm_heads": json.dumps(args)})
    tmp.rename(folder / HEADS_FILE)
    sidecar = folder / "model.json"
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        meta["heads"] = {"file": HEADS_FILE, **args}
        sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return folder / HEADS_FILE


def main(argv=None) -> Path:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pathfm.export",
                                description="Write a checkpoint's EMA backbone as timm weights (model.pth) + sidecar (model.json).")
    p.add_argument("checkpoint", help="a step folder, a checkpoints/last pointer, a checkpoints folder or a run folder")
    p.add_argument("-o", "--out", required=True, help="output folder (created)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    a = p.parse_args(argv)
    if (Path(a.out) / "model.pth").exists() and not a.overwrite:
        raise SystemExit(f"error: {a.out}/model.pth exists; pass --overwrite to replace it or -o another folder")
    try:
        out = export_checkpoint(a.checkpoint, a.out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    meta = json.loads((out.parent / "model.json").read_text())
    print(f"wrote {out} ({meta['timm_name']}, step {meta['step']})")
    return out


if __name__ == "__main__":
    main()
