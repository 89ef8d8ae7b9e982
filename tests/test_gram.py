"""Gram anchoring (pathfm/gram.py): the loss against hand-computed values, its schedule, the frozen
Gram teacher, and the token-map resize."""

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pathfm.config import ConfigError, load_config
from pathfm.dist import DistEnv
from pathfm.gram import (build_gram_teacher, copy_backbone, gram_loss, gram_patches, gram_weight, refreshes_done, resize_grid,
                         snapshot_due, snapshot_steps)
from pathfm.vit import ViTArgs, build_vit


def schedule(**kw):
    base = dict(weight=40.0, start_step=10, ramp_steps=0, anchor="ema", refresh_every=0, max_refreshes=0)
    return SimpleNamespace(**{**base, **kw})


# ---------------------------------------------------------------- the loss


def test_gram_loss_by_hand():
    # one image, two tokens in 2-D. Student: orthogonal tokens (of lengths 2 and 3: normalised away), G_s = I.
    # Teacher: both tokens along x, G_t = all ones. (G_s - G_t)^2 = [[0, 1], [1, 0]]: mean 2/4
    s = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    t = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])
    assert gram_loss(s, t).item() == pytest.approx(0.5)
    # negatives: the student's tokens opposite (cosine -1), the teacher's orthogonal (0). Kept: (-1 - 0)^2 on the two
    # off-diagonal entries, mean 2/4; removed, the -1 becomes 0 and the matrices agree
    s = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert gram_loss(s, t).item() == pytest.approx(0.5)
    assert gram_loss(s, t, remove_negatives=True).item() == 0.0


def test_gram_loss_is_the_mean_over_images_and_token_pairs_of_squared_cosine_differences():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 7, generator=g)  # widths may differ
    total = 0.0
    for i in range(3):  # written out pair by pair, with math's own cosine
        for a in range(5):
            for b in range(5):
                cs = float(s[i, a] @ s[i, b]) / math.sqrt(float(s[i, a] @ s[i, a]) * float(s[i, b] @ s[i, b]))
                ct = float(t[i, a] @ t[i, b]) / math.sqrt(float(t[i, a] @ t[i, a]) * float(t[i, b] @ t[i, b]))
                total += (cs - ct) ** 2
                clamped = (max(cs, 0.0) - max(ct, 0.0)) ** 2
                total_clamped = clamped if (i, a, b) == (0, 0, 0) else total_clamped + clamped
    assert gram_loss(s, t).item() == pytest.approx(total / 75, rel=1e-5)
    assert gram_loss(s, t, remove_negatives=True).item() == pytest.approx(total_clamped / 75, rel=1e-5)


def test_gram_loss_is_zero_for_identical_tokens_and_refuses_other_grids():
    x = torch.randn(2, 9, 8)
    assert gram_loss(x, x.clone()).item() == 0.0
    assert gram_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-12)  # cosines: the scale of a token does not count
    with pytest.raises(ValueError, match="same images and token grid"):
        gram_loss(x, x[:, :4])


# ---------------------------------------------------------------- the schedule


def test_weight_is_zero_before_the_start_then_ramps_linearly():
    g = schedule(weight=40.0, start_step=10, ramp_steps=4)
    assert [gram_weight(g, s) for s in (0, 9, 10, 11, 12, 13, 14, 1000)] == [0, 0, 10, 20, 30, 40, 40, 40]
    assert gram_weight(schedule(ramp_steps=0), 10) == 40.0
    assert gram_weight(schedule(weight=0.0), 100) == 0.0


def test_snapshots_at_the_start_and_every_refresh_up_to_the_maximum():
    g = schedule(start_step=10, refresh_every=5, max_refreshes=3)
    assert snapshot_steps(g) == [10, 15, 20, 25]
    assert [s for s in range(60) if snapshot_due(g, s)] == [10, 15, 20, 25]
    # a fixed anchor from a file: no snapshot at the start, the refreshes only
    assert snapshot_steps(schedule(anchor="runs/main/checkpoints/last", refresh_every=5, max_refreshes=2)) == [15, 20]
    assert snapshot_steps(schedule(anchor="runs/main/export")) == []
    assert not snapshot_due(schedule(weight=0.0), 10)  # Gram anchoring off: nothing to snapshot


def test_refresh_count_is_recomputed_from_the_step():
    g = schedule(start_step=10, refresh_every=5, max_refreshes=3)
    counts = {s: refreshes_done(g, s) for s in (0, 9, 10, 14, 15, 16, 19, 20, 25, 26, 1000)}
    assert counts == {0: 0, 9: 0, 10: 0, 14: 0, 15: 1, 16: 1, 19: 1, 20: 2, 25: 3, 26: 3, 1000: 3}


def test_config_section_is_checked():
    cfg = load_config("configs/smoke.yaml", ["gram.weight=2", "gram.scale=2", "gram.start_step=4"])
    assert (cfg.gram.weight, cfg.gram.scale, cfg.gram.start_step, cfg.gram.anchor) == (2.0, 2, 4, "ema")
    for bad, msg in (("gram.scale=3", "'gram.scale' is 3"), ("gram.refresh_every=5", "both be > 0"),
                     ("gram.weight=-1", "'gram.weight' must be >= 0"), ("gram.anchor=", "'gram.anchor' is empty")):
        with pytest.raises(ConfigError, match=msg):
            load_config("configs/smoke.yaml", [bad])


# ---------------------------------------------------------------- the Gram teacher


def tiny_cfg(*overrides):
    return load_config("configs/smoke.yaml", ["model.drop_path=0", "gram.weight=1", *overrides])


def test_gram_teacher_is_frozen_and_nan_until_its_snapshot_then_an_exact_copy():
    cfg = tiny_cfg()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    gram = build_gram_teacher(cfg, env)
    assert list(gram) == ["backbone"] and not gram.training
    assert all(not p.requires_grad for p in gram.parameters())
    assert all(p.isnan().all() for p in gram.parameters())  # a use before the snapshot cannot pass unnoticed
    ema = torch.nn.ModuleDict({"backbone": build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64))})
    copy_backbone(gram, ema)
    for (name, a), b in zip(gram.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), name
    assert build_gram_teacher(load_config("configs/smoke.yaml"), env) is None  # gram.weight 0: none built


def test_gradients_reach_the_student_only():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    student = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64))
    gram = build_gram_teacher(cfg, env)
    copy_backbone(gram, torch.nn.ModuleDict({"backbone": build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64))}))
    images = torch.randn(4, 3, 64, 64)
    target = gram_patches(gram, images, grid=4)  # (4, 16, D)
    assert target.shape == (4, 16, 192) and not target.requires_grad
    loss = gram_loss(student.forward_features(images)[:, 1:], target)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in gram.parameters())
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_token_map_resize_is_bicubic_on_the_grid():
    # token (r, c) of an 8 x 8 map holds (r, c): bicubic (Keys, a = -0.75 in torch) reproduces a linear function
    # away from the borders, and output pixel i of 4 samples input position 2i + 0.5
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    tokens = torch.stack([r, c], -1).reshape(1, 64, 2)
    out = resize_grid(tokens, 4).reshape(4, 4, 2)
    for i in (1, 2):
        for j in (1, 2):
            assert out[i, j].tolist() == pytest.approx([2 * i + 0.5, 2 * j + 0.5], abs=1e-5)
    assert resize_grid(tokens, 8) is tokens


# ---------------------------------------------------------------- the inputs at gram.scale 2, on the real slides

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    if not REAL.exists():
        pytest.skip(f"real slides not found in {REAL}")
    from pathfm.data.index import IndexParams, build_index
    from pathfm.data.slides import SlideEntry

    # CMU-1: JPEG tiles (the fast reader, scaled decodes); TCGA: JPEG 2000 with 2 levels (OpenSlide), mpp given here
    entries = [SlideEntry(str(REAL / "CMU-1-Small-Region.svs")), SlideEntry(str(REAL / "TCGA-CR-7395-01A-01-TS1.svs"), mpp=0.5)]
    return build_index(entries, tmp_path_factory.mktemp("index"), IndexParams(64, (1.0, 2.0), 0.4), workers=1, progress=False)


def real_dataset(index, **kw):
    from pathfm.data.sampler import SlideTileDataset

    return SlideTileDataset(index, batch_size=8, tile_size=64, mpps=[1.0, 2.0], mpp_weights=None, seed=0, rank=0,
                            world_size=1, tiles_per_visit=2, fine_from_step=2, **kw)


def test_fine_tiles_are_the_same_tissue_at_twice_the_pixels(real_index, caplog):
    ds = real_dataset(real_index)
    assert "fine_tiles" not in ds.batch(1)  # before gram.start_step nothing extra is read
    slides = set()
    for step in (2, 3):
        b = ds.batch(step)
        assert b["fine_tiles"].shape == (8, 3, 128, 128) and b["fine_tiles"].dtype == torch.uint8
        tiles, fine = b["tiles"].float(), b["fine_tiles"].float()
        slides |= {loc[0] for loc in b["locations"]}
        # averaged 2 x 2, the fine tile is the tile (within a few grey levels: other decodes and resamplings), and
        # moved by 1 or 2 fine pixels either way it is further off: same field of view, same place; another tile of
        # the batch is far off
        err = {(dx, dy): (F.avg_pool2d(fine.roll((dy, dx), (2, 3)), 2) - tiles)[..., 2:-2, 2:-2].abs().mean().item()
               for dx in range(-2, 3) for dy in range(-2, 3)}
        assert err[0, 0] < 8 and min(err, key=err.get) == (0, 0), err
        assert (F.avg_pool2d(fine, 2) - tiles.roll(1, 0)).abs().mean() > 3 * err[0, 0]
    assert slides == {0, 1}  # both readers took part
    assert "twice the pixels failed" not in caplog.text  # read, not the upsampled stand-in of a failed read


def test_gram_crops_are_the_global_crops_regions_without_colour_ops(real_index):
    from pathfm.data.loader import Views

    # with the colour ops off, the Gram crops (2G px) averaged 2 x 2 are the global crops: same box, flips, rotation
    off = ["crops.color_jitter=0", "crops.grayscale=0", "crops.blur_global=0", "crops.blur_local=0", "crops.solarize=0"]
    views = Views(load_config("configs/smoke.yaml", off), SimpleNamespace(mask_crops=True))
    crops = real_dataset(real_index, transform=views).batch(2)["tiles"]
    g, gram = crops["global_crops"], crops["gram_crops"]
    assert g.shape == (16, 3, 64, 64) and gram.shape == (16, 3, 128, 128)
    err = (F.avg_pool2d(gram, 2) - g).abs().mean(dim=(1, 2, 3))  # normalised units: 0.04 is 5 grey levels
    assert err.max() < 0.12 and (F.avg_pool2d(gram, 2) - g.roll(1, 0)).abs().mean() > 3 * err.mean(), err
    # the views of the tiles themselves are those of a run without Gram anchoring, bit for bit
    plain = real_dataset(real_index, transform=views)
    plain.fine_from_step = None
    assert all(torch.equal(plain.batch(2)["tiles"][k], crops[k]) for k in ("global_crops", "local_crops", "masks"))


# ---------------------------------------------------------------- in the step (pathfm/train.py), 1, 2 and 4 ranks

RUN = ["data.source=random", "ssl.koleo_weight=0", "model.drop_path=0", "train.log_every=1", "train.rankme_every=0",
       "data.num_workers=0", "optim.warmup_steps=0", "optim.base_lr=0.02", "gram.weight=1", "model.arch=vit_tiny_d6",
       "ssl.prototypes=64", "ssl.ibot_prototypes=64", "ssl.head_hidden=64", "ssl.head_bottleneck=32",
       "ssl.teacher_temp_warmup_steps=0"]  # the schedules at step 1 do not depend on train.steps


def checkpoint_tensors(step_dir: Path) -> dict:
    """{"ema": {...}, "gram": {...}, ...} of a checkpoint folder, read back whole (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir, step_dir.parent / f"{step_dir.name}.pt")
    return torch.load(step_dir.parent / f"{step_dir.name}.pt", weights_only=False)


# anchor = the EMA at the top of step 1, refreshed at the top of step 3, the weight ramped in over 2 steps (0.5, then 1);
# Gram crops at twice the pixels (random ones:
# data.source=random, whose image i of a step is the same on any number of ranks) with their 8 x 8 token map resized
# to the student's 4 x 4. optim.batch_size: the global batch of 8 split over the ranks
GRAM_RUN = [*RUN, "gram.start_step=1", "gram.ramp_steps=2", "gram.refresh_every=2", "gram.max_refreshes=1", "gram.scale=2",
            "train.steps=4", "train.ckpt_every=1", "train.keep_last=10"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    from ranks import train_ranks

    run_dir = tmp_path_factory.mktemp("gram") / "whole"
    return run_dir, train_ranks(run_dir, 1, [*GRAM_RUN, "optim.batch_size=8"])


def test_gram_teacher_snapshot_refresh_and_a_resume_across_the_refresh(whole_run, tmp_path):
    from ranks import train_ranks

    run_dir, whole = whole_run

    assert "loss/gram" not in whole[1] and all(whole[s]["loss/gram"] > 0 for s in (2, 3, 4))
    assert [whole[s]["gram/weight"] for s in (1, 2, 3)] == [0.0, 0.5, 1.0]
    for s, w in ((2, 0.5), (3, 1.0)):  # the total weighs it as the ramp says (KoLeo off)
        parts = whole[s]["loss/dino"] + whole[s]["loss/ibot"] + w * whole[s]["loss/gram"]
        assert whole[s]["loss/total"] == pytest.approx(parts, rel=1e-6)
    assert [whole[s]["gram/refreshes"] for s in (2, 3, 4)] == [0, 0, 1]  # logged after steps 1, 2, 3
    ckpts = {s: checkpoint_tensors(run_dir / "checkpoints" / f"step_{s:07d}") for s in range(1, 5)}
    gram = {s: ckpts[s]["gram"] for s in ckpts}
    ema = {s: {k.removeprefix("backbone."): v for k, v in ckpts[s]["ema"].items() if k.startswith("backbone.")} for s in ckpts}

    def same(a, b):
        return a.keys() == {f"backbone.{k}" for k in b} and all(torch.equal(a[f"backbone.{k}"], v) for k, v in b.items())

    assert all(t.isnan().all() for t in gram[1].values())  # nothing taken before the start step
    assert same(gram[2], ema[1]) and not same(gram[2], ema[2])  # the EMA as it was at the top of step 1
    assert all(torch.equal(gram[3][k], gram[2][k]) for k in gram[2])  # bit-identical until its refresh
    assert same(gram[4], ema[3]) and not same(gram[4], ema[1])  # refreshed at the top of step 3
    # resumed from the step-2 checkpoint (between the anchor and its refresh): the refresh count is recomputed, the
    # refresh happens on time, and every loss is the uninterrupted run's, bit for bit
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_0000002", tmp_path / "resumed" / "checkpoints" / "step_0000002")
    resumed = train_ranks(tmp_path / "resumed", 1, [*GRAM_RUN, "optim.batch_size=8"])
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert {k: resumed[s][k] for k in ("loss/total", "loss/gram", "gram/refreshes")} == \
               {k: whole[s][k] for k in ("loss/total", "loss/gram", "gram/refreshes")}, s
    again = checkpoint_tensors(tmp_path / "resumed" / "checkpoints" / "step_0000004")["gram"]
    assert all(torch.equal(again[k], gram[4][k]) for k in gram[4])


def test_gram_loss_is_the_same_on_1_2_and_4_ranks(whole_run, tmp_path):
    from ranks import train_ranks

    # FSDP2 shards the Gram teacher like the student and the anchor is copied shard by shard at the top of step 1;
    # each rank's loss is a mean over its images, the logged one the mean over ranks
    whole = whole_run[1]
    for n in (2, 4):
        got = train_ranks(tmp_path / f"ranks{n}", n, [*GRAM_RUN, f"optim.batch_size={8 // n}", "train.steps=2",
                                                       "train.ckpt_every=100"])
        for k in ("loss/gram", "loss/total"):
            assert got[2][k] == pytest.approx(whole[2][k], rel=1e-4), (n, k)


def test_step_flops_count_the_gram_teacher_at_its_input_size():
    from pathfm.flops import analytic_vit_flops, step_flops
    from pathfm.plan import make_plan

    args = ViTArgs(arch="vit_tiny", patch_size=16, img_size=64)
    for scale, grid in ((1, 4), (2, 8)):  # 64 px global crops; smoke's batch of 8: 16 crops
        cfg = load_config("configs/smoke.yaml", ["gram.weight=1", f"gram.scale={scale}"])
        counted = step_flops(cfg, make_plan(cfg))
        assert counted["gram_forward"] == pytest.approx(analytic_vit_flops(args, grid * grid + 1, 16), rel=1e-9)
        assert counted["total"] == counted["teacher_forward"] + 3 * counted["student_forward"] + counted["gram_forward"]
    off = step_flops(load_config("configs/smoke.yaml"))
    assert off["gram_forward"] == 0 and off["total"] == off["teacher_forward"] + 3 * off["student_forward"]


def test_a_fixed_anchor_from_a_checkpoint_or_an_export_and_the_checks_on_it(whole_run, tmp_path):
    from pathfm.export import save_export
    from pathfm.gram import check_resumable
    from pathfm.weights import load_ema_backbone

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), source="single")
    tiny = ["model.arch=vit_tiny_d6", "model.drop_path=0"]
    # a run folder: its last checkpoint's EMA backbone, exactly
    gram = build_gram_teacher(load_config("configs/smoke.yaml", [*tiny, "gram.weight=1", f"gram.anchor={whole_run[0]}"]), env)
    want = load_ema_backbone(whole_run[0])[0].state_dict()
    assert all(torch.equal(gram.backbone.state_dict()[k], v) for k, v in want.items() if k != "mask_token")
    # an export of another width (ViT-S/16): only the N x N similarities are compared, so it may anchor a ViT-Ti
    vit = build_vit(ViTArgs(arch="vit_small", patch_size=16, img_size=64))
    save_export(vit, tmp_path / "export", img_size=64)
    gram = build_gram_teacher(load_config("configs/smoke.yaml", ["gram.weight=1", f"gram.anchor={tmp_path / 'export'}"]), env)
    assert torch.equal(gram.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert gram_patches(gram, torch.randn(2, 3, 64, 64), 4).shape == (2, 16, 384)
    # refreshes copy the EMA in: an anchor of another architecture cannot take them; other normalisation is refused
    for extra, msg in ((["gram.refresh_every=5", "gram.max_refreshes=1"], "copies the EMA"),
                       (["crops.mean=[0.485,0.456,0.406]"], "mean")):
        with pytest.raises(ConfigError, match=msg):
            build_gram_teacher(load_config("configs/smoke.yaml", ["gram.weight=1", f"gram.anchor={tmp_path / 'export'}", *extra]), env)
    # a public model folder (timm builds it) cannot anchor: one line, not an AttributeError
    from timm.models import save_for_hf
    import timm
    hub = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, depth=1)
    save_for_hf(hub, tmp_path / "hub", safe_serialization=True)
    with pytest.raises(ConfigError, match="built by timm"):
        build_gram_teacher(load_config("configs/smoke.yaml", ["gram.weight=1", f"gram.anchor=local-dir:{tmp_path / 'hub'}"]), env)
    # a checkpoint without a Gram teacher (a run that had none) resumes only while no snapshot is due before its step
    g = schedule(start_step=5)
    check_resumable(g, 5, restored=False, where="ckpt")  # the snapshot is taken at the top of step 5: still to come
    check_resumable(g, 9, restored=True, where="ckpt")
    with pytest.raises(ConfigError, match="has no Gram teacher"):
        check_resumable(g, 6, restored=False, where="ckpt")
