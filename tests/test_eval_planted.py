"""Slide-level (ABMIL, mean pool) and dense (segmentation) probes: hand-computed metrics and pooling, and planted
signals (bench/planted.py) that an oracle feature finds and shuffled labels do not."""

import json
import math

import numpy as np
import pytest
import torch

from bench.planted import SOURCES, mil_bags, oracle_bag_features, oracle_patches, write_seg_fixture
from eval.seg_probe import dense_counts, dense_metrics, run_seg_probe
from eval.slide_probe import GatedAttentionPool, auroc_binary, run_slide_probe, slide_metrics, stratified_folds


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only synchronise
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# hand computations


def test_gated_attention_pool_is_the_attention_weighted_sum():
    torch.manual_seed(0)
    pool = GatedAttentionPool(4, 3)
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    z, w = pool(h, mask)
    with torch.no_grad():
        for b in range(2):
            n = int(mask[b].sum())
            s = torch.stack([pool.w(torch.tanh(pool.V(h[b, i])) * torch.sigmoid(pool.U(h[b, i])))[0] for i in range(n)])
            a = s.exp() / s.exp().sum()  # softmax over the real tiles only
            torch.testing.assert_close(w[b, :n], a)
            assert (w[b, n:] == 0).all()
            torch.testing.assert_close(z[b], (a[:, None] * h[b, :n]).sum(0))
    assert not torch.allclose(z[0], h[0].mean(0), atol=1e-3)  # attention, not a plain mean


def test_auroc_against_hand_counts_with_ties():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    # positive-negative pairs (3 x 3 = 9): positive above negative counts 1, a tie 1/2
    pairs = [(p, n) for p in s[y == 1] for n in s[y == 0]]
    want = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc_binary(y, s) == pytest.approx(want)
    assert math.isnan(auroc_binary(np.zeros(3), np.arange(3.0)))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    m = slide_metrics(np.array([0, 1, 2, 1]), probs)  # macro one-vs-rest: mean of the three binary AUROCs
    per_class = [auroc_binary(np.array([0, 1, 2, 1]) == c, probs[:, c]) for c in range(3)]
    assert m["auroc"] == pytest.approx(np.mean(per_class))
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_dice_and_iou_per_class_by_hand():
    # one 2 x 4 image, 3 classes, one ignored pixel
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 2, 0, 0]]])
    m = dense_metrics(dense_counts(pred, target, 3))
    # class 0: TP 1, FP 1 (a 2 called 0; the ignored pixel counts nowhere), FN 1 -> Dice 2/4, IoU 1/3
    # class 1: TP 2, FP 1, FN 0 -> Dice 4/5, IoU 2/3;  class 2: TP 2, FP 0, FN 1 -> Dice 4/5, IoU 2/3
    assert [m[f"dice/{c}"] for c in range(3)] == pytest.approx([0.5, 0.8, 0.8])
    assert [m[f"iou/{c}"] for c in range(3)] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert m["mean_dice"] == pytest.approx(0.7) and m["pixel_accuracy"] == pytest.approx(5 / 7)
    absent = dense_metrics(dense_counts(pred, target, 4))  # class 3 neither labelled nor predicted: left out of the mean
    assert math.isnan(absent["dice/3"]) and absent["mean_dice"] == pytest.approx(0.7)


def test_stratified_folds_cover_every_slide_once_and_keep_class_shares():
    y = np.array([0] * 10 + [1] * 5)
    folds = stratified_folds(y, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(15))
    assert all(np.bincount(y[f], minlength=2).tolist() == [2, 1] for f in folds)


# ---------------------------------------------------------------------------------------------
# planted signals


def test_slide_probe_finds_a_rare_tile_type_and_not_shuffled_labels():
    kinds, y = mil_bags(30, tiles=20, seed=0)
    feats = oracle_bag_features(kinds, seed=0)
    kw = dict(folds=3, seeds=1, epochs=15, max_tiles=None, batch_size=8)
    abmil = run_slide_probe(feats, y, 2, "abmil", **kw)["metrics"]["test"]
    assert abmil["auroc"]["mean"] >= 0.95 and abmil["balanced_accuracy"]["mean"] >= 0.9
    shuffled = np.random.default_rng(0).permutation(y)
    chance = run_slide_probe(feats, shuffled, 2, "abmil", **kw)["metrics"]["test"]
    assert chance["auroc"]["mean"] <= 0.75
    assert len(run_slide_probe(feats, y, 2, "meanpool", **{**kw, "epochs": 2})["per_run"]) == 3


@pytest.fixture(scope="module")
def seg_fixture(tmp_path_factory):
    from bench.planted import source_images
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("seg")
    sources = source_images(SHARED_DATA / "tiles" / "nct_crc_he_100k_sample9")
    write_seg_fixture(out, 24, "train", size=32, patch=8, sources=sources)
    write_seg_fixture(out, 12, "test", size=32, patch=8, sources=sources)
    return out


def _masks(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))])


def test_seg_fixture_images_come_from_their_sources(seg_fixture):
    from PIL import Image

    masks = _masks(seg_fixture / "train")
    assert set(np.unique(masks)) <= set(range(len(SOURCES))) | {255} and (masks == 255).any()
    image = np.asarray(Image.open(sorted((seg_fixture / "train" / "images").glob("*.png"))[0]))
    assert image.shape == (32, 32, 3)


def test_seg_probe_oracle_reaches_dice_near_1_and_shuffled_masks_chance(seg_fixture):
    C = len(SOURCES)
    data = {}
    for split in ("train", "test"):
        masks = torch.from_numpy(_masks(seg_fixture / split).astype(np.int16))
        data[split] = {"patches": oracle_patches(masks, 8, C), "masks": masks, "grid": (4, 4)}
    good = run_seg_probe(data["train"], data["test"], C, runs=1, steps=150, lr=1e-2)["metrics"]["test"]
    # near 1, not 1: where three or four patches of other classes meet, the bilinear upsampling of even perfect
    # patch logits hands a patch's corner to its neighbours
    assert good["mean_dice"]["mean"] >= 0.9 and good["mean_iou"]["mean"] >= 0.8
    shuffled = {**data["train"], "masks": data["train"]["masks"][torch.randperm(24, generator=torch.Generator().manual_seed(0))]}
    bad = run_seg_probe(shuffled, data["test"], C, runs=1, steps=150, lr=1e-2)["metrics"]["test"]
    assert bad["mean_dice"]["mean"] <= 0.5


def test_seg_probe_command_line_on_a_timm_model(seg_fixture, tmp_path):
    from eval.seg_probe import main

    args = ["--timm", "test_vit", "--train", str(seg_fixture / "train"), "--test", str(seg_fixture / "test"),
            "--classes", "4", "--runs", "2", "--steps", "5", "--num-workers", "0", "--out", str(tmp_path / "r")]
    main(args)
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert r["headline"]["metric"] == "test/mean_dice" and r["level"] == "dense" and len(r["per_run"]) == 2
    assert (tmp_path / "embeddings" / "patches-32px" / "train.pt").is_file()  # cached like CLS embeddings
    cached = torch.load(tmp_path / "embeddings" / "patches-32px" / "train.pt", weights_only=False)
    assert cached["patches"].shape == (24, 4, 64)  # 32 px / 16 px patches = 2 x 2 tokens, no prefix tokens
    with pytest.raises(SystemExit, match=r"^error: image size 36 px is not a multiple of the model's patch size 16; "
                                         r"give --img-size 32 or 48$"):
        main([*args[:-2], "--img-size", "36", "--out", str(tmp_path / "r2")])
    with pytest.raises(SystemExit, match=r"^error: --embedding cls_mean: the segmentation probe always reads the patch"):
        main([*args[:-2], "--embedding", "cls_mean", "--out", str(tmp_path / "r3")])  # was taken and ignored


def test_slide_probe_command_line_results_and_report(tmp_path):
    """Per-slide files in eval/embed_slides.py's format -> results.json in the tile probes' layout, and
    eval/report.py puts the slide task in the same table as a tile task of the same model."""
    from eval.embed_slides import write_slide
    from eval.report import load_rows, markdown
    from eval.slide_probe import main

    kinds, y = mil_bags(12, tiles=10, seed=1)
    model = {"source": "runs/a/export", "name": "vit_tiny_patch16_224", "step": 100}
    for k, x in enumerate(oracle_bag_features(kinds)):
        write_slide(tmp_path / f"s{k:02d}.h5", x.numpy(), np.zeros((len(x), 2), np.int64), {"patch_size_level0": 64},
                    {"model": json.dumps(model), "embedding": "cls", "mpp": 0.5})
    labels = tmp_path / "rare.csv"
    labels.write_text("slide,label\n" + "".join(f"s{k:02d}.svs,{'tumour' if v else 'none'}\n" for k, v in enumerate(y)))
    main(["--features", str(tmp_path), "--labels", str(labels), "--folds", "3", "--seeds", "2", "--epochs", "2",
          "--out", str(tmp_path / "r")])
    for protocol in ("abmil", "meanpool"):
        r = json.loads((tmp_path / "r" / protocol / "results.json").read_text())
        assert r["level"] == "slide" and r["classes"] == ["none", "tumour"] and len(r["per_run"]) == 6
        assert set(r["metrics"]["test"]) >= {"balanced_accuracy", "auroc", "macro_f1"}
        assert len(r["metrics"]["test"]["auroc"]["values"]) == 6 and r["model"] == model
    tile = tmp_path / "tile" / "results.json"
    tile.parent.mkdir()
    tile.write_text(json.dumps({"protocol": "knn", "task": "crc", "model": model, "embedding": "cls",
                                "headline": {"metric": "test/k20/balanced_accuracy", "mean": 0.5, "stdev": 0.0}}))
    table = markdown(load_rows([tile, tmp_path / "r" / "abmil" / "results.json"]))
    assert table.splitlines()[0] == "| model | kind | protocol | embedding | crc | rare (slide) |"
    from eval.report import main as report

    report([str(tmp_path / "r"), str(tile), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "rare_slide_abmil.png").is_file()  # the column's mark kept out of file names
    with pytest.raises(SystemExit, match=r"results.json exists; pass --overwrite"):
        main(["--features", str(tmp_path), "--labels", str(labels), "--out", str(tmp_path / "r")])
    labels.write_text("slide,label\ns00,a\nmissing,b\n")
    with pytest.raises(SystemExit, match=r"^error: .*no embeddings for 1 labelled slide\(s\), e.g. \['missing'\]"):
        main(["--features", str(tmp_path), "--labels", str(labels), "--out", str(tmp_path / "r3")])


def test_seg_task_start_to_end_on_a_budget(seg_fixture, tmp_path):
    from eval.backbone import load_eval_backbone
    from eval.seg_probe import probe_backbone

    bb = load_eval_backbone(timm_name="test_vit", img_size=32)
    r = probe_backbone(bb, seg_fixture / "train", seg_fixture / "test", tmp_path, max_images=8, runs=1, steps=3)
    assert r["counts"] == {"train": 8, "test": 8} and r["classes"] == ["0", "1", "2", "3"]
    assert json.loads((tmp_path / "results.json").read_text())["headline"]["metric"] == "test/mean_dice"
