"""The frozen backbone to evaluate, rebuilt from what a checkpoint or export records, or a timm baseline.

    bb = load_eval_backbone(ckpt="runs/x/export")            # pathfm checkpoint / run / export folder
    bb = load_eval_backbone(timm_name="vit_small_patch16_224")  # random init: the lower bound
    bb = load_eval_backbone(timm_name="local-dir:/models/Virchow2")    # a public model, as the hub holds it
    bb = load_eval_backbone(timm_name="hf-hub:bioptimus/H-optimus-0")  # from the local Hugging Face cache only
    bb.model, bb.mean, bb.std, bb.input_size, bb.describe()

Export folders (model.pth + model.json, or a run's export/) load with `pathfm.weights.load_export`;
checkpoints (step folders, `checkpoints/last`) with `pathfm.weights.load_ema_backbone`.
Public models (`local-dir:` / `hf-hub:`, a timm config.json + weights) are built by timm from their config.json,
with the layer names in its model_args resolved (timm passes them to the constructor as strings), and evaluated
with their own mean, std and input size. Nothing is downloaded: hf-hub names are read from the local cache.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pathfm.export import timm_name as timm_arch_name
from pathfm.weights import load_ema_backbone, load_export

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class EvalBackbone:
    model: torch.nn.Module  # eval mode; forward_features(x) -> (B, prefix + N, D) for ViTs
    mean: tuple
    std: tuple
    source: str  # what the user pointed at, for manifests and reports
    name: str  # architecture (timm name)
    step: int | None = None  # training step of a pathfm checkpoint, when known
    extra: dict = field(default_factory=dict)
    input_size: int = 224  # the crop the model expects by default (eva: 224; a hub model: its config's)

    def describe(self) -> dict:
        return {"source": self.source, "name": self.name, "step": self.step, "mean": list(self.mean),
                "std": list(self.std), **self.extra}


def _export_folder(path: Path) -> Path | None:
    """The export folder that `path` means, if it means one (the folder itself or a run's export/)."""
    for folder in (path, path / "export"):
        if (folder / "model.json").is_file() and (folder / "model.pth").is_file():
            return folder
    return None


def load_eval_backbone(ckpt: str | None = None, timm_name: str | None = None, weights: str | None = None,
                       img_size: int | None = None, timm_args: dict | None = None) -> EvalBackbone:
    if (ckpt is None) == (timm_name is None):
        raise ValueError("give exactly one of --ckpt (a pathfm checkpoint, run or export folder) or --timm NAME")
    if timm_name is not None and timm_name.startswith(HUB_PREFIXES):
        if weights:
            raise ValueError(f"--weights with --timm {timm_name}: the folder's own weights are used; drop --weights")
        return _hub_backbone(timm_name, img_size, timm_args or {})
    if timm_name is not None:
        return _timm_backbone(timm_name, weights, img_size)
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{ckpt}' does not exist")
    export = _export_folder(path)
    if export is not None:  # an export folder, or a run folder read through its export
        model, sidecar = load_export(export)
        return EvalBackbone(model, tuple(sidecar["mean"]), tuple(sidecar["std"]), str(path), sidecar["timm_name"],
                            sidecar.get("step"))
    model, meta = load_ema_backbone(path)  # a step folder, checkpoints/last, or a run without export/
    a = model.args
    return EvalBackbone(model, tuple(meta.get("mean", (0.5,) * 3)), tuple(meta.get("std", (0.5,) * 3)), str(path),
                        timm_arch_name(a.arch, a.patch_size, a.num_registers), meta.get("step"))


def _timm_backbone(name: str, weights: str | None, img_size: int | None) -> EvalBackbone:
    """A timm architecture, randomly initialised (the paper's lower bound) or from a local weights file."""
    import timm

    kwargs = {"img_size": img_size or 224}  # built for the probe's crop: timm's DINOv2 family defaults to 518 px
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"--timm {name}: {e}") from None
    if weights:
        from pathfm.weights import read_state_dict

        sd = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("head.")}
        if "pos_embed" in sd and hasattr(model, "patch_embed") and sd["pos_embed"].shape != model.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed  # DINOv2 weights are stored at 518 px

            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=model.patch_embed.grid_size,
                                                     num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"--weights {weights} does not fit timm '{name}': missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
    cfg = model.pretrained_cfg or {}
    return EvalBackbone(model.eval(), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                        f"timm:{name}" + (f":{weights}" if weights else ":random"), name,
                        extra={"weights": weights or "random"})


# ---------------------------------------------------------------------------------------------
# public models: a timm config.json + weights, as the Hugging Face hub holds them

HUB_PREFIXES = ("local-dir:", "hf-hub:")


def hub_folder(name: str) -> Path:
    """local-dir:PATH -> PATH; hf-hub:ORG/NAME[@REVISION] -> its snapshot in the local Hugging Face cache, offline
    (never a download: a model not in the cache is an error that says how to get it)."""
    source, _, ident = name.partition(":")
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--timm {name}: no config.json in '{folder}' (expected a model folder as the hub "
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
        raise FileNotFoundError(f"--timm {name}: not in the local Hugging Face cache ({type(e).__name__}); download it "
                                f"once where there is network (huggingface-cli download {repo}), or give "
                                "local-dir:PATH to a copy") from None


def resolve_layer(key: str, value, where: str):
    """A layer named in model_args -> the class timm's constructor needs: 'timm.layers.SwiGLUPacked',
    'torch.nn.SiLU', or a bare name in timm.layers / torch.nn ('SwiGLUPacked', 'SiLU'), or an activation / norm
    name timm knows ('silu', 'layernorm'). Only timm and torch are imported from."""
    if not isinstance(value, str):
        return value
    import timm.layers

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


def _layer_key(key: str) -> bool:
    return key.endswith("_layer") or key in ("block_fn", "mlp_fn")


def _hub_backbone(name: str, img_size: int | None, timm_args: dict) -> EvalBackbone:
    """A public model from its folder: timm builds it from config.json with the layer names resolved and loads its
    weights strictly; mean, std and input size come from its pretrained_cfg. A model that cannot be built is one
    ValueError line naming the config key at fault."""
    import re

    import timm

    folder = hub_folder(name)
    where = f"--timm {name} (config.json)"
    try:
        cfg = json.loads((folder / "config.json").read_text())
        arch = cfg["architecture"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: not a timm model config ({type(e).__name__}: {e}); expected 'architecture', "
                         "'model_args' and 'pretrained_cfg'") from None
    if not timm.is_model(arch):
        raise ValueError(f"{where}: architecture '{arch}' is not a timm {timm.__version__} model")
    model_args = {**cfg.get("model_args", {}), **timm_args}
    kwargs = {k: resolve_layer(k, v, where if k not in timm_args else "--timm-args") for k, v in model_args.items() if _layer_key(k)}
    kwargs["num_classes"] = 0  # embeddings, never a classifier
    pcfg = cfg.get("pretrained_cfg", cfg)
    native = int((pcfg.get("input_size") or (3, 224, 224))[-1])
    dynamic = model_args.get("dynamic_img_size", False)
    if img_size and img_size != native and not dynamic:
        kwargs["img_size"] = img_size  # timm resamples the position embeddings as it loads
    kwargs.update({k: v for k, v in timm_args.items() if k not in kwargs})
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    except TypeError as e:  # a model_args key the architecture does not take
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise ValueError(f"{where}: model_args.{bad.group(1) if bad else '?'} is not an argument of timm's "
                         f"{arch} ({str(e).splitlines()[0][:160]})") from None
    except RuntimeError as e:  # weights that do not fit the architecture the config describes
        msg = " ".join(str(e).split())
        key = re.search(r'(?:size mismatch for |key\(s\) in state_dict: ")([\w.]+)', msg)
        raise ValueError(f"{where}: the weights do not fit {arch} as model_args describe it (first key at fault: "
                         f"{key.group(1) if key else '?'}; {msg[:200]}...); a layer its config does not name (e.g. "
                         "mlp_layer) can be given with --timm-args") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--timm {name}: {e}") from None
    mean, std = tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD))
    return EvalBackbone(model.eval(), mean, std, name, arch, extra={"weights": str(folder)}, input_size=native)


def input_size_hint(timm_name: str | None) -> int:
    """The default crop of a model before it is built: a hub model's config input size, else eva's 224."""
    if timm_name and timm_name.startswith(HUB_PREFIXES):
        try:
            cfg = json.loads((hub_folder(timm_name) / "config.json").read_text())
            return int(cfg.get("pretrained_cfg", cfg).get("input_size", (3, 224, 224))[-1])
        except (OSError, ValueError, TypeError):
            return 224  # the model load will say what is wrong
    return 224
