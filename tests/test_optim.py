import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from pathfm.heads import DINOHead
from pathfm.optim import cosine_schedule, param_groups, scaled_lr, set_hparams, teacher_temp_schedule


def tiny_vit():
    # 2 blocks with timm's DINOv2-style names: cls_token, reg_token, pos_embed, patch_embed.proj,
    # blocks.i.{norm1, attn, ls1, norm2, mlp, ls2}, norm
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=8, patch_size=4,
                            embed_dim=8, depth=2, num_heads=2, reg_tokens=1, init_values=1e-5)
    vit.mask_token = nn.Parameter(torch.zeros(1, 8))  # the iBOT mask token pathfm's ViT adds
    return vit


class SSLModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = tiny_vit()
        self.dino_head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)
        self.ibot_head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=4)


def groups_by_name(groups):
    return {name: g for g in groups for name in g["names"]}


def test_tokens_are_decayed_as_dinov2_unless_exempted():
    # DINO / DINOv2 exempt only biases, norms and LayerScale gammas; the tokens are decayed
    model = SSLModel()
    recipe = groups_by_name(param_groups(model, weight_decay=0.04, layer_decay=1.0, patch_embed_lr_mult=1.0, num_layers=2))
    exempt = groups_by_name(param_groups(model, weight_decay=0.04, layer_decay=1.0, patch_embed_lr_mult=1.0, num_layers=2,
                                         decay_tokens=False))
    for name in ("backbone.cls_token", "backbone.reg_token", "backbone.pos_embed", "backbone.mask_token"):
        assert recipe[name]["wd_mult"] == 1 and exempt[name]["wd_mult"] == 0, name
    for name in ("backbone.blocks.0.ls1.gamma", "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"):
        assert recipe[name]["wd_mult"] == 0, name


def test_layer_decay_and_weight_decay_by_name():
    model = SSLModel()
    groups = param_groups(model, weight_decay=0.04, layer_decay=0.5, patch_embed_lr_mult=0.2, num_layers=2,
                          decay_tokens=False)
    g = groups_by_name(groups)
    # num_layers = 2: lr_mult = 0.5 ** (3 - layer_id)
    expected = {  # name: (lr_mult, wd_mult, is_last_layer)
        "backbone.cls_token": (0.125, 0, False),             # layer 0, token: no decay
        "backbone.reg_token": (0.125, 0, False),
        "backbone.pos_embed": (0.125, 0, False),
        "backbone.mask_token": (0.125, 0, False),
        "backbone.patch_embed.proj.weight": (0.025, 1, False),  # layer 0 x patch_embed_lr_mult 0.2
        "backbone.patch_embed.proj.bias": (0.025, 0, False),
        "backbone.blocks.0.attn.qkv.weight": (0.25, 1, False),  # layer 1
        "backbone.blocks.0.attn.qkv.bias": (0.25, 0, False),
        "backbone.blocks.0.norm1.weight": (0.25, 0, False),
        "backbone.blocks.0.ls1.gamma": (0.25, 0, False),        # LayerScale: no decay
        "backbone.blocks.1.mlp.fc2.weight": (0.5, 1, False),    # layer 2
        "backbone.blocks.1.ls2.gamma": (0.5, 0, False),
        "backbone.norm.weight": (1.0, 0, False),                # layer 3 = num_layers + 1
        "dino_head.mlp.0.weight": (1.0, 1, False),
        "dino_head.mlp.0.bias": (1.0, 0, False),
        "dino_head.last_layer.weight": (1.0, 1, True),
        "ibot_head.last_layer.weight": (1.0, 1, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        assert (g[name]["lr_mult"], g[name]["wd_mult"], g[name]["is_last_layer"]) == \
            pytest.approx((lr_mult, wd_mult, last)), name
        assert g[name]["weight_decay"] == pytest.approx(0.04 * wd_mult)
    # every trainable parameter exactly once; groups merged to the 11 distinct (lr, wd, last, backbone) keys (the
    # backbone's final norm and the heads' biases share (1.0, 0, False) but not a group: the backbone's lr ramps alone)
    listed = [p for grp in groups for p in grp["params"]]
    assert len(listed) == len(list(model.parameters())) == len({id(p) for p in listed})
    assert len(groups) == 11
    assert len({(x["lr_mult"], x["wd_mult"], x["is_last_layer"], x["is_backbone"]) for x in groups}) == 11
    assert all(x["is_backbone"] == all(n.startswith("backbone.") for n in x["names"]) for x in groups)
    opt = torch.optim.AdamW(groups)
    set_hparams(opt, lr=2.0, weight_decay=0.1, freeze_last_layer=False, backbone_scale=0.25)  # after a head warm-up
    assert all(x["lr"] == pytest.approx(2.0 * x["lr_mult"] * (0.25 if x["is_backbone"] else 1.0)) for x in opt.param_groups)


def test_plain_vit_names_and_frozen_params():
    vit = tiny_vit()
    vit.pos_embed.requires_grad_(False)
    g = groups_by_name(param_groups(vit, weight_decay=0.1, layer_decay=0.9, patch_embed_lr_mult=1.0,
                                    num_layers=2))
    assert "pos_embed" not in g
    assert g["blocks.1.attn.proj.weight"]["lr_mult"] == pytest.approx(0.9)
    assert g["blocks.0.attn.proj.weight"]["lr_mult"] == pytest.approx(0.81)
    assert g["cls_token"]["lr_mult"] == pytest.approx(0.729) and g["cls_token"]["wd_mult"] == 1
    assert g["norm.bias"]["lr_mult"] == 1.0


def test_wrong_num_layers_names_the_parameter():
    with pytest.raises(ValueError, match="'blocks.1.norm1.weight' is in block 1 but num_layers=1"):
        param_groups(tiny_vit(), weight_decay=0.1, layer_decay=0.9, patch_embed_lr_mult=1.0, num_layers=1)


def test_set_hparams_and_frozen_last_layer_does_not_move():
    torch.manual_seed(0)
    model = SSLModel()
    groups = param_groups(model, weight_decay=0.04, layer_decay=0.5, patch_embed_lr_mult=0.2, num_layers=2)
    opt = torch.optim.AdamW(groups, lr=0.0)

    def step(freeze):
        set_hparams(opt, lr=1e-2, weight_decay=0.5, freeze_last_layer=freeze)
        opt.zero_grad()
        cls = model.backbone(torch.randn(2, 3, 8, 8))  # (B, D)
        (model.dino_head(cls).square().sum() + model.ibot_head(cls).square().sum()).backward()
        opt.step()

    set_hparams(opt, lr=1e-2, weight_decay=0.5, freeze_last_layer=True)
    for grp in opt.param_groups:
        assert grp["lr"] == (0.0 if grp["is_last_layer"] else pytest.approx(1e-2 * grp["lr_mult"]))
        assert grp["weight_decay"] == pytest.approx(0.5 * grp["wd_mult"])

    protos = model.dino_head.last_layer.weight.detach().clone()
    qkv = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    step(freeze=True)
    assert model.dino_head.last_layer.weight.grad.abs().sum() > 0  # it had a gradient and a weight decay ...
    assert torch.equal(model.dino_head.last_layer.weight, protos)  # ... and did not move
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, qkv)
    step(freeze=False)
    assert not torch.equal(model.dino_head.last_layer.weight, protos)


def test_set_hparams_needs_our_groups():
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(KeyError, match="param group 0 has no"):
        set_hparams(opt, lr=1.0, weight_decay=0.0, freeze_last_layer=False)


def test_cosine_schedule_warmup_and_endpoints():
    # 4 warmup steps 0 -> 1, then 5 cosine steps 1 -> 0.1 at progress 0, 1/4, 1/2, 3/4, 1
    s = cosine_schedule(1.0, 0.1, total_steps=9, warmup_steps=4, warmup_start=0.0)
    c = math.cos(math.pi / 4)
    expected = [0.0, 0.25, 0.5, 0.75, 1.0, 0.1 + 0.45 * (1 + c), 0.55, 0.1 + 0.45 * (1 - c), 0.1]
    np.testing.assert_allclose(s, expected)
    # weight decay cosine 0.04 -> 0.2 and teacher momentum cosine 0.992 -> 1, no warmup
    wd = cosine_schedule(0.04, 0.2, 50)
    assert wd.shape == (50,) and wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.2)
    m = cosine_schedule(0.992, 1.0, 100)
    assert m[0] == pytest.approx(0.992) and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
    np.testing.assert_allclose(cosine_schedule(3.0, 1.0, 1), [3.0])
    with pytest.raises(ValueError, match="warmup_steps=11"):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=11)


def test_teacher_temp_schedule():
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, warmup_steps=3, total_steps=6),
                               [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 0, 2), [0.07, 0.07])


def test_scaled_lr():
    assert scaled_lr(4e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(4e-3, 256, 1024, "linear") == pytest.approx(1e-3)
    assert scaled_lr(4e-3, 256, 1024, "none") == 4e-3
    with pytest.raises(ValueError, match="'cube' is not one of"):
        scaled_lr(4e-3, 256, rule="cube")
