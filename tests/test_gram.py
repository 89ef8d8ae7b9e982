"""Gram anchoring (pathfm/gram.py): the loss against hand-computed values, its schedule, the frozen
Gram teacher, and the token-map resize."""

import math
from types import SimpleNamespace

import pytest
import torch

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
