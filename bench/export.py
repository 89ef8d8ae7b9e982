"""Time and peak host memory of a release export (python -m pathfm.export) of a large teacher, on the CPU.

    python bench/export.py --arch vit_large --out /tmp/bench-export       # ViT-L/14, 4 registers
    python bench/export.py --arch vit_giant2 --out /tmp/bench-export      # ViT-g/14 (SwiGLU): 4.5 GB of weights

Writes a checkpoint holding only the teacher backbone (what the export reads; zeros: the values do not change
the cost), then runs the export command in a fresh process and reads its peak resident memory
(getrusage of the child). The same for a process that only imports pathfm.export and torch gives the
baseline; the difference is what the export itself holds, compared with the size of the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_checkpoint(arch: str, folder: Path) -> float:
    """A checkpoint folder as pathfm.weights.load_ema_backbone reads it; returns the weights' size in GB."""
    import torch
    import torch.distributed.checkpoint as dcp

    from pathfm.checkpoint import quiet_dcp
    from pathfm.vit import ViTArgs, build_vit

    args = ViTArgs(arch=arch, patch_size=14, num_registers=4, ffn="swiglu" if arch == "vit_giant2" else "mlp", img_size=224)
    with torch.device("meta"):
        vit = build_vit(args)
    state = {"ema": {"backbone." + k: torch.zeros(v.shape) for k, v in vit.state_dict().items()}}
    folder.mkdir(parents=True)
    with quiet_dcp():
        dcp.save(state, checkpoint_id=str(folder))
    meta = {"step": 1, "vit_args": vars(args), "mean": [0.5] * 3, "std": [0.5] * 3, "config": {"crops": {"global_size": 224}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return sum(v.numel() * 4 for v in state["ema"].values()) / 1e9


# runs a module as `python -m` would, then reports its own peak RSS (KiB) and CPU seconds on the last line
_MEASURED = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(r.ru_maxrss, r.ru_utime + r.ru_stime)
"""


def peak_of(module: str, *args: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in GB) of `python -m module args` in a fresh process, measured inside
    it (the bench process holds no torch, so the child starts small)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _MEASURED, module, *args], cwd=ROOT, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    rss, cpu = r.stdout.split()[-2:]
    return seconds, float(cpu), int(rss) * 1024 / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_large", choices=["vit_large", "vit_giant2"])
    p.add_argument("--out", required=True, help="scratch folder (removed first)")
    p.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)  # the checkpoint, in a child process
    a = p.parse_args()
    out = Path(a.out)
    if a.make_only:
        print(make_checkpoint(a.arch, out / "checkpoints" / "step_0000001"))
        return
    shutil.rmtree(out, ignore_errors=True)
    made = subprocess.run([sys.executable, __file__, "--make-only", "--arch", a.arch, "--out", str(out)], check=True,
                          capture_output=True, text=True)
    gb = float(made.stdout.split()[-1])
    _, _, base = peak_of("pathfm.export", "--help")  # imports only
    secs, cpu, peak = peak_of("pathfm.export", str(out / "checkpoints" / "step_0000001"), "-o", str(out / "export"))
    files = {f.name: f.stat().st_size / 1e9 for f in (out / "export").iterdir()}
    print(json.dumps({"arch": a.arch, "weights_gb": round(gb, 3), "export_s": round(secs, 1), "export_cpu_s": round(cpu, 1),
                      "peak_rss_gb": round(peak, 3),
                      "import_only_peak_gb": round(base, 3), "export_own_gb": round(peak - base, 3),
                      "own_over_weights": round((peak - base) / gb, 2),
                      "files_gb": {k: round(v, 3) for k, v in sorted(files.items())}}, indent=2))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
