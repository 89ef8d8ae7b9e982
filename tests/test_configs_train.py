"""Every shipped config trains: 2 steps of each file in configs/ with only its model shrunk.

The shrink is the width and depth of the architecture (pathfm.vit.ARCHS, patched in this process or in
each rank), the prototypes, the batch and the steps. Every recipe option stays as the file sets it:
objective, centering, heads, KDE / KoLeo, crop sizes and counts, drop-path schedule and mode, HSV filter,
HED jitter, activation checkpointing. A distillation config gets a shrunk ViT/14 file as its teacher. bf16 and compile are CUDA-only and switched off. The data is the
tests' synthetic slides, read through a manifest as the configs expect. vitg14's recipe also runs on
2 FSDP ranks. Each run must give finite losses and an export that timm loads strictly and that computes
what the checkpoint's teacher computes.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
# width 96, 2 blocks, 2 heads: timm's SwiGLU width for ViT-g (int(dim * 2.66667)) equals ours at this width
SMALL = {"vit_small": (96, 2, 2, "mlp"), "vit_base": (96, 2, 2, "mlp"), "vit_large": (96, 2, 2, "mlp"),
         "vit_giant2": (96, 2, 2, "swiglu")}
SHRINK = ["ssl.prototypes=64", "ssl.ibot_prototypes=64", "ssl.head_hidden=32", "ssl.head_bottleneck=16",
          "optim.batch_size=2", "train.steps=2", "train.log_every=1", "train.ckpt_every=2", "train.rankme_every=0",
          "data.num_workers=0", "train.precision=fp32", "dist.compile=false", "optim.fused=false",
          "model.sdpa_kernels=[]", "model.init_weights="]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from pathfm.data.synthetic import ensure_synthetic_slides

    paths = ensure_synthetic_slides(ROOT / ".cache" / "pathfm-tests-configs" / "synthetic", 2, 4096, seed=0)
    csv = tmp_path_factory.mktemp("data") / "manifest.csv"
    csv.write_text("path\n" + "".join(f"{p}\n" for p in paths))
    return csv


def overrides(manifest, out: Path, name: str) -> list[str]:
    cache = ROOT / ".cache" / "pathfm-tests-configs"  # its own index cache: other tests build theirs at the same time
    from pathfm.config import load_config

    data = [f"data.manifest={manifest}"] if load_config(name).data.source == "manifest" else []  # smoke, gram_cpu: synthetic
    return [*SHRINK, *data, f"data.cache_dir={cache}", f"train.output_dir={out}", f"train.name={name}"]


def check_run(run_dir: Path, world_size: int) -> None:
    import timm

    from pathfm.weights import load_ema_backbone

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in trained] == [1, 2], rows
    assert all(math.isfinite(v) for r in trained for k, v in r.items() if k.startswith("loss/")), trained
    assert not any(r.get("nonfinite_steps") for r in rows)
    side = json.loads((run_dir / "export" / "model.json").read_text())
    dim, depth, heads, _ = SMALL.get(side["pathfm_args"]["arch"], (192, 12, 3, "mlp"))
    shape = {"embed_dim": dim, "depth": depth, "num_heads": heads, **side["timm_kwargs"]}  # the export's depth wins
    model = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **shape).eval()
    model.load_state_dict(torch.load(run_dir / "export" / "model.pth", weights_only=True), strict=True)
    teacher, meta = load_ema_backbone(run_dir)
    assert meta["world_size"] == world_size
    x = torch.randn(2, 3, side["img_size"], side["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_trains_two_steps(name, manifest, tmp_path, monkeypatch):
    from pathfm import vit
    from pathfm.config import load_config
    from pathfm.train import main

    for arch, dims in SMALL.items():  # in place: modules that imported ARCHS by name see the shrink too
        monkeypatch.setitem(vit.ARCHS, arch, dims)
    cfg = load_config(name, overrides(manifest, tmp_path, name))
    if cfg.distill.teacher:  # a distillation config: a shrunk ViT/14 with registers as the teacher file
        teacher = vit.build_vit(vit.ViTArgs(arch="vit_small", patch_size=14, img_size=56, num_registers=4, ffn="swiglu"))
        torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
        cfg = load_config(name, [*overrides(manifest, tmp_path, name), f"distill.teacher={tmp_path / 'teacher.pth'}"])
    result = main(cfg)
    assert result["status"] == "finished" and result["step"] == 2
    check_run(Path(result["run_dir"]), world_size=1)


RANK_SCRIPT = """
import sys
from pathfm import vit
vit.ARCHS.update({small!r})
from pathfm.train import cli
cli(sys.argv[1:])
"""


def test_vitg14_recipe_trains_on_two_fsdp_ranks(manifest, tmp_path, monkeypatch):
    from pathfm import vit

    script = tmp_path / "shrunk_train.py"
    script.write_text(RANK_SCRIPT.format(small=SMALL))
    drop = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           "--config", "vitg14", *overrides(manifest, tmp_path, "vitg14")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    for arch, dims in SMALL.items():  # to rebuild the shrunk teacher here (in place, as above)
        monkeypatch.setitem(vit.ARCHS, arch, dims)
    check_run(tmp_path / "vitg14", world_size=2)
