"""End to end on real tiles through the scripts' command lines, eva's timm loading path, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathfm.export import save_export
from pathfm.vit import ViTArgs, build_vit

ROOT = Path(__file__).resolve().parents[1]


def _export(folder, **kw):
    torch.manual_seed(0)
    args = dict(arch="vit_tiny", patch_size=16, img_size=64, layerscale=0.0)  # no LayerScale: random CLS differ
    save_export(build_vit(ViTArgs(**{**args, **kw})), folder)
    return folder


def _run(*args, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p


def _halves(tiles, out):
    """Test images that are not the training images: the left and right halves of each CRC tile, as PNGs."""
    from PIL import Image

    for cls_dir in sorted(p for p in tiles.iterdir() if p.is_dir()):
        (tile,) = cls_dir.iterdir()
        im = Image.open(tile).convert("RGB")
        w, h = im.size
        (out / cls_dir.name).mkdir(parents=True)
        im.crop((0, 0, w // 2, h)).save(out / cls_dir.name / "left.png")
        im.crop((w // 2, 0, w, h)).save(out / cls_dir.name / "right.png")
    return out


def test_knn_and_linear_scripts_on_real_crc_tiles(shared_data, tmp_path):
    import math

    tiles = shared_data / "tiles" / "nct_crc_he_100k_sample9"
    halves = _halves(tiles, tmp_path / "halves")
    _export(tmp_path / "run" / "export")
    common = ["--img-size", "64", "--num-workers", "0", "--batch-size", "9"]
    # the run folder stands for its export; train on the 9 tiles through the CRC adapter, test on their 18 halves
    # through the image-folder reader; k = 3 votes among 3 of the 9 classes
    _run("eval/knn.py", "--ckpt", tmp_path / "run", "--train", f"crc:{tiles}:train", "--test", halves, "--k", "1", "3",
         *common)
    out = tmp_path / "run" / "eval" / "export" / "crc" / "knn"  # <run>/eval/<checkpoint>/<task>/<protocol>
    r = json.loads((out / "results.json").read_text())
    assert r["counts"] == {"train": 9, "test": 18} and r["model"]["name"] == "vit_tiny_patch16_224"
    assert (out / "results.md").read_text().startswith("### kNN, crc")
    emb = out.parent / "embeddings" / "cls-64px"  # one folder per embedding choice and size
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["train"]["dim"] == 192 and manifest["test"]["dataset"] == str(halves)
    # the accuracies, by hand from the cached embeddings: cosine, the k most similar, votes exp(cos / 0.07)
    train, test = (torch.load(emb / f"{s}.pt") for s in ("train", "test"))
    cos = torch.nn.functional.normalize(test["embeddings"], dim=1) @ torch.nn.functional.normalize(train["embeddings"], dim=1).T
    for k in (1, 3):
        right = 0
        for row, label in zip(cos.tolist(), test["labels"].tolist()):
            votes = {}
            for j in sorted(range(9), key=lambda j: -row[j])[:k]:
                votes[int(train["labels"][j])] = votes.get(int(train["labels"][j]), 0.0) + math.exp(row[j] / 0.07)
            right += max(votes, key=votes.get) == label
        assert r["metrics"]["test"][f"k{k}/accuracy"]["mean"] == pytest.approx(right / 18), k
    assert r["metrics"]["test"]["k1/accuracy"]["mean"] > 3 / 9  # a random ViT still tells most tissues by colour
    knn_accuracy = r["metrics"]["test"]["k1/balanced_accuracy"]["mean"]

    # reuse the cached embeddings without a model; eva's protocol, 2 runs, short
    lin = tmp_path / "lin"
    _run("eval/linear.py", "--embeddings", emb, "--runs", "2", "--max-steps", "20", "--out", lin)
    r = json.loads((lin / "results.json").read_text())
    acc = r["metrics"]["test"]["balanced_accuracy"]
    assert len(acc["values"]) == 2 and set(acc) == {"mean", "stdev", "values"} and r["val_is_test"]
    from eval.linear import main as linear  # in this process: the refusal comes before any work

    with pytest.raises(SystemExit, match="results.json exists; pass --overwrite"):  # nothing overwritten silently
        linear(["--embeddings", str(emb), "--out", str(lin)])

    _run("eval/report.py", tmp_path / "run" / "eval", lin, "--out", tmp_path / "report")
    assert f"| run | pathfm | knn | cls | {knn_accuracy:.3f} |" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "crc_knn.png").stat().st_size > 1000


def test_export_loads_the_way_eva_loads_it_and_embeddings_agree(tmp_path):
    timm = pytest.importorskip("timm")
    from eval.backbone import load_eval_backbone
    from eval.extract import embed

    folder = _export(tmp_path / "export", layerscale=1.0)  # LayerScale 1: every block moves the output by O(1)
    side = json.loads((folder / "model.json").read_text())
    pth = str(folder / "model.pth")
    # eva's TimmModel: pretrained_cfg={"file": checkpoint_path, "num_classes": 0} plus MODEL_EXTRA_KWARGS
    eva_model = timm.create_model(side["timm_name"], pretrained=True, pretrained_cfg={"file": pth, "num_classes": 0},
                                  num_classes=0, **side["timm_kwargs"]).eval()
    overlay = timm.create_model(side["timm_name"], pretrained=True, pretrained_cfg_overlay=dict(file=pth),
                                num_classes=0, **side["timm_kwargs"]).eval()
    ours = load_eval_backbone(ckpt=str(folder)).model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = embed(ours, x, "cls")
        assert torch.allclose(eva_model(x), want, atol=1e-5) and torch.allclose(overlay(x), want, atol=1e-5)
        # eva's concat_mean_patch_tokens is our cls_mean; lastN uses the same blocks in both
        tokens = eva_model.forward_features(x)
        eva_cls_mean = torch.cat([tokens[:, 0], tokens[:, eva_model.num_prefix_tokens:].mean(1)], -1)
        assert torch.allclose(embed(ours, x, "cls_mean"), eva_cls_mean, atol=1e-5)
        assert torch.allclose(embed(ours, x, "last2"), embed(eva_model, x, "last2"), atol=1e-5)


def test_sidecar_that_does_not_match_its_weights_is_an_error(tmp_path):
    from eval.backbone import load_eval_backbone

    folder = _export(tmp_path / "export")
    side = json.loads((folder / "model.json").read_text())
    side["pathfm_args"]["arch"] = "vit_small"
    (folder / "model.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="model.pth does not match its sidecar"):
        load_eval_backbone(ckpt=str(folder))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_backbone(ckpt=str(tmp_path / "nope"))


def test_unreadable_images_are_counted_then_an_error(tmp_path):
    from eval.backbone import load_eval_backbone
    from eval.extract import extract
    from eval.datasets import image_folder

    bb = load_eval_backbone(ckpt=str(_export(tmp_path / "export")))
    from PIL import Image

    for i in range(3):
        (tmp_path / "d" / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(tmp_path / "d" / "c" / f"{i}.png")
    (tmp_path / "d" / "c" / "3.png").write_bytes(b"broken")
    ds = image_folder(tmp_path / "d")
    r = extract(bb, ds, img_size=64, max_bad=0.5, progress=False)
    assert r["embeddings"].shape == (3, 192) and r["skipped"] == [str(tmp_path / "d" / "c" / "3.png")]
    with pytest.raises(RuntimeError, match="1 unreadable images"):
        extract(bb, ds, img_size=64, max_bad=0.0, progress=False)


def test_cached_embeddings_of_another_model_are_not_reused(shared_data, tmp_path):
    from eval.backbone import load_eval_backbone
    from eval.extract import cached_or_extract

    tiles = str(shared_data / "tiles" / "nct_crc_he_100k_sample9")
    a = load_eval_backbone(ckpt=str(_export(tmp_path / "a")))
    b = load_eval_backbone(ckpt=str(_export(tmp_path / "b")))
    kw = dict(img_size=32, progress=False, batch_size=9)
    first = cached_or_extract(a, tiles, "train", tmp_path / "emb", "cls", **kw)
    again = cached_or_extract(a, tiles, "train", tmp_path / "emb", "cls", **kw)  # reused
    assert torch.equal(first["embeddings"], again["embeddings"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        cached_or_extract(b, tiles, "train", tmp_path / "emb", "cls", **kw)
    cached_or_extract(b, tiles, "train", tmp_path / "emb", "cls", overwrite=True, **kw)


def test_unsupervised_on_slides_and_images(shared_data, tmp_path):
    from eval.backbone import load_eval_backbone
    from eval.unsupervised import alignment, all_metrics, embed_tiles, folder_tiles, slide_tiles

    bb = load_eval_backbone(ckpt=str(_export(tmp_path / "export")))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{shared_data / 'slides' / 'CMU-1-Small-Region.svs'}\n")
    for tiles in (slide_tiles(manifest, 6, mpp=1.0, tile_size=64, cache_dir=tmp_path / "cache"),
                  folder_tiles(shared_data / "tiles", 6)):
        base, view1, view2 = embed_tiles(bb, tiles, size=32, batch_size=6)
        m = all_metrics(base, view1, view2)
        assert m["n"] == 6 and m["dim"] == 192
        # against a shuffled control: two views of one tile are far closer than views of different tiles
        # (measured 0.32 vs 1.02 on slide tiles, 0.05 vs 1.20 on the CRC folder); views paired wrongly, or the
        # same tile drawn six times, would not show it
        assert m["alignment"] < 0.6 * alignment(view1, view2.roll(1, 0)), m
        assert m["rankme"] > 2.5 and 1.2 < m["participation_ratio"] <= 6.0 and m["uniformity"] < -0.5, m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 extraction path runs on CUDA only")
def test_cuda_bf16_embeddings_match_cpu_float32(shared_data, tmp_path):
    from eval.backbone import load_eval_backbone
    from eval.extract import extract
    from eval.datasets import image_folder

    ds = image_folder(shared_data / "tiles" / "nct_crc_he_100k_sample9")
    cpu = extract(load_eval_backbone(ckpt=str(_export(tmp_path / "e"))), ds, progress=False)["embeddings"]
    gpu = extract(load_eval_backbone(ckpt=str(tmp_path / "e")), ds, device="cuda", progress=False)["embeddings"]
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.99  # bf16 autocast vs float32


def test_training_checkpoint_last_pointer_is_evaluated_as_its_teacher(tmp_path):
    from pathfm import checkpoint as ckpt
    from eval.backbone import load_eval_backbone
    from eval.extract import embed

    args = ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, layerscale=0.0)
    torch.manual_seed(0)
    student = torch.nn.ModuleDict({"dino_head": torch.nn.Linear(2, 2)})  # only the teacher is read back
    teacher = torch.nn.ModuleDict({"backbone": build_vit(args), "dino_head": torch.nn.Linear(192, 8)})
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 12, student=student, ema=teacher,
                         optimizer=torch.optim.AdamW(student.parameters()), loss_state=torch.nn.ModuleDict(),
                         meta={"vit_args": vars(args), "mean": [0.5] * 3, "std": [0.5] * 3})
    bb = load_eval_backbone(ckpt=str(tmp_path / "run" / "checkpoints" / "last"))
    assert bb.step == 12 and bb.name == "vit_tiny_patch16_224" and bb.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(embed(bb.model, x), embed(teacher.backbone.eval(), x), atol=1e-6)


def test_timm_dinov2_baseline_runs_at_the_probe_size(tmp_path):
    # timm builds the DINOv2 family at 518 px; the probe's --img-size must reach it, also with a 518 px weights file
    import argparse

    import timm

    from eval.extract import add_model_args, backbone_from_args

    name = "vit_small_patch14_dinov2"
    torch.save(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), tmp_path / "w.pth")  # 37 x 37 grid
    p = argparse.ArgumentParser()
    add_model_args(p)
    for extra in ([], ["--weights", str(tmp_path / "w.pth")]):
        backbone = backbone_from_args(p.parse_args(["--timm", name, *extra]))  # --img-size defaults to 224
        with torch.no_grad():
            assert backbone.model(torch.randn(1, 3, 224, 224)).shape == (1, 384)
