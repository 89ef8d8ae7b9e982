"""The run folder, before and around training: the checks a launch makes before it creates or touches one (also
run by launch/train.py before torchrun starts any process), creating or re-opening it (config.yaml,
config.restart_N.yaml, env.json), and status.json, what launchers and scripts read once a run has left.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from pathfm import checkpoint as ckpt
from pathfm import dist as pdist
from pathfm import probes as pprobes
from pathfm.config import Config, to_dict, to_yaml
from pathfm.distill import check_teacher, heads_mismatch
from pathfm.weights import read_heads_args, read_state_dict, resolve_weights


def check_inputs(cfg: Config) -> None:
    """Files the config names must exist: fail before a run folder is created or touched."""
    files = {"data.manifest": cfg.data.manifest if cfg.data.source == "manifest" else "",
             "model.init_weights": str(resolve_weights(cfg.model.init_weights)) if cfg.model.init_weights else ""}
    for key, path in files.items():
        if path and not Path(path).is_file():
            raise SystemExit(f"config key '{key}': file '{path}' does not exist")
    pprobes.check_paths(cfg)
    if cfg.train.init_checkpoint and not Path(cfg.train.init_checkpoint).exists():
        raise SystemExit(f"config key 'train.init_checkpoint': '{cfg.train.init_checkpoint}' does not exist")
    if cfg.model.init_weights:
        try:
            read_state_dict(resolve_weights(cfg.model.init_weights))  # mapped, so cheap: a file that is no state dict fails here
            heads = read_heads_args(cfg.model.init_weights) if cfg.model.init_heads else None
            if heads and (diff := heads_mismatch(heads, cfg.ssl)):
                raise ValueError(f"the heads beside it do not fit this config ({diff}); set those ssl keys, or "
                                 "model.init_heads=false for fresh heads")
        except ValueError as e:
            raise SystemExit(f"config key 'model.init_weights': {e}") from None
    if cfg.distill.teacher:  # readable, and a pairing that can work: refused here, before any run folder
        check_teacher(cfg)


STOPPED_EXIT = 75  # exit status of a run stopped by a signal or train.stop_after, checkpoint saved: resume it
                  # (EX_TEMPFAIL); 0 = finished, 1 = an error

# what defines a run's trajectory: changing one on resume rebuilds the schedules mid-run
TRAJECTORY_KEYS = ("train.steps", "optim.batch_size", "optim.base_lr", "optim.lr_ref_batch", "optim.lr_scaling",
                   "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.weight_decay_final",
                   "ssl.momentum_teacher", "ssl.momentum_teacher_final", "ssl.teacher_temp",
                   "ssl.teacher_temp_warmup_start", "ssl.teacher_temp_warmup_steps", "ssl.freeze_last_layer_steps",
                   "train.head_warmup_steps", "distill.teacher", "distill.loss", "gram.weight", "gram.start_step",
                   "gram.ramp_steps", "gram.anchor", "gram.refresh_every", "gram.max_refreshes", "gram.scale",
                   "data.grid_aligned")  # the data stream's positions (its default changed in issue 31)


def trajectory_changes(saved: dict, cfg: Config, saved_world: int, world: int) -> dict:
    """{setting: [old, new]} between the config a checkpoint was saved with (its meta's "config") and this launch,
    for the settings that define the trajectory, plus the world size and global batch."""
    now, out = to_dict(cfg), {}
    for key in TRAJECTORY_KEYS:
        sec, name = key.split(".")
        old = saved.get(sec, {}).get(name)
        if old is not None and old != now[sec][name]:
            out[key] = [old, now[sec][name]]
    if saved_world != world:
        batch = saved.get("optim", {}).get("batch_size", cfg.optim.batch_size)
        out["world size"] = [saved_world, world]
        out["global batch"] = [batch * saved_world, cfg.optim.batch_size * world]
    return out


def check_resume(cfg: Config, run_dir: Path, world_size: int) -> dict:
    """Read-only checks of an existing run folder before resuming it on world_size ranks: refuse a folder made by
    a different model, and a trajectory change (trajectory_changes) unless train.allow_resume_changes. Returns the
    allowed changes. The launcher calls it too, before torchrun starts any process."""
    import yaml

    old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    keys = ("arch", "patch_size", "num_registers", "ffn", "layerscale", "img_size")
    was = {k: old.get("model", {}).get(k) for k in keys} | {"prototypes": old.get("ssl", {}).get("prototypes")}
    now = {k: getattr(cfg.model, k) for k in keys} | {"prototypes": cfg.ssl.prototypes}
    if was != now:
        diff = ", ".join(f"{k}: {was[k]} -> {now[k]}" for k in was if was[k] != now[k])
        raise SystemExit(f"run folder '{run_dir}' holds a run of another model ({diff}); "
                         "pick a new train.name or train.output_dir")
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return {}
    meta = json.loads((last / "meta.json").read_text())
    changes = trajectory_changes(meta.get("config", {}), cfg, meta.get("world_size", 1), world_size)
    if changes and not cfg.train.allow_resume_changes:
        said = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
        raise SystemExit(f"error: run folder '{run_dir}' was trained (to its step {meta['step']}) with other "
                         f"settings ({said}); resuming would change its schedules or data stream mid-run. Add "
                         "train.allow_resume_changes=true to continue with the new values, or pick a new "
                         "train.name")
    return changes


def check_device(cfg: Config) -> None:
    """Settings that need a GPU, on a machine without one: one line, before anything is written."""
    if cfg.train.precision == "bf16" and not torch.cuda.is_available():
        raise SystemExit("error: config key 'train.precision': bf16 needs a CUDA GPU and this machine has none; to try "
                         "this config on the CPU add train.precision=fp32 (README: 'A GPU config on a CPU')")


def prepare_run_folder(cfg: Config, env: pdist.DistEnv) -> tuple[Path, str, dict]:
    """Create (or re-open for resume) the run folder; refuse one made by a different model, and a resume that
    changes the trajectory (trajectory_changes) unless train.allow_resume_changes.

    The first launch writes config.yaml; every later launch (a resume, maybe with other overrides) adds
    config.restart_N.yaml with its own resolved config and command line, so the folder never shows one
    launch's settings for another's steps. Returns (run folder, the restart file's name or "", the allowed
    trajectory changes).
    """
    run_dir = Path(cfg.train.output_dir) / (cfg.train.name or "run")
    restart_file, changes = "", {}
    if env.is_main:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"cannot create run folder '{run_dir}': {e.strerror}; set train.output_dir to a writable folder")
        if not os.access(run_dir, os.W_OK):
            raise SystemExit(f"run folder '{run_dir}' is not writable; set train.output_dir or train.name")
        old_cfg = run_dir / "config.yaml"
        header = f"# launched as: {' '.join(sys.argv)}\n"
        if old_cfg.exists():
            changes = check_resume(cfg, run_dir, env.world_size)
            said = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
            if changes:
                header += f"# resumed with train.allow_resume_changes: {said}\n"
            restart_file = f"config.restart_{len(list(run_dir.glob('config.restart_*.yaml'))) + 1}.yaml"
            (run_dir / restart_file).write_text(header + to_yaml(cfg))
        else:
            old_cfg.write_text(header + to_yaml(cfg))
        (run_dir / "env.json").write_text(json.dumps(environment(env), indent=2) + "\n")
    return run_dir, restart_file, changes


def environment(env: pdist.DistEnv) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    import timm

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
        "git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "host": platform.node(), "world_size": env.world_size, "launcher": env.source, "device": str(env.device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "argv": sys.argv,
    }


def write_status(run_dir: Path, **fields) -> None:
    """run_dir/status.json, for launchers and scripts: {"status": finished | interrupted | failed, "step": ...};
    a failure adds "ranks" (those that failed) and "reason" (one line). Replaced whole, never half-written."""
    tmp = run_dir / "status.json.tmp"
    try:
        tmp.write_text(json.dumps(fields) + "\n")
        tmp.replace(run_dir / "status.json")
    except OSError as e:  # e.g. the disk that made the run fail: the launcher then has torchrun's exit status only
        print(f"warning: could not write {run_dir / 'status.json'}: {e.strerror}", file=sys.stderr, flush=True)
