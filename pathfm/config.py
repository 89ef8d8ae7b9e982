"""The configuration: one dataclass tree, merged as defaults <- YAML <- dotted overrides.

    cfg = load_config("configs/smoke.yaml", ["optim.base_lr=1e-3", "train.steps=10"])

Every key is checked: an unknown key fails with the dotted name and the closest valid one,
a value of the wrong type fails with the key, the expected type and the value. The resolved
config dumps to YAML (`to_yaml`) and loads back identical. No torch import here, so launchers
can read configs without the training stack.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config problem, with the dotted key at fault in the message."""


ARCH_NAMES = ("vit_tiny", "vit_tiny_d6", "vit_small", "vit_base", "vit_large", "vit_giant2")  # pathfm.vit.ARCHS (no torch here)


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_tiny_d6 | vit_small | vit_base | vit_large | vit_giant2 (pathfm.vit.ARCHS)
    patch_size: int = 16
    img_size: int = 224  # size the position embeddings are stored at
    num_registers: int = 0
    ffn: str = "mlp"  # mlp | swiglu
    layerscale: float = 1e-5  # LayerScale init; 0 disables LayerScale
    drop_path: float = 0.0  # stochastic depth rate (of the last block when drop_path_schedule is linear)
    drop_path_schedule: str = "uniform"  # uniform (DINOv2's drop_path_uniform: every block at drop_path) | linear (0 at the first block)
    drop_path_mode: str = "mask"  # mask | subset (DINOv2: residual branches run only on the kept images, saving FLOPs)
    attn_backend: str = "auto"  # auto | sdpa | xformers (auto: xformers when it works here)
    sdpa_kernels: list[str] = field(default_factory=list)  # flash | efficient | cudnn | math; [] = PyTorch chooses
    init_weights: str = ""  # timm / DINOv2 backbone file, or a pathfm export folder, to start from ("" = random init)
    init_heads: bool = True  # also load the DINO / iBOT heads an export folder holds (heads.safetensors beside the weights)


@dataclass
class SSLConfig:
    objective: str = "dinov2"  # dino (DINO v1: no iBOT) | dinov2 (DINO + iBOT)
    prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    ibot_prototypes: int = 65536  # used when ibot_separate_head
    centering: str = "centering"  # centering (EMA centre) | sinkhorn_knopp
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup_start: float = 0.04
    teacher_temp_warmup_steps: int = 0
    momentum_teacher: float = 0.992  # EMA momentum at step 0, cosine to momentum_teacher_final
    momentum_teacher_final: float = 1.0
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_probability: float = 0.5  # share of global crops that get an iBOT mask
    koleo_weight: float = 0.1
    kde_weight: float = 0.0  # Midnight: KDE uniformity regulariser in place of KoLeo
    kde_bandwidth: float = 0.447  # Gaussian kernel width h on L2-normalised CLS tokens (vMF kappa = 1/h^2 = 5, as Virchow 2)
    freeze_last_layer_steps: int = 0  # prototype layer frozen this many steps


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (generated slides) | manifest | random (random pixels, no I/O)
    manifest: str = ""  # CSV: path[, mpp][, weight][, group]
    index: str = ""  # a built slide index (python -m pathfm.data.index); "" = built from the manifest on first use
    index_workers: int = 0  # processes per rank that build the index when it is missing (0: the rank's CPUs)
    index_timeout_s: float = 120.0  # seconds one slide may take to open, read and describe in the index build; over it: unusable
                                    # (0: no limit). A pyramidal slide takes under 2 s of CPU (BENCHMARKS.md, "Describe time")
    stall_timeout_s: float = 600.0  # a loader with no batch for this long ends the run (exit 75, requeue) naming the slides (0: no limit; needs num_workers > 0)
    tiles_per_visit: int = 8  # tiles read from a slide per visit (one file open per visit; visits are shuffled)
    read_ahead_mb: float = 16.0  # per loader worker: stored JPEG tiles read ahead of their decode, at most this many MB
                                 # held (hides shared-storage latency; 0: each read waits in turn)
    read_threads: int = 128  # per loader worker: the most reads in flight at once (a thread each); below it the number
                             # follows the measured read latency x decode rate, so no file system needs it tuned
    synthetic_slides: int = 3
    synthetic_size: int = 4096  # level-0 width and height of each synthetic slide
    cache_dir: str = ".cache/pathfm"  # synthetic slides and tissue masks
    mpps: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    mpp_weights: list[float] = field(default_factory=list)  # empty = uniform
    tile_size: int = 224
    tissue_threshold: float = 0.4
    group_balance: bool = False
    reader: str = "auto"  # auto | openslide | jpeg (fast tiled-TIFF path)
    grid_aligned: bool = True  # a tile inside one stored tile where it fits (one JPEG decode, 4x fewer than a free
                               # position); where that leaves the tissue, the drawn position. false: free positions
    hsv_filter: bool = False  # Virchow's colour filter (Midnight): keep a tile when >= 60% of its pixels have H 180-360 deg, S 8-255, V 103-255
    num_workers: int = 2
    device_augment: bool = False  # workers only read; crops run batched on the device


@dataclass
class CropsConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale_min: float = 0.32
    global_scale_max: float = 1.0
    local_scale_min: float = 0.05
    local_scale_max: float = 0.32
    color_jitter: float = 0.8  # probability
    grayscale: float = 0.2
    blur_global: float = 1.0  # blur probability for the first global crop (second: 0.1)
    blur_local: float = 0.5
    solarize: float = 0.2  # on the second global crop
    hed_jitter: float = 0.0  # sigma of Tellez et al.'s HED jitter: each stain concentration (optical density) x U(1-s, 1+s) + U(-s, s); 0.05 "HED-light", 0.2 "strong", 0 off
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class OptimConfig:
    batch_size: int = 64  # per rank
    base_lr: float = 0.004  # at the reference batch
    lr_ref_batch: int = 1024
    lr_scaling: str = "sqrt"  # sqrt | linear | none: scaling from lr_ref_batch to the global batch
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_final: float = 0.2
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # max gradient norm; 0 = no clipping
    clip_grad_mode: str = "per_module"  # per_module (DINOv2: backbone and each head clipped on their own) | global (one norm over all)
    decay_tokens: bool = True  # weight decay on cls / position / register tokens, as DINO and DINOv2; false exempts them
    beta1: float = 0.9
    beta2: float = 0.999
    fused: bool = False  # fused AdamW (CUDA)


@dataclass
class TrainConfig:
    steps: int = 100
    stop_after: int = 0  # stop with a checkpoint after this many steps in this process (0 = run to train.steps)
    output_dir: str = "runs"
    name: str = ""  # run folder name under output_dir ("" = config file stem)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    rankme_every: int = 0  # 0 = off
    rankme_batch: int = 256
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops
    plateau_warn_steps: int = 1000  # warn once when the DINO loss stays at ln K this many steps after the lr
                                    # warm-up (teacher and student uniform: not learning); 0 = never
    precision: str = "fp32"  # fp32 | bf16 (CUDA)
    sync_timing: bool = False  # wait for the GPU at each phase so time/* metrics are exact (benchmarks)
    head_warmup_steps: int = -1  # continued pretraining: the backbone and its EMA untouched this many steps while fresh
                                 # heads learn; -1 = auto: train.steps // 10 (at most 2500) when model.init_weights
                                 # gives a backbone without heads, else 0
    backbone_ramp_steps: int = -1  # after a head warm-up the backbone's lr ramps from 0 over this many steps (AdamW
                                   # starts it with no moments); -1 = the warm-up's length (at least 1), 0 = no ramp
    init_checkpoint: str = ""  # start from a pathfm checkpoint (weights only), e.g. high-res post-training
    allow_resume_changes: bool = False  # resume even when steps / schedules / batch / world size differ from the
                                        # checkpoint's run (refused otherwise); recorded in the run folder


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (pathfm.distill); teacher "" = self-distillation (the student's EMA)."""

    teacher: str = ""  # a pathfm checkpoint / run folder, a pathfm export folder, a timm / DINOv2 state dict file, or a
                       # public model folder (local-dir:PATH or a folder with config.json; hf-hub:ORG/NAME, local cache)
    loss: str = "auto"  # auto (heads when the teacher has them, else features) | heads (DINO + iBOT on the teacher's
                        # head outputs) | features (cosine to the teacher's CLS and patch tokens via learned projections)
    teacher_input: str = "match_grid"  # match_grid: the teacher sees the global crops resized to the student's token
                                       # grid x its patch size (patch targets line up) | same: the same pixels (refused
                                       # when the grids then differ and patch-level targets are on)
    patch_targets: bool = True  # iBOT / patch-feature targets from the teacher (false: CLS-level only)
    ibot_patches: str = "masked"  # masked (iBOT as in training: the student sees masks, masked patches scored) | all
                                  # (DINOv2's distillation: no masking, every patch of the 2 global crops scored)
    feature_weight_cls: float = 1.0  # features loss: weight of the CLS cosine term
    feature_weight_patch: float = 1.0  # features loss: weight of the patch cosine term
    teacher_mean: list[float] = field(default_factory=list)  # the teacher's input normalisation (3 values each);
    teacher_std: list[float] = field(default_factory=list)   # [] = what its file records (hub pretrained_cfg, pathfm
                                                             # meta), else the student's crops.mean / std, with a warning


@dataclass
class GramConfig:
    """Gram anchoring (DINOv3; pathfm/gram.py): the student's patch-to-patch cosine similarities of its global crops
    are pulled towards those of a frozen "Gram teacher", so that long runs keep their dense features. weight 0 = off."""

    weight: float = 0.0  # weight of the Gram loss at full strength; 0 = off (no Gram teacher is built)
    start_step: int = 0  # the loss is 0 before this step; with anchor=ema the anchor is the EMA as it is at this step
    ramp_steps: int = 0  # the weight rises linearly from weight/ramp_steps to weight over this many steps (0: at once)
    anchor: str = "ema"  # ema: a snapshot of the EMA backbone at start_step | a pathfm checkpoint or run folder (its EMA),
                         # an export folder, or a timm / DINOv2 backbone file: a fixed anchor, loaded at start-up
    refresh_every: int = 0  # copy the EMA backbone into the Gram teacher every this many steps after start_step (0: never)
    max_refreshes: int = 0  # at most this many refreshes (DINOv3: 3)
    scale: int = 1  # 1: the Gram teacher sees the global crops | 2: the same regions read from the slide at twice the
                    # pixels (same field of view), geometric augmentation only; its token map is resized to the student's
    remove_negatives: bool = False  # negative cosines set to 0 in both Gram matrices before the MSE (DINOv3's remove_neg)


@dataclass
class DistConfig:
    fsdp: bool = True  # shard with FSDP2 when world size > 1
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False  # torch.compile per block
    reshard_after_forward: bool = True
    timeout_s: float = 600.0  # a collective waiting longer than this ends the run (a rank died or hangs): every rank
                              # is down within it, not torch's 30-minute default; the index build waits on its own


@dataclass
class ProbesConfig:
    """Downstream probes of every checkpoint, run beside training (eval/watch.py), never inside its step."""

    tasks: list[str] = field(default_factory=list)  # NAME[@knn+linear]=TRAIN,TEST with eval/'s dataset specs
                                                    # (KIND:ROOT:SPLIT, an image folder, a CSV[:SPLIT]); [] = off;
                                                    # slide-level: NAME@abmil+meanpool=LABELS.csv,INDEX_OR_MANIFEST;
                                                    # dense: NAME@seg=TRAIN_DIR,TEST_DIR (images/ + masks/)
    every: int = 1  # probe every k-th regular checkpoint (and the final one); 1 = all, also those a signal wrote
    protocol: str = "knn"  # protocols of a task without @...: knn | linear | knn+linear
    max_tiles: int = 0  # per split, a fixed random subset of this many tiles (quick curves on big sets); 0 = all
                        # (slide tasks: tiles per slide; seg tasks: images per split)
    max_slides: int = 0  # slide tasks: a fixed subset of this many labelled slides, labels in turn; 0 = all
    slide_mpp: float = 0.5  # slide tasks: µm/px of the tiles embedded (tiles of probes.img_size px)
    embedding: str = "cls"  # cls | cls_mean | lastN (eval/extract.py)
    img_size: int = 224  # eva's resize + centre crop
    threads: int = 1  # torch threads of the probe process (it runs at nice 19 on the trainer's machine)
    runner: str = "local"  # local: the trainer's main rank starts the probe process | job: a SLURM job of its own
                           # (launch/train.py sets it when it submits one) | none: only `launch/eval.py --watch`


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    gram: GramConfig = field(default_factory=GramConfig)


# ---------------------------------------------------------------------------------------------


def _all_keys(cls, prefix=""):
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _all_keys(tp, prefix + name + ".")
    return out


def _unknown_key(key):
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key, value, tp):
    """Check (and losslessly convert) `value` to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:  # probes.tasks=crc=... on a command line: one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects bool (true/false), got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(node, data: dict, prefix: str):
    """Merge a nested dict onto the dataclass instance `node`, in place, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(node))
    for k, v in data.items():
        key = prefix + str(k)
        if k not in hints:
            raise _unknown_key(key)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(node, k), v, key + ".")
        else:
            setattr(node, k, _coerce(key, v, tp))


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. optim.base_lr=1e-3)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)  # YAML 1.1 reads "1e-3" as a string
    out: dict = {}
    d = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _yaml_load(path: Path) -> dict:
    # Plain YAML 1.1 reads 1e-3 as a string; accept it as the float it obviously is.
    class Loader(yaml.SafeLoader):
        pass

    import re

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )
    with open(path) as f:
        try:
            return yaml.load(f, Loader=Loader) or {}
        except yaml.YAMLError as e:  # one line: where, and what the parser expected
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A bare name (`vitg14.yaml`, `smoke`) resolves to configs/<name> when no such file is here."""
    p = Path(path)
    if p.exists():
        return p
    configs = Path(__file__).resolve().parent.parent / "configs"
    for cand in (configs / p.name, configs / (p.name + ".yaml")):
        if cand.exists():
            return cand
    raise ConfigError(f"config file '{path}' not found (looked here and in {configs})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path is not None:
        p = resolve_config_path(path)
        try:
            _merge(cfg, _yaml_load(p), "")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    for item in overrides:
        _merge(cfg, _parse_override(item), "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types cannot express, so bad values fail before heavy work starts."""
    from_choices = {
        "model.arch": ARCH_NAMES,
        "model.ffn": ("mlp", "swiglu"),
        "model.attn_backend": ("auto", "sdpa", "xformers"),
        "model.drop_path_mode": ("mask", "subset"),
        "model.drop_path_schedule": ("uniform", "linear"),
        "optim.clip_grad_mode": ("per_module", "global"),
        "ssl.objective": ("dino", "dinov2"),
        "ssl.centering": ("centering", "sinkhorn_knopp"),
        "data.source": ("synthetic", "manifest", "random"),
        "data.reader": ("auto", "openslide", "jpeg"),
        "optim.lr_scaling": ("sqrt", "linear", "none"),
        "train.precision": ("fp32", "bf16"),
        "dist.activation_checkpointing": ("none", "full", "selective"),
        "distill.loss": ("auto", "heads", "features"),
        "distill.teacher_input": ("match_grid", "same"),
        "distill.ibot_patches": ("masked", "all"),
    }
    for key in ("distill.teacher_mean", "distill.teacher_std"):
        v = getattr(cfg.distill, key.split(".")[1])
        if v and (len(v) != 3 or (key.endswith("std") and min(v) <= 0)):
            raise ConfigError(f"config key '{key}' is {v}; expected 3 values (R, G, B){', each > 0' if key.endswith('std') else ''}, "
                              "or [] for the normalisation the teacher file records")
    for key, choices in from_choices.items():
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        if v not in choices:
            raise ConfigError(f"config key '{key}' is {v!r}; expected one of {', '.join(choices)}")
    for i, name in enumerate(cfg.model.sdpa_kernels):
        if name not in ("flash", "efficient", "cudnn", "math"):
            raise ConfigError(f"config key 'model.sdpa_kernels[{i}]' is {name!r}; expected some of flash, efficient, cudnn, math")
    if cfg.data.source == "manifest" and not (cfg.data.manifest or cfg.data.index):
        raise ConfigError("config key 'data.manifest' is empty but data.source is 'manifest'; give a CSV path "
                          "(or data.index, a built slide index)")
    if cfg.data.index and cfg.data.source != "manifest":
        raise ConfigError(f"config key 'data.index' is set but data.source is '{cfg.data.source}'; set data.source=manifest")
    if cfg.data.tiles_per_visit < 1 or cfg.data.index_workers < 0:
        raise ConfigError("config keys 'data.tiles_per_visit' must be >= 1 and 'data.index_workers' >= 0, got "
                          f"{cfg.data.tiles_per_visit} and {cfg.data.index_workers}")
    for key in ("index_timeout_s", "stall_timeout_s"):
        if not getattr(cfg.data, key) >= 0:
            raise ConfigError(f"config key 'data.{key}' must be >= 0 seconds (0: no limit), got {getattr(cfg.data, key)}")
    if not 0.0 <= cfg.data.tissue_threshold <= 1.0:
        raise ConfigError(f"config key 'data.tissue_threshold' must be in [0, 1], got {cfg.data.tissue_threshold}")
    if cfg.data.mpp_weights and len(cfg.data.mpp_weights) != len(cfg.data.mpps):
        raise ConfigError("config key 'data.mpp_weights' must have one weight per entry of data.mpps")
    for k in ("optim.batch_size", "train.steps", "model.patch_size", "crops.global_size", "crops.local_size",
              "train.log_every", "train.ckpt_every", "data.read_threads"):
        sec, name = k.split(".")
        if getattr(getattr(cfg, sec), name) <= 0:
            raise ConfigError(f"config key '{k}' must be positive, got {getattr(getattr(cfg, sec), name)}")
    for k in ("crops.n_local", "optim.warmup_steps", "ssl.teacher_temp_warmup_steps", "ssl.freeze_last_layer_steps",
              "train.stop_after", "train.rankme_every", "data.num_workers", "optim.clip_grad", "data.read_ahead_mb"):
        sec, name = k.split(".")
        if getattr(getattr(cfg, sec), name) < 0:
            raise ConfigError(f"config key '{k}' must be >= 0, got {getattr(getattr(cfg, sec), name)}")
    for lo, hi in (("crops.global_scale_min", "crops.global_scale_max"), ("crops.local_scale_min", "crops.local_scale_max"),
                   ("ssl.mask_ratio_min", "ssl.mask_ratio_max")):
        a, b = (getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in (lo, hi))
        if not 0.0 <= a <= b <= 1.0:
            raise ConfigError(f"config keys '{lo}' and '{hi}' must satisfy 0 <= min <= max <= 1, got {a} and {b}")
    if cfg.train.head_warmup_steps < -1:
        raise ConfigError(f"config key 'train.head_warmup_steps' must be >= 0, or -1 (auto), got {cfg.train.head_warmup_steps}")
    if cfg.train.backbone_ramp_steps < -1:
        raise ConfigError(f"config key 'train.backbone_ramp_steps' must be >= 0, or -1 (the head warm-up's length), got "
                          f"{cfg.train.backbone_ramp_steps}")
    if cfg.train.plateau_warn_steps < 0:
        raise ConfigError(f"config key 'train.plateau_warn_steps' must be >= 0 (0 = no warning), got {cfg.train.plateau_warn_steps}")
    if cfg.train.keep_last < 1:
        raise ConfigError(f"config key 'train.keep_last' is {cfg.train.keep_last}; keep at least 1 checkpoint "
                          "(the one just written is what a requeued job resumes from)")
    if cfg.data.manifest and cfg.data.source != "manifest":
        raise ConfigError(f"config key 'data.manifest' is set ({cfg.data.manifest}) but data.source is "
                          f"'{cfg.data.source}', which would ignore it; add data.source=manifest to train on it")
    check_patch_grid(cfg)
    if any(x not in TILE_PROTOCOLS for x in cfg.probes.protocol.split("+")):
        raise ConfigError(f"config key 'probes.protocol' is {cfg.probes.protocol!r}; expected knn, linear or knn+linear")
    probe_tasks(cfg)
    if cfg.probes.max_slides < 0 or not cfg.probes.slide_mpp > 0:
        raise ConfigError(f"config keys 'probes.max_slides' must be >= 0 and 'probes.slide_mpp' > 0, got "
                          f"{cfg.probes.max_slides} and {cfg.probes.slide_mpp}")
    if cfg.probes.every < 1 or cfg.probes.max_tiles < 0 or cfg.probes.threads < 1:
        raise ConfigError("config keys 'probes.every' and 'probes.threads' must be >= 1 and 'probes.max_tiles' >= 0, got "
                          f"{cfg.probes.every}, {cfg.probes.threads} and {cfg.probes.max_tiles}")
    if cfg.probes.runner not in ("local", "job", "none"):
        raise ConfigError(f"config key 'probes.runner' is {cfg.probes.runner!r}; expected one of local, job, none")
    check_gram(cfg.gram)


def check_gram(g: GramConfig) -> None:
    if g.scale not in (1, 2):
        raise ConfigError(f"config key 'gram.scale' is {g.scale}; expected 1 (the global crops) or 2 (twice their pixels)")
    for key in ("weight", "start_step", "ramp_steps", "refresh_every", "max_refreshes"):
        if getattr(g, key) < 0:
            raise ConfigError(f"config key 'gram.{key}' must be >= 0, got {getattr(g, key)}")
    if (g.refresh_every > 0) != (g.max_refreshes > 0):
        raise ConfigError(f"config keys 'gram.refresh_every' ({g.refresh_every}) and 'gram.max_refreshes' "
                          f"({g.max_refreshes}) must both be > 0 to refresh the Gram teacher, or both 0 for none")
    if not g.anchor:
        raise ConfigError("config key 'gram.anchor' is empty; give 'ema' (a snapshot of the EMA at gram.start_step) "
                          "or the path of a checkpoint, export folder or backbone file")



def check_patch_grid(cfg: Config) -> None:
    """Crops must tile into whole patches: a 96 px crop at patch 14 feeds only 84 px to the model."""
    p = cfg.model.patch_size
    for key in ("model.img_size", "crops.global_size", "crops.local_size"):
        sec, name = key.split(".")
        size = getattr(getattr(cfg, sec), name)
        if size % p:
            lower, upper = size // p * p, (size // p + 1) * p
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ConfigError(f"config key '{key}' is {size}, not a multiple of model.patch_size={p}: the last "
                              f"{size % p} px of every crop would never reach the model; use {nearest}")


DATASET_KINDS = ("folder", "csv", "crc", "bach", "mhist", "pcam", "breakhis")  # eval.datasets.READERS (no eval import)
TILE_PROTOCOLS = ("knn", "linear")  # eval/knn.py, eval/linear.py on tile embeddings
SLIDE_PROTOCOLS = ("abmil", "meanpool")  # eval/slide_probe.py on per-slide tile embeddings
DENSE_PROTOCOLS = ("seg",)  # eval/seg_probe.py on patch tokens
PROBE_PROTOCOLS = TILE_PROTOCOLS + SLIDE_PROTOCOLS + DENSE_PROTOCOLS
PROBE_TASK_FORM = "NAME[@knn+linear]=TRAIN,TEST, e.g. crc=crc:/data/crc:train,crc:/data/crc:val"


@dataclass(frozen=True)
class ProbeTask:
    name: str
    protocols: tuple  # ("knn",), ("knn", "linear"), ...
    train: str  # eval/ dataset specs; slide tasks: the labels CSV; seg tasks: the train folder
    test: str  # slide tasks: the slides (an index folder or a manifest); seg tasks: the test folder

    @property
    def level(self) -> str:
        """tile, slide or dense: which probes, and how train / test are read."""
        return ("slide" if self.protocols[0] in SLIDE_PROTOCOLS else "dense" if self.protocols[0] in DENSE_PROTOCOLS
                else "tile")

    def roots(self) -> list[str]:
        """The file or folder each spec reads (KIND: and :SPLIT stripped)."""
        out = []
        for spec in (self.train, self.test):
            kind, _, rest = spec.partition(":")
            rest = rest if kind in DATASET_KINDS else spec
            head, _, split = rest.rpartition(":")
            out.append(head if head and split in ("train", "val", "valid", "test", "all") else rest)
        return out


def parse_probe_task(text: str, default_protocol: str = "knn", key: str = "probes.tasks") -> ProbeTask:
    """'crc@knn+linear=crc:/data/crc:train,crc:/data/crc:val' -> ProbeTask; a malformed spec, a name that cannot be a
    folder or TensorBoard tag, an unknown protocol or dataset kind is a ConfigError naming the key."""
    import re

    def bad(why):
        where = key if key.startswith("-") else f"config key '{key}'"  # a command-line flag, or a config key
        return ConfigError(f"{where} is {text!r}: {why}; expected {PROBE_TASK_FORM}")

    head, eq, specs = text.partition("=")
    if not eq:
        raise bad("no '=' between the task name and its datasets")
    name, _, protocols = head.strip().partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise bad(f"task name {name!r} must be letters, digits, '_', '.' or '-' (it names folders and TensorBoard tags)")
    protocols = tuple((protocols or default_protocol).split("+"))
    for proto in protocols:
        if proto not in PROBE_PROTOCOLS:
            raise bad(f"unknown protocol {proto!r} (known: {', '.join(PROBE_PROTOCOLS)})")
    groups = [g for g in (TILE_PROTOCOLS, SLIDE_PROTOCOLS, DENSE_PROTOCOLS) if set(protocols) & set(g)]
    if len(groups) > 1:
        raise bad(f"protocols {'+'.join(protocols)} mix tile ({'/'.join(TILE_PROTOCOLS)}), slide "
                  f"({'/'.join(SLIDE_PROTOCOLS)}) and dense ({'/'.join(DENSE_PROTOCOLS)}) probes; give each its own task")
    parts = [x.strip() for x in specs.split(",")]
    if len(parts) != 2 or not all(parts):
        raise bad(f"{len([x for x in parts if x])} dataset(s) after '='; give a train and a test set separated by one ','")
    for spec in parts if protocols[0] in TILE_PROTOCOLS else []:  # slide and seg tasks name files, not KIND:
        kind = spec.split(":", 1)[0]
        if ":" in spec and kind not in DATASET_KINDS and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]+", kind):
            raise bad(f"unknown dataset kind {kind!r} in {spec!r} (known: {', '.join(DATASET_KINDS)})")
    return ProbeTask(name, protocols, parts[0], parts[1])


def probe_tasks(cfg: Config) -> list[ProbeTask]:
    tasks = [parse_probe_task(t, cfg.probes.protocol, f"probes.tasks[{i}]") for i, t in enumerate(cfg.probes.tasks)]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'probes.tasks' names a task twice ({names}); give each task its own name")
    return tasks


def probe_wanted(step: int, final_step: int, ckpt_every: int, every: int) -> bool:
    """Whether the checkpoint of `step` is probed: every checkpoint when every == 1 (also those a signal wrote),
    else every k-th regular one and the final one. The trainer holds exactly these from pruning."""
    return every == 1 or step == final_step or step % (every * ckpt_every) == 0


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data, "")
    validate(cfg)
    return cfg
