"""Release folders and public baselines: a pathfm export loads in timm by `local-dir:` with no pathfm code (and the
way eva calls timm); folders saved by timm's own save_for_hf (registers; SwiGLU with no_embed_class) and a pathfm
release probe as baselines, from a folder or an offline Hugging Face cache; the report puts them side by side."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from pathfm.export import save_export
from pathfm.vit import ViTArgs, build_vit

ROOT = Path(__file__).resolve().parents[1]

# run with no pathfm on the path: what a user of the published folder has
TIMM_ONLY = """
import sys, timm, torch
from safetensors.torch import load_file
d = sys.argv[1]
m = timm.create_model("local-dir:" + d, pretrained=True).eval()
# eva's TimmModel: create_model(model_name=..., pretrained=True, pretrained_cfg={}, out_indices=None, features_only=False)
e = timm.create_model(model_name="local-dir:" + d, pretrained=True, pretrained_cfg={}, out_indices=None,
                      features_only=False).eval()
assert set(load_file(d + "/model.safetensors")) == set(m.state_dict())  # strict: every tensor, nothing else
x = torch.load(d + "/x.pt")
with torch.no_grad():
    torch.save({"tokens": m.forward_features(x), "cls": m(x), "eva": e(x), "cfg": timm.data.resolve_data_config({}, model=m)},
               d + "/y.pt")
assert not any(k.startswith("pathfm") for k in sys.modules), "pathfm was imported"
"""


def _pathfm_model(**kw):
    torch.manual_seed(0)
    args = dict(arch="vit_small", patch_size=14, num_registers=4, layerscale=1e-5, img_size=56)
    m = build_vit(ViTArgs(**{**args, **kw})).eval()
    with torch.no_grad():  # LayerScale 1e-5 would make every CLS alike: randomise so a slip shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _fake_run(run: Path) -> None:
    """A run folder as the card reads it: config, env, two logged steps, one probe result."""
    (run / "eval" / "step_0000004" / "crc" / "knn").mkdir(parents=True)
    (run / "config.yaml").write_text("ssl: {objective: dinov2, prototypes: 512}\noptim: {batch_size: 8}\n"
                                     "train: {steps: 4}\ndata: {source: synthetic, mpps: [0.5, 1.0]}\n"
                                     "crops: {global_size: 56, n_local: 2, local_size: 28}\n")
    (run / "env.json").write_text(json.dumps({"world_size": 2, "gpus": ["NVIDIA H100"]}))
    rows = [{"step": 2, "loss/total": 1.0, "time/forward_s": 1800.0, "data/usable_slides": 7,
             "data/mpp_share/0.5": 0.75, "data/mpp_share/1": 0.25},
            {"step": 4, "loss/total": 1.0, "time/forward_s": 1800.0, "data/usable_slides": 7,
             "data/mpp_share/0.5": 0.25, "data/mpp_share/1": 0.75}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval" / "step_0000004" / "crc" / "knn" / "results.json").write_text(json.dumps(
        {"task": "crc", "protocol": "knn", "embedding": "cls", "headline": {"metric": "test/k20/balanced_accuracy",
                                                                            "mean": 0.8125, "stdev": 0.0}}))


def test_release_loads_in_timm_alone_and_as_eva_does(tmp_path):
    m = _pathfm_model()
    run = tmp_path / "run"
    _fake_run(run)
    out = run / "export"
    save_export(m, out, mean=(0.6, 0.5, 0.4), std=(0.2, 0.2, 0.3), extra={"step": 4}, run_dir=run)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch14_reg4_dinov2" and cfg["num_classes"] == 0
    assert cfg["num_features"] == 384 and cfg["model_args"]["reg_tokens"] == 4 and cfg["model_args"]["init_values"] == 1e-5
    x = torch.randn(2, 3, 56, 56)
    torch.save(x, out / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    y = torch.load(out / "y.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(y["tokens"], m.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y["cls"], m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y["eva"], y["cls"])
    assert tuple(y["cfg"]["mean"]) == (0.6, 0.5, 0.4) and tuple(y["cfg"]["input_size"]) == (3, 56, 56)

    card = (out / "README.md").read_text()
    for words in ("21.5 M", "vit_small_patch14_reg4_dinov2", "dinov2", "4 of 4 steps", "usable slides: 7",
                  "0.5 µm/px 50%", "1 µm/px 50%", "tiles seen: 64", "4 GPU-hours", "| crc | knn | cls | step_0000004 |",
                  "0.8125", "Not a medical device"):
        assert words in card, words


def test_giant_release_config_builds_the_same_timm_model():
    # the SwiGLU MLP comes with the architecture name: model_args must build exactly the pathfm layout
    from pathfm.export import timm_name
    from pathfm.release import timm_config

    with torch.device("meta"):
        m = build_vit(ViTArgs(arch="vit_giant2", patch_size=14, num_registers=4, ffn="swiglu", img_size=224))
        sd = {k: v for k, v in m.state_dict().items() if k != "mask_token"}
        cfg = timm_config(timm_name("vit_giant2", 14, 4), {"img_size": 224}, m, (0.5,) * 3, (0.5,) * 3)
        t = timm.create_model(cfg["architecture"], **cfg["model_args"])
    theirs = t.state_dict()
    assert set(sd) == set(theirs) and all(sd[k].shape == theirs[k].shape for k in sd)


def _hf_cache(cache: Path, name: str, folder: Path, monkeypatch) -> Path:
    """A local Hugging Face cache holding `folder` as the snapshot of hub model `name` (ORG/NAME), laid out as
    huggingface_hub lays it out, offline; returns the snapshot's path."""
    repo = cache / f"models--{name.replace('/', '--')}"
    snap = repo / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def _timm_folders(root: Path) -> dict:
    """Public-model folders as the hub holds them, written by timm's save_for_hf: {name: (folder, source model)}."""
    from timm.layers import SwiGLUPacked
    from timm.models import save_for_hf

    torch.manual_seed(0)
    reg = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, depth=2, dynamic_img_size=True)
    save_for_hf(reg, root / "vits-reg", safe_serialization=True, data_config={"input_size": (3, 56, 56)},
                model_config={"pretrained_cfg": {"mean": [0.7, 0.6, 0.5], "std": [0.2, 0.3, 0.2]}})
    glu = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=48, depth=2, no_embed_class=True,
                            init_values=1e-5, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=5.33334)
    # as Virchow2 publishes them: the layers by name, which timm itself cannot build from
    save_for_hf(glu, root / "swiglu", safe_serialization=True,
                model_args={"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"})
    pathfm = _pathfm_model(arch="vit_tiny", patch_size=16, num_registers=0, img_size=48)
    save_export(pathfm, root / "pathfm-release")
    return {"vits-reg": (root / "vits-reg", reg), "swiglu": (root / "swiglu", glu), "pathfm-release": (root / "pathfm-release", pathfm)}


def test_public_model_folders_probe_as_baselines(tmp_path, monkeypatch, shared_data):
    from eval import knn, linear
    from eval.backbone import load_eval_backbone
    from eval.extract import embed

    folders = _timm_folders(tmp_path / "models")
    for name, (folder, src) in folders.items():
        bb = load_eval_backbone(timm_name=f"local-dir:{folder}")
        cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
        assert bb.mean == tuple(cfg["mean"]) and bb.input_size == cfg["input_size"][-1], name
        size = bb.input_size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(bb.model.forward_features(x), src.eval().forward_features(x), msg=name)
            assert embed(bb.model, x, "cls_mean").shape == (2, 2 * src.embed_dim)  # registers left out of the mean
        if name == "swiglu":
            assert type(bb.model.blocks[0].mlp).__name__ == "GluMlp"  # timm.layers.SwiGLUPacked, from its string

    # hf-hub: read from the local cache only (a snapshot as huggingface_hub lays it out), never downloaded
    _hf_cache(tmp_path / "hf", "someorg/vits-reg", folders["vits-reg"][0], monkeypatch)

    # every eval script takes them; each model at its own input size, its own mean / std
    tiles = shared_data / "tiles" / "nct_crc_he_100k_sample9"
    common = ["--train", f"crc:{tiles}:train", "--test", str(tiles), "--num-workers", "0", "--batch-size", "9"]
    results = tmp_path / "results"
    knn.main(["--timm", "hf-hub:someorg/vits-reg", *common, "--k", "1", "--out", str(results / "hub")])
    knn.main(["--timm", f"local-dir:{folders['swiglu'][0]}", *common, "--k", "1", "--embedding", "cls_mean",
              "--out", str(results / "swiglu")])
    linear.main(["--timm", f"local-dir:{folders['pathfm-release'][0]}", *common, "--runs", "1", "--max-steps", "5",
                 "--out", str(results / "release")])
    hub = json.loads((results / "hub" / "results.json").read_text())
    assert hub["model"]["source"] == "hf-hub:someorg/vits-reg" and hub["model"]["mean"] == [0.7, 0.6, 0.5]
    assert (results / "hub" / "embeddings" / "cls-56px").is_dir()
    glu = json.loads((results / "swiglu" / "results.json").read_text())
    assert glu["embedding"] == "cls_mean" and (results / "swiglu" / "embeddings" / "cls_mean-48px").is_dir()

    # side by side: one table and one plot, protocol and embedding on each row
    from eval import report

    report.main([str(results), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| model | kind | protocol | embedding | crc |" in table
    assert "| someorg/vits-reg | public | knn | cls |" in table
    assert "| swiglu | public | knn | cls_mean |" in table and "| pathfm-release | public | linear | cls |" in table
    assert (tmp_path / "report" / "comparison.png").stat().st_size > 1000


def test_a_model_that_cannot_be_built_is_refused_in_one_line(tmp_path):
    from eval import knn

    folder = tmp_path / "m"
    save_export(_pathfm_model(arch="vit_tiny", patch_size=16, num_registers=0, img_size=32), folder)
    good = json.loads((folder / "config.json").read_text())
    for edit, words in [({"mlp_layer": "timm.layers.NoSuchMlp"}, "model_args.mlp_layer = 'timm.layers.NoSuchMlp'"),
                        ({"act_layer": "os.system"}, "model_args.act_layer = 'os.system'"),  # layers only, no functions
                        ({"wings": 2}, "model_args.wings is not an argument"),
                        ({"mlp_ratio": 2.0}, "first key at fault: blocks.0.mlp.fc1.weight"),  # weights of another layout
                        ({"architecture": "vit_enormous_patch3"}, "architecture 'vit_enormous_patch3'")]:
        cfg = json.loads(json.dumps(good))
        cfg.update({k: v for k, v in edit.items() if k == "architecture"})
        cfg["model_args"].update({k: v for k, v in edit.items() if k != "architecture"})
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(SystemExit) as e:
            knn.main(["--timm", f"local-dir:{folder}", "--train", "folder:x", "--test", "x", "--out", str(tmp_path / "o")])
        msg = str(e.value)
        assert words in msg and "\n" not in msg, msg
