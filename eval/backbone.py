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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pathfm.export import timm_name as timm_arch_name
from pathfm.weights import (HUB_PREFIXES, build_hub_model, hub_folder, hub_pretrained_cfg, load_ema_backbone, load_export,
                            read_hub_config, read_state_dict)

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
# public models: a timm config.json + weights, as the Hugging Face hub holds them (read by pathfm.weights)


def _hub_backbone(name: str, img_size: int | None, timm_args: dict) -> EvalBackbone:
    """A public model from its folder (pathfm.weights.build_hub_model: timm builds it from config.json and loads its
    weights strictly), with the mean, std and input size of its pretrained_cfg."""
    try:
        folder = hub_folder(name)
        where = f"--timm {name} (config.json)"
        cfg = read_hub_config(folder, where)
        model = build_hub_model(folder, where, img_size, timm_args, extra_where="--timm-args")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--timm {e}") from None
    pcfg = hub_pretrained_cfg(cfg)
    mean, std = tuple(pcfg.get("mean", IMAGENET_MEAN)), tuple(pcfg.get("std", IMAGENET_STD))
    native = int((pcfg.get("input_size") or (3, 224, 224))[-1])
    return EvalBackbone(model.eval(), mean, std, name, cfg["architecture"], extra={"weights": str(folder)}, input_size=native)


def input_size_hint(timm_name: str | None) -> int:
    """The default crop of a model before it is built: a hub model's config input size, else eva's 224."""
    if timm_name and timm_name.startswith(HUB_PREFIXES):
        try:
            cfg = json.loads((hub_folder(timm_name) / "config.json").read_text())
            return int(cfg.get("pretrained_cfg", cfg).get("input_size", (3, 224, 224))[-1])
        except (OSError, ValueError, TypeError):
            return 224  # the model load will say what is wrong
    return 224
