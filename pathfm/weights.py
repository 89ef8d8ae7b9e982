"""Weights in: every format pathfm reads a model from. Writing them (exports, release folders) is pathfm/export.py.

    load_backbone(vit, "dinov2_vitl14_reg4.pth")          # timm- or DINOv2-named state dict, strictly; resampled
    vit, sidecar = load_export("runs/<name>/export")      # an export folder, rebuilt from its model.json
    vit, meta = load_ema_backbone("runs/<name>")          # a checkpoint's EMA backbone, rebuilt from its meta.json
    heads, args = load_heads("runs/<name>/export")        # heads.safetensors beside an export
    model = build_hub_model(hub_folder("hf-hub:org/name"), where)  # a public model folder (config.json), built by timm

Checkpoints are read in one process, without a process group (also inside a distributed job); resuming
training from one is pathfm/checkpoint.py's load_checkpoint.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from pathfm.checkpoint import ema_key, quiet_dcp, resolve_checkpoint
from pathfm.heads import HEAD_KEYS, build_heads
from pathfm.vit import ARCHS, VisionTransformer, ViTArgs, build_vit, resample_pos_grid


# ---------------------------------------------------------------------------------------------
# backbone files (timm, DINOv2) and export folders


def resolve_weights(path: str | Path) -> Path:
    """An export folder -> its weights file (model.safetensors or model.pth); any other path unchanged."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "model.pth"):
            if (path / name).is_file():
                return path / name
    return path


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


# ---------------------------------------------------------------------------------------------
# heads: heads.safetensors beside the timm weights (pathfm.export.save_heads writes it)

HEADS_FILE = "heads.safetensors"


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


# ---------------------------------------------------------------------------------------------
# pathfm checkpoints: the student's EMA (what is exported and probed)


def load_ema(path: str | Path, model: nn.Module) -> dict:
    """Fill model (any device) from a pathfm checkpoint's EMA, every tensor by its state-dict name (backbone.*,
    dino_head.*, ...), strictly; model may hold a part of what was saved (the backbone alone, the heads alone).
    One process, no process group needed, also inside a distributed job (rank 0 exporting). Returns meta.json."""
    step_dir = resolve_checkpoint(path)
    key = ema_key(step_dir)  # "ema"; "teacher" in checkpoints written before the rename
    state = {key: dict(model.state_dict())}
    with quiet_dcp():
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    model.load_state_dict(state[key], strict=True)
    return json.loads((step_dir / "meta.json").read_text())


def load_ema_backbone(path: str | Path) -> tuple[VisionTransformer, dict]:
    """(the EMA's ViT in eval mode, meta) from a checkpoint or run folder, rebuilt from what the checkpoint records
    (meta.json's vit_args). Export folders load with load_export."""
    step_dir = resolve_checkpoint(path)
    meta = json.loads((step_dir / "meta.json").read_text())
    with torch.device("meta"):  # no random init of weights we are about to overwrite
        vit = build_vit(ViTArgs(**meta["vit_args"]))
    vit = vit.to_empty(device="cpu")
    load_ema(step_dir, nn.ModuleDict({"backbone": vit}))
    return vit.eval(), meta


def checkpoint_heads(path: str | Path) -> tuple[dict, dict] | None:
    """(head tensors, head args) of the heads a checkpoint's EMA holds, for save_heads; None for a checkpoint without
    any (a student distilled on features trains none). The student holds only heads a loss trained (build_student):
    an iBOT head that never ran is absent, and the args then say objective "dino" (a DINO head only)."""
    step_dir = resolve_checkpoint(path)
    meta = json.loads((step_dir / "meta.json").read_text())
    ssl = meta.get("config", {}).get("ssl", {})
    saved, key = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata, ema_key(step_dir)
    held = {name for name in ("dino_head", "ibot_head") if any(k.startswith(f"{key}.{name}.") for k in saved)}
    if not all(k in ssl for k in HEAD_KEYS) or "dino_head" not in held:
        return None
    args = {k: ssl[k] for k in HEAD_KEYS} | {"in_dim": ARCHS[meta["vit_args"]["arch"]][0]}
    if args["objective"] == "dinov2" and args["ibot_separate_head"] and "ibot_head" not in held:
        args["objective"] = "dino"  # its iBOT head never ran (distill.patch_targets=false): not exported
    with torch.device("meta"):
        heads = nn.ModuleDict(build_heads(args["in_dim"], args))
    heads = heads.to_empty(device="cpu")
    load_ema(step_dir, heads)
    return dict(heads.state_dict()), args


# ---------------------------------------------------------------------------------------------
# public models: a timm config.json + weights, as the Hugging Face hub holds them (UNI, Virchow, H-optimus, ...)

HUB_PREFIXES = ("local-dir:", "hf-hub:")


def hub_folder(name: str) -> Path:
    """local-dir:PATH -> PATH; hf-hub:ORG/NAME[@REVISION] -> its snapshot in the local Hugging Face cache, offline
    (never a download: a model not in the cache is an error that says how to get it)."""
    import os

    source, _, ident = name.partition(":")
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{name}: no config.json in '{folder}' (expected a model folder as the hub "
                                    "holds it: config.json + model.safetensors)")
        return folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # for huggingface_hub if not imported yet; local_files_only decides
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = ident.partition("@")
    # the cache as the user's environment names it now (huggingface_hub reads it once, when first imported)
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ["HF_HOME"] + "/hub" if os.environ.get("HF_HOME") else None)
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision or None, cache_dir=cache,
                                    local_files_only=True)).parent
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{name}: not in the local Hugging Face cache ({type(e).__name__}); download it "
                                f"once where there is network (huggingface-cli download {repo}), or give "
                                "local-dir:PATH to a copy") from None


def read_hub_config(folder: Path, where: str) -> dict:
    """A hub folder's config.json (architecture, model_args, pretrained_cfg); one ValueError line when it is not timm's."""
    import timm

    try:
        cfg = json.loads((folder / "config.json").read_text())
        arch = cfg["architecture"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: not a timm model config ({type(e).__name__}: {e}); expected 'architecture', "
                         "'model_args' and 'pretrained_cfg'") from None
    if not timm.is_model(arch):
        raise ValueError(f"{where}: architecture '{arch}' is not a timm {timm.__version__} model")
    return cfg


def hub_pretrained_cfg(cfg: dict) -> dict:
    """mean, std, input_size (C, H, W) of a hub config (timm writes them under pretrained_cfg; older files at the top)."""
    return cfg.get("pretrained_cfg", cfg)


def hub_weights(folder: Path) -> Path:
    """The weights file of a hub folder, as timm looks for it."""
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"'{folder}' has config.json but no model.safetensors or pytorch_model.bin")


def resolve_layer(key: str, value, where: str):
    """A layer named in model_args -> the class timm's constructor needs: 'timm.layers.SwiGLUPacked',
    'torch.nn.SiLU', or a bare name in timm.layers / torch.nn ('SwiGLUPacked', 'SiLU'), or an activation / norm
    name timm knows ('silu', 'layernorm'). Only timm and torch are imported from."""
    import functools
    import importlib

    import timm.layers

    if not isinstance(value, str):
        return value
    if "." in value:
        module, _, attr = value.rpartition(".")
        if module.split(".")[0] in ("timm", "torch"):
            try:
                found = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                found = None
            if isinstance(found, (type, functools.partial)):  # a layer, never an arbitrary function
                return found
    else:
        for module in (timm.layers, torch.nn):
            found = getattr(module, value, None)
            if isinstance(found, (type, functools.partial)):  # timm's SwiGLUPacked is a partial of GluMlp
                return found
        try:
            if key == "act_layer":
                return timm.layers.get_act_layer(value)
            if key.endswith("norm_layer"):
                return timm.layers.get_norm_layer(value)
        except (ValueError, KeyError, AssertionError):
            pass
    raise ValueError(f"{where}: model_args.{key} = '{value}' names no timm or torch layer (expected e.g. "
                     "'timm.layers.SwiGLUPacked', 'torch.nn.SiLU' or 'silu')")


def build_hub_model(folder: Path, where: str, img_size: int | None = None, extra_args: dict | None = None,
                    pretrained: bool = True, extra_where: str = "extra model arguments") -> nn.Module:
    """A public model from its folder: timm builds it from config.json with the layer names in its model_args resolved
    (timm passes them to the constructor as strings) and loads its weights strictly, no classifier. img_size (when not
    dynamic): the size it is built for; timm resamples the position embeddings once as it loads (antialiased
    bicubic). extra_args: constructor arguments over the config's (extra_where: what the user calls them). A model that cannot be built is one ValueError
    line naming the config key at fault."""
    import re

    import timm

    cfg = read_hub_config(folder, where)
    extra_args = extra_args or {}
    model_args = {**cfg.get("model_args", {}), **extra_args}
    is_layer = lambda k: k.endswith("_layer") or k in ("block_fn", "mlp_fn")  # noqa: E731
    kwargs = {k: resolve_layer(k, v, where if k not in extra_args else extra_where)
              for k, v in model_args.items() if is_layer(k)}
    kwargs["num_classes"] = 0  # embeddings, never a classifier
    native = int((hub_pretrained_cfg(cfg).get("input_size") or (3, 224, 224))[-1])
    if img_size and img_size != native and not model_args.get("dynamic_img_size", False):
        kwargs["img_size"] = img_size
    kwargs.update({k: v for k, v in extra_args.items() if k not in kwargs})
    try:
        return timm.create_model(f"local-dir:{folder}", pretrained=pretrained, **kwargs)
    except TypeError as e:  # a model_args key the architecture does not take
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise ValueError(f"{where}: model_args.{bad.group(1) if bad else '?'} is not an argument of timm's "
                         f"{cfg['architecture']} ({str(e).splitlines()[0][:160]})") from None
    except RuntimeError as e:  # weights that do not fit the architecture the config describes
        msg = " ".join(str(e).split())
        key = re.search(r'(?:size mismatch for |key\(s\) in state_dict: ")([\w.]+)', msg)
        raise ValueError(f"{where}: the weights do not fit {cfg['architecture']} as model_args describe it (first key "
                         f"at fault: {key.group(1) if key else '?'}; {msg[:200]}...); a layer its config does not name "
                         f"(e.g. mlp_layer) can be given in {extra_where}") from None


def weight_shapes(path: Path) -> dict:
    """{name: shape} of a weights file without reading its tensors (safetensors header; a mapped torch file)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
