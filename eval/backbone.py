"""The frozen backbone to evaluate, rebuilt from what a checkpoint or export records, or a timm baseline.

    bb = load_eval_backbone(ckpt="runs/x/export")            # pathfm checkpoint / run / export folder
    bb = load_eval_backbone(timm_name="vit_small_patch16_224")  # random init: the lower bound
    bb.model, bb.mean, bb.std, bb.describe()

Checkpoints (step folders, `checkpoints/last`, run folders) go through the trainer's
`pathfm.checkpoint.load_teacher_backbone` when it is importable; export folders (model.pth + model.json)
are also read here directly, so evaluation does not depend on the training code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def load_export(folder) -> tuple[torch.nn.Module, dict]:
    """Rebuild a pathfm ViT from an export sidecar and load its weights strictly.

    A sidecar that disagrees with its weights (another architecture, patch size, width) is an error
    that names both, never a silent partial load.
    """
    from pathfm.export import load_backbone
    from pathfm.vit import ViTArgs, build_vit

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
    model.mask_token.data.zero_()  # not in exports; unused at inference
    return model.eval(), sidecar


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
    try:
        from pathfm.checkpoint import load_teacher_backbone  # the trainer's loader: step folders, `last`, runs
    except ImportError:
        load_teacher_backbone = None
    if load_teacher_backbone is not None and export is None:
        from pathfm.export import timm_name

        model, meta = load_teacher_backbone(str(path))
        a = model.args
        return EvalBackbone(model.eval(), tuple(meta.get("mean", (0.5,) * 3)), tuple(meta.get("std", (0.5,) * 3)),
                            str(path), timm_name(a.arch, a.patch_size, a.num_registers), meta.get("step"))
    if export is None:
        raise FileNotFoundError(f"'{ckpt}' is not an export folder (model.pth + model.json) and this pathfm has no "
                                "pathfm.checkpoint.load_teacher_backbone to read checkpoints; use runs/<name>/export")
    model, sidecar = load_export(export)
    return EvalBackbone(model, tuple(sidecar["mean"]), tuple(sidecar["std"]), str(path), sidecar["timm_name"],
                        sidecar.get("step"))


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
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"--weights {weights} does not fit timm '{name}': missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
    cfg = model.pretrained_cfg or {}
    return EvalBackbone(model.eval(), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                        f"timm:{name}" + (f":{weights}" if weights else ":random"), name,
                        extra={"weights": weights or "random"})
