"""Weights in and out: timm exports, and timm / DINOv2 backbone files as a starting point.

    name, kwargs, sd = timm_export(vit)
    timm.create_model(name, num_classes=0, **kwargs).load_state_dict(sd, strict=True)

`kwargs` holds what differs from timm's registered defaults (img_size, init_values, ...); the
export sidecar records them so eva's MODEL_EXTRA_KWARGS can pass them on.

    python -m pathfm.export runs/<name>/checkpoints/last -o runs/<name>/export   # no GPU, no process group
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch

from pathfm.checkpoint import quiet_dcp, load_teacher_backbone, resolve_checkpoint
from pathfm.vit import ARCHS, VisionTransformer, ViTArgs, build_vit, resample_pos_grid

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
    from pathfm.release import write_release

    write_release(folder, name, kwargs, sd, model, mean, std, Path(run_dir) if run_dir else None, sidecar.get("step"))
    return folder / "model.pth"


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """The teacher backbone of a checkpoint (any number of ranks) -> `out_dir/model.pth` + `model.json`,
    at the global crop size it was trained at. One process, no process group, no GPU; returns model.pth."""
    step_dir = resolve_checkpoint(path)
    vit, meta = load_teacher_backbone(step_dir)
    img_size = meta.get("config", {}).get("crops", {}).get("global_size")
    out = save_export(vit, out_dir, mean=meta["mean"], std=meta["std"], img_size=img_size,
                      extra={"step": meta["step"], "checkpoint": str(step_dir.resolve())},
                      run_dir=step_dir.parent.parent)  # <run>/checkpoints/step_N
    if heads := checkpoint_heads(step_dir):  # heads.safetensors: to continue or distil from the export
        save_heads(out_dir, *heads)
    return out


# ---------------------------------------------------------------------------------------------
# heads: heads.safetensors beside the timm weights (timm never reads it), so others can continue or distil

HEADS_FILE = "heads.safetensors"


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


def _heads_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" and path.name == HEADS_FILE else (path if path.is_dir() else path.parent) / HEADS_FILE


def read_heads_args(path: str | Path) -> dict | None:
    """The head args in an export folder's (or a weights file's folder's) heads.safetensors; None without one."""
    from safetensors import safe_open

    f = _heads_path(path)
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata() or {}
    if "pathfm_heads" not in meta:
        raise ValueError(f"{f} has no pathfm_heads metadata: not written by pathfm.export.save_heads")
    return json.loads(meta["pathfm_heads"])


def load_heads(path: str | Path) -> tuple[dict, dict]:
    """(tensors named dino_head.* / ibot_head.*, head args) from heads.safetensors in an export folder."""
    from safetensors.torch import load_file

    args = read_heads_args(path)
    if args is None:
        raise FileNotFoundError(f"no {HEADS_FILE} at '{path}'")
    return load_file(str(_heads_path(path))), args


def load_heads_into(model: torch.nn.ModuleDict, heads: dict, where) -> None:
    """Copy head tensors into model's dino_head / ibot_head, strictly; a mismatch is one ValueError line."""
    for name in [n for n in ("dino_head", "ibot_head") if n in model]:
        sd = {k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")}
        own = model[name].state_dict()
        bad = sorted(set(own) ^ set(sd)) or [k for k in own if own[k].shape != sd[k].shape]
        if bad:
            shapes = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("last_layer.weight")}
            raise ValueError(f"the heads in '{where}' do not fit this model's {name} (first difference: {bad[0]}; "
                             f"file prototypes x bottleneck {shapes or 'none'} vs model "
                             f"{tuple(own['last_layer.weight'].shape)}): set the ssl head keys as the file's "
                             "model.json 'heads' entry, or model.init_heads=false for fresh heads")
        model[name].load_state_dict(sd, strict=True)


def load_ema(step_dir: str | Path, model: torch.nn.ModuleDict) -> dict:
    """Fill model (backbone [+ heads], any device) from a pathfm checkpoint's EMA ("teacher") entry; no process
    group needed. Returns meta.json."""
    import torch.distributed.checkpoint as dcp

    step_dir = resolve_checkpoint(step_dir)
    state = {"teacher": {k: v for k, v in model.state_dict().items()}}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state["teacher"], strict=True)
    return json.loads((step_dir / "meta.json").read_text())


def checkpoint_heads(step_dir: str | Path) -> tuple[dict, dict] | None:
    """(head tensors, head args) of a checkpoint's EMA heads, for save_heads; None for a checkpoint without them."""
    from pathfm.heads import HEAD_KEYS, build_heads

    step_dir = resolve_checkpoint(step_dir)
    meta = json.loads((step_dir / "meta.json").read_text())
    ssl = meta.get("config", {}).get("ssl", {})
    if not all(k in ssl for k in HEAD_KEYS):
        return None
    from pathfm import vit

    args = {k: ssl[k] for k in HEAD_KEYS} | {"in_dim": vit.ARCHS[meta["vit_args"]["arch"]][0]}
    with torch.device("meta"):
        heads = torch.nn.ModuleDict(build_heads(args["in_dim"], args))
    heads = heads.to_empty(device="cpu")
    state = {"teacher": dict(heads.state_dict())}
    import torch.distributed.checkpoint as dcp

    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    return state["teacher"], args


def resolve_weights(path: str | Path) -> Path:
    """An export folder -> its weights file (model.safetensors or model.pth); any other path unchanged."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.pth"):
            if (path / name).is_file():
                return path / name
    return path


# ---------------------------------------------------------------------------------------------
# loading a backbone file as the starting point of training


def _from_dinov2(sd: dict, model: VisionTransformer) -> dict:
    """DINOv2's own names (register_tokens, mlp.w12 / w3, class token inside pos_embed) -> ours."""
    out = {}
    sd = dict(sd)
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
    n = sd["pos_embed"].shape[1] if "pos_embed" in sd else 0
    if model.no_embed_class and "cls_token" in sd and n > 1 and round((n - 1) ** 0.5) ** 2 == n - 1:
        # DINOv2 stores a class-token position (1 + grid^2 entries) and adds it to the class token;
        # timm's register layout (grid^2 entries) folds it into cls_token
        pos = sd.pop("pos_embed")
        out["cls_token"] = sd.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for k, v in sd.items():
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    return out


def _resample_pos_embed(pos: torch.Tensor, model: VisionTransformer) -> torch.Tensor:
    """A checkpoint stored at another image size (DINOv2 ships 518 px): resample its patch grid as timm and DINOv2's
    register models do (antialiased bicubic, vit.resample_pos_grid)."""
    n_prefix = 0 if model.no_embed_class else 1
    want = model.pos_embed.shape[1] - n_prefix
    have = pos.shape[1] - n_prefix
    if have == want:
        return pos
    g_want = math.isqrt(want)
    return torch.cat([pos[:, :n_prefix], resample_pos_grid(pos[:, n_prefix:], (g_want, g_want), antialias=True)], dim=1)


def read_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif path.is_dir():
        raise ValueError(f"weights file '{path}' is a folder; give the .pth / .safetensors file (an export folder's "
                         "model.pth, or use --ckpt for pathfm checkpoints)")
    else:
        try:
            try:  # mapped: only the names and shapes are read until a tensor is used
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) torch.save file
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, IndexError) as e:
            raise ValueError(f"weights file '{path}' is not a PyTorch state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'empty or truncated'})") from None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"weights file '{path}' holds no state dict (found {type(sd).__name__})")
    for key in ("teacher", "model", "state_dict"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    prefixes = ("backbone.", "module.", "encoder.")
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return sd


def load_backbone(model: VisionTransformer, path: str | Path) -> None:
    """Initialise `model` from a timm or DINOv2-format backbone file, strictly.

    Missing or unexpected keys, and shape mismatches, are an error that lists them. Only the iBOT
    mask token may be absent (timm files drop it). Head weights in the file (`head.*`) are ignored.
    """
    sd = read_state_dict(path)
    sd = _from_dinov2(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.")) or v.numel() == 0}
    if "pos_embed" in sd:
        sd["pos_embed"] = _resample_pos_embed(sd["pos_embed"], model)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd) - {"mask_token"})
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        a = model.args
        lines = [f"weights file '{path}' does not fit {a.arch} patch {a.patch_size} with {a.num_registers} registers, ffn {a.ffn}, layerscale {a.layerscale}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}")
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape[:6])}")
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def load_export(folder: str | Path) -> tuple[VisionTransformer, dict]:
    """(ViT in eval mode, sidecar) from an export folder: rebuilt from model.json, weights loaded strictly.

    A sidecar that disagrees with its weights (another architecture, patch size, width) is an error
    that names both, never a silent partial load.
    """
    folder = Path(folder)
    sidecar_path = folder / "model.json"
    try:
        sidecar = json.loads(sidecar_path.read_text())
        args = ViTArgs(**sidecar["pathfm_args"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{sidecar_path}: not a pathfm export sidecar ({e}); expected the model.json written by "
                         "pathfm.export.save_export, with 'pathfm_args'") from None
    with torch.device("meta"):  # no random init of weights we are about to overwrite
        model = build_vit(args)
    model = model.to_empty(device="cpu")
    try:
        load_backbone(model, folder / "model.pth")
    except ValueError as e:
        raise ValueError(f"{folder}: model.pth does not match its sidecar model.json ({sidecar.get('timm_name')}):\n{e}") from None
    if sidecar.get("embed_dim", model.embed_dim) != model.embed_dim:
        raise ValueError(f"{sidecar_path}: embed_dim {sidecar['embed_dim']} disagrees with {args.arch} ({model.embed_dim})")
    with torch.no_grad():
        model.mask_token.zero_()  # not in exports; unused at inference
    return model.eval(), sidecar


def main(argv=None) -> Path:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pathfm.export",
                                description="Write a checkpoint's teacher backbone as timm weights (model.pth) + sidecar (model.json).")
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
