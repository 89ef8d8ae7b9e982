"""One benchmark point, as every rank of the job runs it, and its summary (launch/benchmark.py drives both).

    run_point(point_dir, train=pathfm.train.main, warmup=5, measure=20)   # on every rank (launch/bench_point.py)
    summarize(point_dir, warmup=5)                   # rank files + metrics.jsonl -> one result dict

The point folder holds config.yaml (written by the launcher, with the benchmark's overrides) and is
also the run folder of the trainer: training mode runs the real loop for warmup + measure steps
with train.log_every=1 and train.sync_timing=true, then reads the measured steps from metrics.jsonl.
Data-only mode iterates the config's real DataLoader with no model. Every rank writes
ranks/rank_R.json (status, peak memory, device), so a rank that ran out of memory still leaves a
result. No torch import at module level: the launcher imports `summarize` without the training stack.
The trainer is handed in (train=pathfm.train.main, by launch/bench_point.py): nothing in pathfm imports it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path

# fp32 student weights (4) + gradients (4) + AdamW moments (8) + fp32 teacher (4), per student parameter
BYTES_PER_PARAM = 20
PHASES = ("data", "forward", "backward", "optimizer")  # time/<phase>_s in metrics.jsonl


def benchmark_overrides(warmup: int, measure: int) -> list[str]:
    """Dotted overrides that turn a training config into a benchmark of warmup + measure steps."""
    steps = warmup + measure
    return [f"train.steps={steps}", "train.log_every=1", "train.sync_timing=true", "train.rankme_every=0",
            f"train.ckpt_every={steps}", "train.stop_after=0", "train.keep_last=1"]


# ---- inside the job ---------------------------------------------------------------------------


def count_params(cfg) -> int:
    """Student parameters (backbone + heads), built on the meta device: no memory, any size."""
    import dataclasses

    import torch

    from pathfm.student import build_student

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_weights=""))  # shapes only
    with torch.device("meta"):
        return sum(p.numel() for p in build_student(cfg).parameters())


def memory_estimate_gib(n_params: int, world_size: int, fsdp: bool) -> float:
    """A lower bound, to skip a point that cannot run at all: parameter + optimizer bytes per device (FSDP shards
    them over the ranks). The step's real peak (activations, iBOT logits and targets, the frozen teacher, FSDP's
    all-gathered blocks) is pathfm.memory's estimate: launch/benchmark.py --estimate, launch/train.py --estimate."""
    shards = world_size if fsdp and world_size > 1 else 1
    return BYTES_PER_PARAM * n_params / shards / 2**30


def device_memory_gib(device) -> float:
    """Memory one rank may use: the GPU's, or this node's RAM shared by the ranks on it."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / local_ranks


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()  # the CPU allocator raises a plain RuntimeError
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def collective_seconds(n_params: int, env, param_dtype, repeats: int = 3) -> dict:
    """FSDP's collectives of one step, timed alone (median of `repeats`).

    A step all-gathers the student's parameters twice (forward, and again in backward because blocks
    reshard after forward), the teacher's once, and reduce-scatters fp32 gradients once. Inside the
    step they overlap with compute, so this is what communication would cost if nothing hid it.
    """
    import torch
    import torch.distributed as dist

    shard = -(-n_params // env.world_size)  # ceil: every rank holds an equal flat shard
    mine = torch.zeros(shard, dtype=param_dtype, device=env.device)
    full = torch.empty(shard * env.world_size, dtype=param_dtype, device=env.device)
    grads = torch.zeros(shard * env.world_size, dtype=torch.float32, device=env.device)
    grad_shard = torch.empty(shard, dtype=torch.float32, device=env.device)

    def timed(fn):
        times = []
        for _ in range(repeats + 1):  # the first call sets up the communicator
            dist.barrier()
            t = time.perf_counter()
            fn()
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    gather = timed(lambda: dist.all_gather_into_tensor(full, mine))
    scatter = timed(lambda: dist.reduce_scatter_tensor(grad_shard, grads))
    return {"all_gather_s": gather, "reduce_scatter_s": scatter, "comm_isolated_s": 3 * gather + scatter}


def flops_and_peak(cfg, device) -> dict:
    """FLOPs of one step per rank and the device's peak, from pathfm.flops (torch.utils.flop_counter)."""
    try:
        from pathfm import flops
    except ImportError:  # written by another change; the summary then leaves MFU out
        return {"flops_per_step": None, "peak_flops": None, "flops_note": "pathfm.flops not available"}
    return {"flops_per_step": float(flops.step_flops(cfg)["total"]), "peak_flops": flops.peak_flops(device)}


def step_views(cfg, plan=None):
    """The views the trainer makes for cfg: its step plan (default: distill.step_plan(cfg)) says which crops carry
    iBOT masks."""
    from pathfm.data.loader import Views
    from pathfm.distill import step_plan

    return Views(cfg, plan or step_plan(cfg))


def data_only(cfg, env, warmup: int, measure: int) -> dict:
    """The config's real DataLoader, no model: seconds per batch of the measured batches on this rank.
    With data.device_augment the workers only read tiles; the views made on the device are not timed."""
    from pathfm import dist as pdist
    from pathfm.data.loader import build_loader, slide_index

    index = slide_index(cfg, rank=env.rank, world_size=env.world_size, wait=lambda: pdist.long_barrier(env))  # as train.main
    views = step_views(cfg)
    loader = iter(build_loader(cfg, index, rank=env.rank, world_size=env.world_size, start_step=0, views=views))
    times = []
    for _ in range(warmup + measure):
        t = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - t)
    times = times[warmup:]
    return {"batch_s": times, "samples_per_s": cfg.optim.batch_size * len(times) / sum(times)}


def run_point(point_dir: str | os.PathLike, *, train, warmup: int, measure: int, data: bool = False,
              memory_gib: float | None = None) -> dict:
    """Run this rank's part of one point and write ranks/rank_R.json; returns what it wrote. train: the trainer's
    main(cfg) (pathfm.train.main), run on the point folder's config unless the point is data-only or too large."""
    import torch

    from pathfm import dist as pdist
    from pathfm.config import load_config
    from pathfm.metrics import peak_memory_gib

    point_dir = Path(point_dir)
    cfg = load_config(point_dir / "config.yaml")
    env = pdist.init_distributed()
    # SLURM's node name: the CI cluster's nodes share one host name
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    rec = {"rank": env.rank, "world_size": env.world_size, "host": host, "device": str(env.device),
           "device_name": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
           "status": "ok", "error": ""}
    try:
        if data:
            rec.update(data_only(cfg, env, warmup, measure))
        else:
            n_params = count_params(cfg)
            fsdp = cfg.dist.fsdp and env.world_size > 1
            rec["params"] = n_params
            rec["estimate_gib"] = memory_estimate_gib(n_params, env.world_size, fsdp)
            rec["device_memory_gib"] = memory_gib or device_memory_gib(env.device)
            if rec["estimate_gib"] > rec["device_memory_gib"]:  # every rank decides the same: no collective needed
                rec["status"] = "too_large"
                rec["error"] = (f"parameters + optimizer need {rec['estimate_gib']:.3g} GiB per device "
                                f"({n_params / 1e6:.0f}M params x {BYTES_PER_PARAM} B / {env.world_size if fsdp else 1} "
                                f"shard(s)), the device has {rec['device_memory_gib']:.3g} GiB")
            else:
                if env.world_size > 1:
                    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
                    rec.update(collective_seconds(n_params, env, dtype))
                if env.device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(env.device)  # the step's peak, not the collective buffers'
                rec["train_status"] = train(cfg)["status"]
                rec["memory_gib"] = peak_memory_gib(env.device)
                if env.is_main:
                    rec.update(flops_and_peak(cfg, env.device))
    except (Exception, SystemExit) as e:  # recorded as this point's result; the launcher ends the job's other ranks
        rec["status"] = "oom" if is_oom(e) else "error"
        # the line that says what failed: a DataLoader worker's error ends with the original exception
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
        rec["error"] = f"{type(e).__name__}: {lines[-1]}"[:300]
        if rec["status"] == "oom":
            rec["memory_gib"] = peak_memory_gib(env.device)
    (point_dir / "ranks").mkdir(exist_ok=True)
    (point_dir / "ranks" / f"rank_{env.rank}.json").write_text(json.dumps(rec, indent=1) + "\n")
    if rec["status"] in ("ok", "too_large") and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # train.main tore its group down; data-only and too_large did not
    return rec


# ---- after the job: one point's result --------------------------------------------------------


def read_ranks(point_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(point_dir) / "ranks").glob("rank_*.json"),
                                                        key=lambda p: int(p.stem.split("_")[1]))]


def summarize(point_dir: str | os.PathLike, *, warmup: int) -> dict:
    """Rank files (+ metrics.jsonl in training mode) -> the point's result.

    Rates use medians over the measured steps (the steps after `warmup`): one slow step (a
    checkpoint flush, another job on the node) moves a median less than a mean.
    """
    point_dir = Path(point_dir)
    ranks = read_ranks(point_dir)
    if not ranks:
        return {"status": "error", "error": f"no rank wrote a result in {point_dir / 'ranks'}"}
    bad = [r for r in ranks if r["status"] != "ok"]
    world = ranks[0]["world_size"]
    out = {"status": bad[0]["status"] if bad else "ok", "error": bad[0]["error"] if bad else "",
           "world_size": world, "ranks_reported": len(ranks), "hosts": len({r["host"] for r in ranks}),
           "device_name": ranks[0]["device_name"]}
    for k in ("params", "estimate_gib", "device_memory_gib"):
        if k in ranks[0]:
            out[k] = ranks[0][k]
    if any("memory_gib" in r for r in ranks):
        out["memory_gib_per_rank"] = [r.get("memory_gib") for r in ranks]
        out["memory_gib"] = max(m for m in out["memory_gib_per_rank"] if m is not None)
    if bad or len(ranks) < world:
        if not bad:
            out.update(status="error", error=f"only {len(ranks)} of {world} ranks wrote a result")
        return out

    if "samples_per_s" in ranks[0]:  # data-only
        out["samples_per_s"] = sum(r["samples_per_s"] for r in ranks)
        out["samples_per_s_per_node"] = out["samples_per_s"] / out["hosts"]
        out["samples_per_s_per_rank"] = [r["samples_per_s"] for r in ranks]
        return out

    rows = [json.loads(line) for line in (point_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "images_per_s" in r and r["step"] > warmup]
    if not rows:
        out.update(status="error", error=f"no measured steps (step > {warmup}) in {point_dir / 'metrics.jsonl'}")
        return out
    step_s = statistics.median(sum(r[f"time/{p}_s"] for p in PHASES) for r in rows)
    out["measured_steps"] = len(rows)
    out["step_s"] = step_s
    out["time_s"] = {p: statistics.median(r[f"time/{p}_s"] for r in rows) for p in PHASES}
    out["images_per_s"] = statistics.median(r["images_per_s"] for r in rows)
    out["images_per_s_per_device"] = out["images_per_s"] / world
    if "comm_isolated_s" in ranks[0]:  # rank 0's timing; all ranks wait for the slowest anyway
        out["time_s"]["comm_isolated"] = ranks[0]["comm_isolated_s"]
    flops, peak = ranks[0].get("flops_per_step"), ranks[0].get("peak_flops")
    out["flops_per_step"] = flops
    out["tflops_per_device"] = flops / step_s / 1e12 if flops else None
    out["mfu"] = flops / step_s / peak if flops and peak else None  # None on CPU: no peak to compare with
    if ranks[0].get("flops_note"):
        out["note"] = ranks[0]["flops_note"]
    return out
