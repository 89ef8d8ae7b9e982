"""The frozen backbone to evaluate, rebuilt from what a checkpoint or export records, or a timm baseline.

    bb = load_eval_backbone(ckpt="runs/x/export")            # pathfm checkpoint / run / export folder
    bb = load_eval_backbone(timm_name="vit_small_patch16_224")  # random init: the lower bound
    bb.model, bb.mean, bb.std, bb.describe()

Export folders (model.pth + model.json, or a run's export/) load with `pathfm.export.load_export`;
checkpoints (step folders, `checkpoints/last`) with `pathfm.checkpoint.load_teacher_backbone`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pathfm.checkpoint import load_teacher_backbone
from pathfm.export import load_export
from pathfm.export import timm_name as timm_arch_name

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
                       img_size: int | None = None) -> EvalBackbone:
    if (ckpt is None) == (timm_name is None):
        raise ValueError("give exactly one of --ckpt (a pathfm checkpoint, run or export folder) or --timm NAME")
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
    model, meta = load_teacher_backbone(path)  # a step folder, checkpoints/last, or a run without export/
    a = model.args
    return EvalBackbone(model, tuple(meta.get("mean", (0.5,) * 3)), tuple(meta.get("std", (0.5,) * 3)), str(path),
                        timm_arch_name(a.arch, a.patch_size, a.num_registers), meta.get("step"))


def _timm_backbone(name: str, weights: str | None, img_size: int | None) -> EvalBackbone:
    """A timm architecture, randomly initialised (the paper's lower bound) or from a local weights file."""
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"--timm {name}: {e}") from None
    if weights:
        from pathfm.export import read_state_dict

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
