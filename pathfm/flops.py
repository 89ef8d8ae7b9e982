"""FLOPs of one training step, GPU peaks, and model FLOPs utilisation (MFU).

    flops = step_flops(cfg)["total"]                 # per rank, counted once at start-up
    mfu(flops, step_time_s, peak_flops(device))      # share of the GPU's dense bf16 peak

FLOPs here are PyTorch's convention: a multiply-add is 2 FLOPs, and only matmuls, convolutions and
attention are counted (norms, activations, softmax are a few % and memory-bound). fvcore counts a
multiply-add as 1 FLOP, so its numbers are half of these. MFU counts the FLOPs the model needs, not
what the GPU executed: activation-checkpointing recompute is not included (that would be HFU).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pathfm.distill import check_pairing, inspect_teacher, projection, step_plan, teacher_modules, teacher_size
from pathfm.heads import DINOHead
from pathfm.vit import ARCHS, VisionTransformer, ViTArgs, build_vit, kept_count

# dense (no 2:4 sparsity) bf16 tensor-core peak per GPU, FLOP/s, from the vendors' data sheets;
# the first name that occurs in torch.cuda.get_device_name() wins, so longer names come first
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL report "H100 80GB HBM3" / "H100 NVL"
    ("H200", 989e12),  # also GH200
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("MI300X", 1307e12),
]


def peak_flops_by_name(name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of the GPU `device`, FLOP/s; None on CPU or for a GPU not in PEAK_BF16."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def mfu(flops_per_step: float, step_time_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s, both per GPU; None without a known peak."""
    if peak is None:
        return None
    if step_time_s <= 0 or peak <= 0:
        raise ValueError(f"mfu needs a positive step time and peak, got step_time_s={step_time_s}, peak={peak}")
    return flops_per_step / step_time_s / peak


def _ffn_hidden(dim: int, ffn: str) -> int:
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8 if ffn == "swiglu" else 4 * dim  # as vit.Block


def analytic_vit_flops(args: ViTArgs, n_tokens: int, batch: int, training: bool = False) -> float:
    """Forward FLOPs of the backbone on `batch` images of `n_tokens` tokens each (prefix tokens included).

    Per block and token: qkv 2*3D^2, proj 2*D^2, MLP 2*2*D*H (SwiGLU: fc1 is D x 2H, fc2 H x D, so
    2*3*D*H), and attention QK^T and AV 2*2*N*D. Patch embedding: 2 * patches * 3 p^2 * D.
    training=True with drop_path_mode='subset': block i computes its branches for kept_count(batch, r_i)
    images only, r_i rising linearly from 0 to drop_path as in the model.
    """
    dim, depth, _, _ = ARCHS[args.arch]
    hidden = _ffn_hidden(dim, args.ffn)
    mlp = 2 * 3 * dim * hidden if args.ffn == "swiglu" else 2 * 2 * dim * hidden
    per_image_block = n_tokens * (2 * 4 * dim * dim + mlp) + 2 * 2 * n_tokens * n_tokens * dim
    patches = n_tokens - 1 - args.num_registers
    total = batch * 2 * patches * 3 * args.patch_size**2 * dim
    for i in range(depth):
        rate = args.drop_path * i / max(depth - 1, 1)
        images = kept_count(batch, rate) if training and args.drop_path_mode == "subset" and rate > 0 else batch
        total += images * per_image_block
    return float(total)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs that torch.utils.flop_counter sees while fn(*args, **kwargs) runs (meta tensors work)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def distill_teacher_flops(cfg, batch: int, masked: int) -> float:
    """Forward FLOPs of distill.teacher on 2 * batch global crops at the size it sees them, with its heads
    (heads targets) on their CLS tokens and the masked patches; counted on the meta device."""
    spec = inspect_teacher(cfg.distill.teacher)
    mode, size = check_pairing(cfg, spec), teacher_size(cfg, spec)
    teacher = teacher_modules(spec, size, heads=mode == "heads", load=False).eval()  # on the meta device, as it runs
    if isinstance(teacher.backbone, VisionTransformer):
        teacher.backbone.set_attn_backend("sdpa")
    with torch.device("meta"):
        flops = count_flops(teacher.backbone.forward_features, torch.empty(2 * batch, 3, size, size))
        if mode == "heads":
            flops += count_flops(teacher.dino_head, torch.empty(2 * batch, spec.embed_dim))
            if masked:
                ibot_head = teacher.ibot_head if "ibot_head" in teacher else teacher.dino_head
                flops += count_flops(ibot_head, torch.empty(masked, spec.embed_dim))
    return flops


def ibot_patch_count(cfg, plan) -> int:
    """Patches the iBOT head scores per step on one rank: every patch of the 2B global crops (ibot_patches=all), else
    the expected number of masked ones (mask_probability of the crops, a mask ratio drawn from [min, max])."""
    s, B = cfg.ssl, cfg.optim.batch_size
    patches = 2 * B * (cfg.crops.global_size // cfg.model.patch_size) ** 2
    if not plan.ibot:
        return 0
    if plan.ibot_patches == "all":
        return patches
    return round(patches * s.mask_probability * (s.mask_ratio_min + s.mask_ratio_max) / 2)


def step_flops(cfg, plan=None, scored: int | None = None) -> dict:
    """FLOPs of one training step on one rank (its optim.batch_size images), counted on the meta device, for the
    step the plan describes (pathfm.plan; default: distill.step_plan(cfg)). scored: the patches iBOT scores when
    known (a recorded step's masks), else ibot_patch_count's expectation.

    teacher_forward: the model that gives targets on the 2 global crops: the EMA (no stochastic depth: it runs
    without it) with its DINO head on the CLS tokens and its iBOT head on the scored patches, or the frozen teacher
    (distill_teacher_flops: its own width and depth, at its input size, its heads only with heads targets).
    student_forward: backbone on the 2 global + n_local local crops in training mode (so subset-mode stochastic depth
    counts only the kept images); then the DINO head on every CLS token and the iBOT head on the scored patches
    (heads targets), or the projections (feature targets: cls_proj on every CLS token, patch_proj on every global
    patch).
    student_backward: 2 x student_forward (gradients for inputs and for weights).
    gram_forward: Gram anchoring's frozen backbone on the 2 global crops at gram.scale x their size (gram_flops).
    """
    plan = plan or step_plan(cfg)
    m, s, c = cfg.model, cfg.ssl, cfg.crops
    args = ViTArgs(arch=m.arch, patch_size=m.patch_size, img_size=m.img_size, num_registers=m.num_registers,
                   ffn=m.ffn, layerscale=m.layerscale, drop_path=m.drop_path,
                   drop_path_mode=m.drop_path_mode, drop_path_schedule=m.drop_path_schedule)
    B, n_crops = cfg.optim.batch_size, 2 + c.n_local
    scored = ibot_patch_count(cfg, plan) if scored is None else scored
    with torch.device("meta"):  # no memory, no compute: ViT-g costs nothing to count
        vit = build_vit(args)
        D = vit.embed_dim
        head = DINOHead(D, s.prototypes, s.head_hidden, s.head_bottleneck, s.head_layers)
        ibot_head = DINOHead(D, s.ibot_prototypes, s.head_hidden, s.head_bottleneck, s.head_layers) \
            if plan.ibot_head == "ibot_head" else head
        vit.set_attn_backend("sdpa")  # per size group: the block-diagonal FLOPs, not a dense (T, T) mask's
        global_crops = torch.empty(2 * B, 3, c.global_size, c.global_size)
        local_crops = torch.empty(c.n_local * B, 3, c.local_size, c.local_size)
        cls = torch.empty(n_crops * B, D)
        patch_tokens = torch.empty(scored, D)

        vit.eval()
        if plan.frozen_teacher:  # distillation: a frozen teacher (with its own heads) runs instead of the EMA
            teacher = distill_teacher_flops(cfg, B, scored)
        else:
            teacher = count_flops(vit.forward_features, global_crops) + count_flops(head, cls[: 2 * B])
            teacher += count_flops(ibot_head, patch_tokens) if scored else 0
        vit.train()
        student = count_flops(vit.forward_features_list, [global_crops, local_crops])
        if plan.features:  # the projections to the teacher's width replace the heads
            d_t = inspect_teacher(cfg.distill.teacher).embed_dim
            student += count_flops(projection(D, d_t), cls)
            if plan.patch_features:
                student += count_flops(projection(D, d_t), torch.empty(2 * B * (c.global_size // m.patch_size) ** 2, D))
        else:
            student += count_flops(head, cls)
            student += count_flops(ibot_head, patch_tokens) if scored else 0
    gram = gram_flops(cfg, B) if plan.gram_scale else 0
    return {"teacher_forward": teacher, "student_forward": student, "student_backward": 2 * student,
            "gram_forward": gram, "total": teacher + 3 * student + gram}


def gram_flops(cfg, batch: int) -> float:
    """Forward FLOPs of the Gram teacher (pathfm/gram.py) on 2 * batch global crops at gram.scale x their size: the
    student's architecture (anchor=ema) or the anchor file's. Its token-map resize and the Gram matrices are not
    matmuls of the model (the losses' own are not counted anywhere here)."""
    from pathfm.gram import anchor_args

    size = cfg.gram.scale * cfg.crops.global_size
    with torch.device("meta"):
        vit = build_vit(anchor_args(cfg)).eval()
        vit.set_attn_backend("sdpa")
        return count_flops(vit.forward_features, torch.empty(2 * batch, 3, size, size))
