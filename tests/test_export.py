import json
import pytest
import timm
import torch

from pathfm.export import save_export, timm_export, timm_name
from pathfm.weights import load_backbone
from pathfm.vit import ViTArgs, build_vit

CASES = [  # (pathfm args, timm architecture): the kaiko.ai releases and the DINOv2 register models
    (dict(arch="vit_small", patch_size=16, layerscale=0.0), "vit_small_patch16_224"),
    (dict(arch="vit_small", patch_size=8, layerscale=0.0), "vit_small_patch8_224"),
    (dict(arch="vit_base", patch_size=16, layerscale=0.0), "vit_base_patch16_224"),
    (dict(arch="vit_base", patch_size=8, layerscale=0.0), "vit_base_patch8_224"),
    (dict(arch="vit_large", patch_size=14, num_registers=4), "vit_large_patch14_reg4_dinov2"),
]


def _randomise(m):
    # random weights everywhere (LayerScale, norms too), so a name or layout slip cannot hide. LayerScale and norm
    # gains near 1 (not DINOv2's 1e-5 init): every block then moves the output by O(1), and a block loaded in the
    # wrong place or a transposed weight is far outside the tolerance (checked below), not within a few 1e-4
    torch.manual_seed(1)
    if next(m.parameters()).is_meta:
        m = m.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in m.named_parameters():
            gain = name.endswith("gamma") or ("norm" in name and name.endswith("weight"))
            p.normal_(1.0 if gain else 0.0, 0.1 if gain else 0.02).add_(torch.randn(()) * 0.01)
    return m


@pytest.mark.parametrize("args, name", CASES)
def test_export_loads_strictly_into_timm_and_matches(args, name):
    with torch.device("meta"):  # skip the slow random init; _randomise fills every tensor
        m = build_vit(ViTArgs(img_size=112, **args))
    m = _randomise(m).eval()
    got_name, kwargs, sd = timm_export(m)
    assert got_name == name
    with torch.device("meta"):
        t = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    t.load_state_dict(sd, strict=True, assign=True)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert (m(x) - t(x)).abs().max() < 1e-4
        assert (m.forward_features(x) - t.forward_features(x)).abs().max() < 1e-4
    if args["arch"] == "vit_large":  # the margin below is a property of the weights' scale: shown on the small models
        return
    with torch.no_grad():
        # the margin: the first two blocks swapped, or the first block's attention projection transposed, is far
        # outside it
        first, second = {k: v for k, v in sd.items() if k.startswith("blocks.0.")}, {k: v for k, v in sd.items() if k.startswith("blocks.1.")}
        swapped = {**sd, **{k.replace("blocks.0.", "blocks.1."): v for k, v in first.items()},
                   **{k.replace("blocks.1.", "blocks.0."): v for k, v in second.items()}}
        for wrong in (swapped, {**sd, "blocks.0.attn.proj.weight": sd["blocks.0.attn.proj.weight"].T.contiguous()}):
            t.load_state_dict(wrong, strict=True, assign=True)
            assert (m(x) - t(x)).abs().max() > 1e-2


def test_giant_export_shapes_match_timm():
    with torch.device("meta"):
        m = build_vit(ViTArgs(arch="vit_giant2", patch_size=14, num_registers=4, ffn="swiglu", img_size=224))
        name = timm_name("vit_giant2", 14, 4)
        sd = {k: v for k, v in m.state_dict().items() if k != "mask_token"}
        t = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    assert name == "vit_giant_patch14_reg4_dinov2"
    theirs = t.state_dict()
    assert set(sd) == set(theirs)
    assert all(sd[k].shape == theirs[k].shape for k in sd)


def test_layerscale_choice_is_carried_in_kwargs():
    m = build_vit(ViTArgs(arch="vit_small", patch_size=16, layerscale=1e-5, img_size=64))
    name, kwargs, sd = timm_export(m)
    assert kwargs == {"img_size": 64, "dynamic_img_size": True, "init_values": 1e-5}
    timm.create_model(name, num_classes=0, **kwargs).load_state_dict(sd, strict=True)


def test_timm_file_loads_as_starting_point(tmp_path):
    t = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000).eval()
    torch.save(t.state_dict(), tmp_path / "w.pth")  # with a classifier head: ignored
    m = build_vit(ViTArgs(arch="vit_small", patch_size=16, layerscale=0.0)).eval()
    load_backbone(m, tmp_path / "w.pth")
    x = torch.randn(1, 3, 224, 224)
    t.reset_classifier(0)
    with torch.no_grad():
        assert (m(x) - t(x)).abs().max() < 1e-5


def _as_dinov2_file(timm_sd: dict) -> dict:
    """timm register layout -> DINOv2's own layout (the inverse of what load_backbone undoes)."""
    sd = dict(timm_sd)
    out = {"register_tokens": sd.pop("reg_token"), "mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    cls_pos = torch.randn_like(sd["cls_token"])  # DINOv2 adds this position to the class token
    out["cls_token"] = sd.pop("cls_token") - cls_pos
    out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for k, v in sd.items():
        out[k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")] = v
    return out


def test_dinov2_format_file_with_other_resolution_loads(tmp_path):
    args = dict(arch="vit_small", patch_size=14, num_registers=4, ffn="swiglu", img_size=112)
    src = _randomise(build_vit(ViTArgs(**args))).eval()
    sd = {k: v for k, v in src.state_dict().items() if k != "mask_token"}
    torch.save({"teacher": {"backbone." + k: v for k, v in _as_dinov2_file(sd).items()}}, tmp_path / "d.pth")
    m = build_vit(ViTArgs(**args)).eval()
    load_backbone(m, tmp_path / "d.pth")
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert (m(x) - src(x)).abs().max() < 1e-5
    # the same file into a model stored at 224 px: pos_embed resampled from 8x8 to 16x16
    big = build_vit(ViTArgs(**{**args, "img_size": 224}))
    load_backbone(big, tmp_path / "d.pth")
    assert big.pos_embed.shape == (1, 256, 384)


def test_wrong_architecture_file_is_a_clear_error(tmp_path):
    t = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    torch.save(t.state_dict(), tmp_path / "base.pth")
    m = build_vit(ViTArgs(arch="vit_small", patch_size=16, layerscale=1e-5))
    with pytest.raises(ValueError) as e:
        load_backbone(m, tmp_path / "base.pth")
    msg = str(e.value)
    assert "base.pth" in msg and "vit_small" in msg
    assert "missing keys" in msg and "ls1.gamma" in msg  # LayerScale expected, absent in the file
    assert "shape mismatches" in msg and "cls_token" in msg


def test_partial_file_is_refused(tmp_path):
    m = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64))
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("blocks.11.")}
    torch.save(sd, tmp_path / "part.pth")
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): blocks.11"):
        load_backbone(m, tmp_path / "part.pth")


def test_missing_file_and_impossible_timm_name(tmp_path):
    m = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone(m, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="registers"):
        timm_name("vit_small", 16, 4)


def test_save_export_writes_weights_and_sidecar(tmp_path):
    import json

    m = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64)).eval()
    path = save_export(m, tmp_path / "export")
    side = json.loads((tmp_path / "export" / "model.json").read_text())
    assert side["timm_name"] == "vit_tiny_patch16_224" and side["img_size"] == 64
    assert side["mean"] == [0.5, 0.5, 0.5] and side["embed_dim"] == 192
    t = timm.create_model(side["timm_name"], num_classes=0, **side["timm_kwargs"])
    t.load_state_dict(torch.load(path), strict=True)


def test_high_resolution_export_runs_in_timm_at_its_training_size_and_at_224(tmp_path):
    # a model stored at 224 px and trained on 392 px crops (vitg14_highres): the export holds the 392 px grid,
    # so timm reproduces pathfm exactly at 392 and still accepts 224
    torch.manual_seed(0)
    m = build_vit(ViTArgs(arch="vit_small", patch_size=14, num_registers=4, layerscale=1.0, img_size=224)).eval()
    save_export(m, tmp_path, img_size=392)
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["img_size"] == 392 and side["timm_kwargs"]["img_size"] == 392 and "multiple of 14" in side["input_sizes"]
    t = timm.create_model(side["timm_name"], pretrained=False, num_classes=0, **side["timm_kwargs"]).eval()
    t.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)
    with torch.no_grad():
        x = torch.randn(2, 3, 392, 392)
        torch.testing.assert_close(t(x), m(x), rtol=1e-4, atol=1e-4)
        small = torch.randn(2, 3, 224, 224)
        out = t(small)  # timm resamples the 392 px grid back to 16 x 16 (its own antialiased bicubic)
        assert out.shape == (2, 384) and torch.isfinite(out).all()
        cos = torch.nn.functional.cosine_similarity(out, m(small)).min()
        assert cos > 0.99, cos  # close to pathfm's own 224 px forward: the same model, resampled twice
