#!/usr/bin/env python
"""Build a slide index on SLURM: a submitit array job (one task per share of the manifest) and a
merge job that runs after it (dependency afterok). Killed or failed tasks leave their journals;
submitting again finishes only what is missing.

    python launch/index.py manifest.csv -o /data/index/tcga --tasks 32 --profile gpu-8x --cpus-per-task 16
    python launch/index.py manifest.csv -o /data/index/tcga --tasks 2 --profile cpu-ci --wait

On one machine the same build is `python -m pathfm.data.index manifest.csv -o DIR --workers N`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


class BuildTask:
    """Array task k of n: describes manifest rows i with i % n == k, with every CPU of its allocation."""

    def __init__(self, manifest: str, out: str, params, n_tasks: int, mask_dir: str | None, timeout_s: float = 120.0):
        self.manifest, self.out, self.params, self.n_tasks, self.mask_dir = manifest, out, params, n_tasks, mask_dir
        self.timeout_s = timeout_s

    def __call__(self, task: int) -> int:
        from pathfm.data.index import build_part
        from pathfm.data.slides import read_manifest

        return build_part(read_manifest(self.manifest), self.out, self.params, part=f"task-{task:05d}",
                          share=(task, self.n_tasks), mask_dir=self.mask_dir, progress=False, timeout_s=self.timeout_s)


class MergeTask:
    def __init__(self, manifest: str, out: str, params):
        self.manifest, self.out, self.params = manifest, out, params

    def __call__(self) -> str:
        from pathfm.data.index import merge_parts, summary
        from pathfm.data.slides import read_manifest

        return summary(merge_parts(read_manifest(self.manifest), self.out, self.params, manifest_path=self.manifest))


def submit(manifest: str, out: str, params, *, tasks: int, res, mask_dir=None, timeout_s: float = 120.0):
    """-> (array jobs, merge job). Each task is one SLURM task on one node (no GPUs asked for)."""
    import submitit

    from launch.slurm import LaunchError, executor_parameters

    def executor(name: str, **extra):
        ex = submitit.SlurmExecutor(folder=Path(out) / "slurm")
        params_ = executor_parameters(res, name)
        params_.pop("gpus_per_node", None)
        params_["additional_parameters"] = {**params_["additional_parameters"], **extra.pop("additional", {})}
        ex.update_parameters(**{**params_, "nodes": 1, "ntasks_per_node": 1, **extra})
        return ex

    try:
        jobs = executor("pathfm-index", array_parallelism=tasks).map_array(
            BuildTask(manifest, out, params, tasks, mask_dir, timeout_s), list(range(tasks)))
        array_id = jobs[0].job_id.split("_")[0]
        merge = executor("pathfm-index-merge", additional={"dependency": f"afterok:{array_id}"}).submit(
            MergeTask(manifest, out, params))
    except (submitit.core.utils.FailedJobError, OSError) as e:
        raise LaunchError(f"sbatch refused the index build: {str(e).strip().splitlines()[-1]}") from None
    return jobs, merge


def main(argv=None) -> int:
    from launch import slurm
    from pathfm.config import DataConfig
    from pathfm.data.index import add_build_args, manifest_identity, params_from_args, prepare_parts
    from pathfm.data.slides import SlideError, read_manifest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_args(p, DataConfig())
    p.add_argument("--tasks", type=int, default=8, help="array tasks (each gets a share of the manifest)")
    slurm.add_resource_flags(p)
    p.add_argument("--wait", action="store_true", help="wait for the merge job and print the index summary")
    a = p.parse_args(argv)
    try:
        entries = read_manifest(a.manifest)
        params = params_from_args(a)
        out = Path(a.output).resolve()
        prepare_parts(out, params, manifest_identity(entries))  # refuse a folder of another build before submitting
        res = slurm.resources(slurm.load_profile(a.profile or "cpu-ci"), cpus_per_task=a.cpus_per_task, mem=a.mem,
                              time=a.time, partition=a.partition, account=a.account, qos=a.qos, constraint=a.constraint)
        tasks = max(1, min(a.tasks, len(entries)))
        jobs, merge = submit(str(Path(a.manifest).resolve()), str(out), params, tasks=tasks, res=res, mask_dir=a.mask_dir,
                            timeout_s=a.timeout)
    except (SlideError, slurm.LaunchError) as e:
        raise SystemExit(f"error: {e}")
    print(f"submitted index build: array job {jobs[0].job_id.split('_')[0]} ({tasks} tasks), merge job "
          f"{merge.job_id} after it; logs in {out / 'slurm'}", flush=True)
    if a.wait:
        print(merge.result())
    return 0


if __name__ == "__main__":
    sys.exit(main())
