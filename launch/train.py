#!/usr/bin/env python
"""Launch pathfm training: on this machine (--local) or as a SLURM job (submitit).

    python launch/train.py --config configs/smoke.yaml --local              # one process
    python launch/train.py --config configs/smoke.yaml --local --nproc 2    # 2 processes (torchrun, gloo)
    python launch/train.py --nodes 8 --config vitg14.yaml data.manifest=/data/tcga.csv

No torch import at module level: --help and --dry-run stay fast and need no GPU stack.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file, or a bare name resolved in configs/")
    p.add_argument("--name", default="", help="run name (folder under train.output_dir); default: config stem")
    p.add_argument("--local", action="store_true", help="run on this machine, no SLURM")
    p.add_argument("--nproc", type=int, default=1, help="with --local: processes (torchrun, gloo on CPU)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides: optim.base_lr=1e-3 train.steps=100")
    return p.parse_known_args(argv)


def main(argv=None):
    args, rest = parse_args(argv)
    from pathfm.config import ConfigError, load_config

    overrides = list(args.overrides) + rest
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    name = args.name or cfg.train.name or Path(args.config).stem
    overrides.append(f"train.name={name}")
    if not args.local:
        raise SystemExit("SLURM submission is not available in this build; use --local")
    if args.nproc == 1:
        from pathfm.train import main as train_main

        cfg.train.name = name
        result = train_main(cfg)
        print(f"run folder: {result['run_dir']} (step {result['step']}, {result['status']})")
        return 0
    # several local processes: exactly what torchrun does on a node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "pathfm.train", "--config", str(args.config), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
