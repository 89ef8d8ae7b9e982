import pytest
import torch

from pathfm.vit import ARCHS, ViTArgs, build_vit, resolve_attn_backend, xformers_works


def tiny(**kw):
    torch.manual_seed(0)
    # LayerScale 1 (not DINOv2's 1e-5): with 1e-5 every residual branch is nearly invisible and an
    # equivalence test would pass even with a broken attention or MLP
    args = dict(arch="vit_tiny", patch_size=16, img_size=64, drop_path=0.0, layerscale=1.0)
    args.update(kw)
    return build_vit(ViTArgs(**args)).eval()


def test_shapes_and_prefix_tokens():
    m = tiny(num_registers=4)
    x = torch.randn(2, 3, 64, 64)
    tok = m.forward_features(x)
    assert tok.shape == (2, 1 + 4 + 16, 192)  # cls + 4 registers + 4x4 patches
    assert m(x).shape == (2, 192)
    assert torch.equal(m(x), tok[:, 0])


@pytest.mark.parametrize("arch", ["vit_small", "vit_base", "vit_large", "vit_giant2"])
def test_architectures_have_published_sizes(arch):
    dim, depth, heads, ffn = ARCHS[arch]
    with torch.device("meta"):
        m = build_vit(ViTArgs(arch=arch, patch_size=14, num_registers=4, ffn=ffn))
    n = sum(p.numel() for p in m.parameters()) / 1e6
    # DINOv2 paper: ViT-S 21M, ViT-B 86M, ViT-L 300M, ViT-g 1.1B
    expected = {"vit_small": 22, "vit_base": 86, "vit_large": 304, "vit_giant2": 1136}[arch]
    assert abs(n - expected) / expected < 0.04, n
    if arch == "vit_giant2":
        assert (dim, depth, heads) == (1536, 40, 24)
        assert m.blocks[0].mlp.fc1.weight.shape == (2 * 4096, 1536)  # SwiGLU, packed [x, gate]


def test_math_and_sdpa_backends_agree():
    m = tiny(num_registers=2)
    x = torch.randn(3, 3, 64, 64)
    m.set_attn_backend("math")
    ref = m.forward_features(x)
    m.set_attn_backend("sdpa")
    assert torch.allclose(m.forward_features(x), ref, atol=1e-5)


@pytest.mark.skipif(not xformers_works("cuda") if torch.cuda.is_available() else True,
                    reason="xformers needs CUDA and a working xformers install; none here")
def test_xformers_and_sdpa_agree_on_cuda():
    m = tiny().cuda()
    xs = [torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(8, 3, 32, 32, device="cuda")]
    m.set_attn_backend("sdpa")
    ref = m.forward_features_list(xs)
    m.set_attn_backend("xformers")
    out = m.forward_features_list(xs)  # packed, block-diagonal
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=2e-4)


def test_backend_resolution_is_runtime_and_explicit():
    assert resolve_attn_backend("sdpa", "cpu") == "sdpa"
    assert resolve_attn_backend("auto", "cpu") in ("sdpa", "xformers")
    if not xformers_works("cpu"):
        assert resolve_attn_backend("auto", "cpu") == "sdpa"
        with pytest.raises(RuntimeError, match="xformers"):
            resolve_attn_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="unknown attention back end"):
        resolve_attn_backend("flash9", "cpu")


def test_multicrop_list_equals_separate_calls():
    m = tiny(num_registers=4)
    g, l = torch.randn(4, 3, 64, 64), torch.randn(8, 3, 32, 32)
    masks = torch.rand(4, 16) > 0.5
    out = m.forward_features_list([g, l], [masks, None])
    assert torch.allclose(out[0], m.forward_features(g, masks), atol=1e-6)
    assert torch.allclose(out[1], m.forward_features(l), atol=1e-6)


def test_pos_embed_interpolates_to_other_sizes_and_is_exact_at_native():
    m = tiny()
    pos_c, pos_p = m.pos_embed_for(4, 4)
    assert torch.equal(pos_p, m.pos_embed[:, 1:])  # native grid: untouched
    _, p6 = m.pos_embed_for(6, 6)
    assert p6.shape == (1, 36, 192)
    assert m.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 37, 192)
    # a constant embedding stays constant under bicubic resampling
    with torch.no_grad():
        m.pos_embed.fill_(0.25)
    assert torch.allclose(m.pos_embed_for(7, 5)[1], torch.full((1, 35, 192), 0.25), atol=1e-6)


def test_mask_token_replaces_masked_patches_only():
    m = tiny()
    x = torch.randn(1, 3, 64, 64)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 3] = True
    with torch.no_grad():
        m.mask_token.fill_(7.0)
    t = m.prepare_tokens(x, masks)
    t0 = m.prepare_tokens(x)
    patch_pos = m.pos_embed[:, 1:]
    assert torch.allclose(t[0, 1 + 3], 7.0 + patch_pos[0, 3])
    keep = [i for i in range(17) if i != 4]
    assert torch.equal(t[:, keep], t0[:, keep])


def test_get_intermediate_layers():
    m = tiny(num_registers=4)
    x = torch.randn(2, 3, 64, 64)
    outs = m.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True)
    assert len(outs) == 2
    patches, prefix = outs[-1]
    assert patches.shape == (2, 192, 4, 4) and prefix.shape == (2, 5, 192)
    last = m.forward_features(x)
    assert torch.allclose(prefix, last[:, :5], atol=1e-6)  # last block's output, normed


def test_drop_path_and_grad_checkpointing_train():
    m = tiny(drop_path=0.5).train()
    m.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 64, 64)
    m(x).sum().backward()
    assert m.patch_embed.proj.weight.grad is not None
    m.eval()
    assert torch.equal(m(x), m(x))  # no stochastic depth at eval


def test_grad_checkpointing_gives_same_gradients():
    m = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    m(x).pow(2).sum().backward()
    ref = m.blocks[0].attn.qkv.weight.grad.clone()
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).pow(2).sum().backward()
    assert torch.allclose(m.blocks[0].attn.qkv.weight.grad, ref, atol=1e-6)


def test_no_weight_decay_names_exist():
    m = tiny(num_registers=1)
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names)


@pytest.mark.parametrize("kw, msg", [
    (dict(arch="vit_huge"), "unknown architecture 'vit_huge'"),
    (dict(patch_size=12), "patch_size 12 not supported"),
    (dict(img_size=100), "not a multiple of patch_size"),
])
def test_bad_args_fail_with_a_clear_message(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ViTArgs(**kw)


def test_drop_path_schedules():
    # DINOv2's drop_path_uniform: every block at the rate; DINO / timm: a linear ramp from 0
    uniform = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, drop_path=0.4, drop_path_schedule="uniform"))
    linear = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=32, drop_path=0.4, drop_path_schedule="linear"))
    assert [b.drop_path for b in uniform.blocks] == [0.4] * 12
    assert linear.blocks[0].drop_path == 0.0 and linear.blocks[-1].drop_path == pytest.approx(0.4)
