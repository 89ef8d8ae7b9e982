#!/usr/bin/env python
"""Scaling on paper: bytes, FLOPs and expected efficiency of one FSDP2 training step, 1 to 64 nodes.

    python launch/scaling_model.py                                   # the tables in docs/scaling.md
    python launch/scaling_model.py --net-gbs 25 --nvlink-gbs 360 --mfu 0.35 --configs configs/vitl14.yaml

A model, not a measurement (docs/scaling.md states every assumption): weak scaling with the
config's per-GPU batch; FSDP2 over all GPUs of the job (no hybrid sharding); bf16 parameters are
all-gathered, fp32 gradients reduce-scattered; a ring collective moves (W-1)/W of the full size
through every GPU at the bus bandwidth of its slowest link (NVLink inside one node, the GPU's
network share across nodes) and pays `latency_us` per ring hop. No torch import.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {  # (dim, depth, heads, ffn), as pathfm.vit.ARCHS (a test checks they agree)
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


def ffn_hidden(dim: int, ffn: str) -> int:
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8 if ffn == "swiglu" else 4 * dim  # SwiGLU keeps the MLP's FLOPs


def block_params(dim: int, ffn: str) -> int:
    """Weights + biases + norms + LayerScale of one transformer block."""
    h = ffn_hidden(dim, ffn)
    attn = 4 * dim * dim + 4 * dim  # qkv (3D x D) and proj (D x D)
    mlp = 3 * dim * h + 2 * h + dim if ffn == "swiglu" else 2 * dim * h + h + dim
    return attn + mlp + 4 * dim + 2 * dim  # two LayerNorms, two LayerScales


def backbone_params(arch: str, patch: int, img_size: int, registers: int) -> int:
    dim, depth, _, ffn = ARCHS[arch]
    pos = (img_size // patch) ** 2 + (0 if registers else 1)  # with registers the CLS token has no position (timm)
    embed = 3 * patch * patch * dim + dim + pos * dim + (registers + 2) * dim  # + CLS and mask tokens
    return embed + depth * block_params(dim, ffn) + 2 * dim  # + final norm


def head_params(in_dim: int, hidden: int, bottleneck: int, layers: int, prototypes: int) -> int:
    dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + bottleneck * prototypes


@dataclass
class Step:
    """One training step of one GPU: what it computes and what FSDP moves."""

    name: str
    params: int  # student = teacher: backbone + heads
    flops: float  # per GPU per step
    gathered_bytes: float  # full size of everything all-gathered per step (before the (W-1)/W factor)
    reduced_bytes: float  # full size of everything reduce-scattered per step
    collectives: int  # per step


def step_of(cfg) -> Step:
    m, s, c = cfg.model, cfg.ssl, cfg.crops
    dim, depth, _, ffn = ARCHS[m.arch]
    n_blk = block_params(dim, ffn)
    heads = head_params(dim, s.head_hidden, s.head_bottleneck, s.head_layers, s.prototypes)
    if s.objective == "dinov2" and s.ibot_separate_head:
        heads += head_params(dim, s.head_hidden, s.head_bottleneck, s.head_layers, s.ibot_prototypes)
    params = backbone_params(m.arch, m.patch_size, m.img_size, m.num_registers) + heads
    prefix = 1 + m.num_registers
    t_global = (c.global_size // m.patch_size) ** 2 + prefix  # tokens per global crop
    t_local = (c.local_size // m.patch_size) ** 2 + prefix

    def forward_flops(tokens: int) -> float:  # one crop through the backbone: 2 FLOPs per MAC
        return depth * (2 * tokens * (n_blk - 8 * dim) + 4 * tokens * tokens * dim)  # matmuls + QK^T and AV

    head_tok = 2 * head_params(dim, s.head_hidden, s.head_bottleneck, s.head_layers, s.prototypes)  # FLOPs per token
    masked = 0.0
    if s.objective == "dinov2":  # expected masked patches per global crop go through the iBOT head
        masked = s.mask_probability * (s.mask_ratio_min + s.mask_ratio_max) / 2 * (t_global - prefix)
    n_crops = 2 + c.n_local
    student_fwd = 2 * forward_flops(t_global) + c.n_local * forward_flops(t_local) + head_tok * (n_crops + 2 * masked)
    teacher_fwd = 2 * forward_flops(t_global) + head_tok * (2 + 2 * masked)
    passes = 3 + (cfg.dist.activation_checkpointing == "full")  # backward = 2 forwards; full AC recomputes one
    flops = cfg.optim.batch_size * (passes * student_fwd + teacher_fwd)

    # FSDP2, reshard_after_forward: the student gathers its bf16 weights for forward and again for
    # backward and reduce-scatters fp32 gradients; the teacher (also sharded) gathers for forward.
    gathered = 2 * params * (2 + 1)
    reduced = 4 * params
    units = depth + 1  # one FSDP unit per block + the root (embeddings, norm, heads)
    return Step(f"{m.arch}/{m.patch_size}", params, flops, gathered, reduced, units * 4)


def step_time(st: Step, gpus: int, gpus_per_node: int, a) -> dict:
    compute = st.flops / (a.tflops * 1e12 * a.mfu)
    bw = (a.nvlink_gbs if gpus <= gpus_per_node else a.net_gbs) * 1e9
    frac = (gpus - 1) / gpus
    comm = (st.gathered_bytes + st.reduced_bytes) * frac / bw + st.collectives * (gpus - 1) * a.latency_us * 1e-6
    # FSDP prefetches the next unit's all-gather while this one computes: at best only the larger of
    # the two is paid; with no overlap at all, both.
    return {"compute": compute, "comm": comm, "overlap": max(compute, comm), "serial": compute + comm}


def table(st: Step, a) -> str:
    base = step_time(st, a.gpus_per_node, a.gpus_per_node, a)
    rows = [f"### {st.name}: {st.params / 1e9:.2f} B parameters (student backbone + heads), "
            f"{st.flops / 1e12:.0f} TFLOP per GPU per step",
            "",
            f"all-gathered per step: {st.gathered_bytes / 1e9:.1f} GB, reduce-scattered: {st.reduced_bytes / 1e9:.1f} GB "
            f"(full sizes; each GPU moves (W-1)/W of them), {st.collectives} collectives",
            "",
            "| nodes | GPUs | compute s | comm s | step s (overlap) | efficiency (overlap) | step s (no overlap) | efficiency (no overlap) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nodes in a.nodes:
        t = step_time(st, nodes * a.gpus_per_node, a.gpus_per_node, a)
        rows.append(f"| {nodes} | {nodes * a.gpus_per_node} | {t['compute']:.3f} | {t['comm']:.3f} | {t['overlap']:.3f} | "
                    f"{base['overlap'] / t['overlap']:.0%} | {t['serial']:.3f} | {base['serial'] / t['serial']:.0%} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/vitl14.yaml", "configs/vitg14.yaml"])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=989, help="peak dense bf16 TFLOP/s per GPU (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="share of peak the step's compute reaches")
    p.add_argument("--nvlink-gbs", type=float, default=360, help="all-gather bus bandwidth inside a node, GB/s")
    p.add_argument("--net-gbs", type=float, default=45, help="network bandwidth per GPU, GB/s (400 Gb/s NIC per GPU)")
    p.add_argument("--latency-us", type=float, default=2.0, help="latency per ring hop, microseconds")
    a = p.parse_args(argv)
    from pathfm.config import load_config

    print(f"model: {a.tflops:g} TFLOP/s x MFU {a.mfu:g}; NVLink {a.nvlink_gbs:g} GB/s, network {a.net_gbs:g} GB/s per GPU, "
          f"{a.latency_us:g} us per ring hop; {a.gpus_per_node} GPUs per node; efficiency = step time on 1 node / on N nodes\n")
    for path in a.configs:
        print(table(step_of(load_config(path)), a) + "\n")


if __name__ == "__main__":
    main()
