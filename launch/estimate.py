"""Will it fit? Peak memory per GPU and step time on paper for a config on a cluster, before a job queues.

    python launch/train.py --config vitg14.yaml --nodes 8 --profile gpu-8x --estimate          # print, submit nothing
    python launch/train.py --config distill_vits16_from_vitg14.yaml --nodes 1 --profile gpu-8x --estimate \
        --teacher-config configs/vitg14.yaml          # distill.teacher's file is elsewhere: its architecture from a config

The peak comes from pathfm.memory: pathfm.train.memory_step (the loop's step) run on fake tensors in a fake process
group of the job's world size. torch.compile is left out (eager: compiled blocks fuse element-wise ops and may hold
less). The step time is pathfm.flops.step_flops at a stated MFU of the GPU's dense bf16 peak. launch/train.py calls
check() before it submits; no torch import at module level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

MFU = 0.4  # the model FLOPs utilisation the step time on paper assumes (docs/scaling.md)


def teacher_spec_from_config(path: str, overrides: list | None = None):
    """A TeacherSpec for the teacher a config trains (its EMA backbone and heads, as its run folder would hold):
    what the estimate needs when distill.teacher's file is not on this machine."""
    from pathfm.config import load_config
    from pathfm.distill import TeacherSpec
    from pathfm.heads import HEAD_KEYS
    from pathfm.student import vit_args

    t = load_config(path, overrides or [])
    heads = {k: getattr(t.ssl, k) for k in HEAD_KEYS}
    return TeacherSpec(path, "export", Path(path), vit_args(t), heads, list(t.crops.mean), list(t.crops.std))


def estimate_config(cfg, batch: int | None = None):
    """cfg as the estimate runs it: eager (no torch.compile), at `batch` images per GPU when given."""
    return dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, compile=False),
                               optim=dataclasses.replace(cfg.optim, batch_size=batch or cfg.optim.batch_size))


def peak(cfg, world_size: int, teacher_spec=None, batch: int | None = None):
    """pathfm.memory.Usage of one step of cfg on one of world_size GPUs."""
    from functools import partial

    from pathfm import memory
    from pathfm.train import memory_step

    return memory.estimate(partial(memory_step, estimate_config(cfg, batch), teacher_spec=teacher_spec), world_size)


def teacher_for(cfg, teacher_config: str = ""):
    """The teacher spec to estimate with: None (self-distillation, or distill.teacher's file is here), or one
    from --teacher-config; one line when neither gives it."""
    if not cfg.distill.teacher or (Path(cfg.distill.teacher).exists() and not teacher_config):
        return None
    if not teacher_config:
        raise SystemExit(f"error: distill.teacher '{cfg.distill.teacher}' is not on this machine; give the config it was "
                         "trained with (--teacher-config configs/vitg14.yaml) to estimate with its architecture")
    return teacher_spec_from_config(teacher_config)


def step_time(cfg, world_size: int, gpu: str, mfu: float = MFU, teacher_spec=None) -> dict:
    """Seconds per step and GPU-hours for train.steps on paper: step_flops at `mfu` of the GPU's bf16 peak."""
    from pathfm.flops import peak_flops_by_name, step_flops
    from pathfm.plan import make_plan

    peak_flops = peak_flops_by_name(gpu or "H100")
    plan = make_plan(cfg, teacher_spec) if teacher_spec is not None else None
    flops = step_flops(cfg, plan)["total"] if plan is not None else step_flops(cfg)["total"]
    seconds = flops / (peak_flops * mfu)
    return {"flops": flops, "step_s": seconds, "gpu_hours": seconds * cfg.train.steps * world_size / 3600,
            "gpu": gpu or "H100", "mfu": mfu}


def largest_batch(cfg, world_size: int, gpu_memory_gib: float, teacher_spec=None, usage=None) -> int:
    from pathfm import memory

    known = {cfg.optim.batch_size: usage.peak} if usage is not None else {}

    def peak_at(b):
        if b not in known:
            known[b] = peak(cfg, world_size, teacher_spec, b).peak
        return known[b]

    return memory.largest_batch(peak_at, int(gpu_memory_gib * memory.GIB), cfg.optim.batch_size)


def report(cfg, world_size: int, gpu_memory_gib: float | None, gpu: str = "", mfu: float = MFU,
           teacher_config: str = "", search: bool = True) -> tuple[str, dict]:
    """The text --estimate prints, and {usage, fits, largest_batch, time}."""
    from pathfm import memory

    spec = teacher_for(cfg, teacher_config)
    usage = peak(cfg, world_size, spec)
    fits = gpu_memory_gib is None or usage.peak <= gpu_memory_gib * memory.GIB
    lines = [memory.report(usage, gpu_memory_gib, title=f"batch {cfg.optim.batch_size} per GPU")]
    largest = None
    if search and gpu_memory_gib:
        largest = largest_batch(cfg, world_size, gpu_memory_gib, spec, usage)
        lines.append(f"largest batch per GPU that fits {gpu_memory_gib:g} GiB: {largest} "
                     f"(global {largest * world_size}; by search over estimates)")
    try:
        t = step_time(cfg, world_size, gpu, mfu, spec)
    except (ValueError, OSError) as e:  # a frozen teacher's FLOPs are counted from its file
        lines.append(f"step time on paper: not counted ({str(e).splitlines()[0]})")
        return "\n".join(lines), {"usage": usage, "fits": fits, "largest_batch": largest, "time": None}
    lines.append(f"step time on paper: {t['flops'] / 1e12:.1f} TFLOP per GPU per step at {mfu:.0%} MFU of an {t['gpu']} "
                 f"= {t['step_s']:.2f} s; train.steps={cfg.train.steps} on {world_size} GPUs = "
                 f"{t['gpu_hours']:,.0f} GPU-hours ({t['step_s'] * cfg.train.steps / 3600:,.1f} h of wall time)")
    return "\n".join(lines), {"usage": usage, "fits": fits, "largest_batch": largest, "time": t}


def refusal(cfg, world_size: int, gpu_memory_gib: float, teacher_config: str = "") -> str:
    """'' when one step of cfg fits gpu_memory_gib per GPU, else the one line that refuses it."""
    from pathfm import memory

    spec = teacher_for(cfg, teacher_config)
    usage = peak(cfg, world_size, spec)
    if usage.peak <= gpu_memory_gib * memory.GIB:
        return ""
    largest = largest_batch(cfg, world_size, gpu_memory_gib, spec, usage)
    return (f"one step needs {usage.peak_gib:.1f} GiB per GPU at optim.batch_size={cfg.optim.batch_size} on "
            f"{world_size} GPU(s) (peak during {usage.phase}; python launch/train.py ... --estimate splits it), the "
            f"GPUs have {gpu_memory_gib:g} GiB; the largest batch that fits is "
            + (f"{largest} (optim.batch_size={largest})" if largest else "none: shard over more GPUs or enable "
               "dist.activation_checkpointing")
            + "; --force submits anyway")
