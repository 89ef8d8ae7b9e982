"""Each fast path computes what the plain path computes: SDPA kernels, packed crops (block-diagonal
attention), subset stochastic depth, activation checkpointing, fused AdamW, torch.compile."""

import itertools
import shutil

import pytest
import torch

from pathfm.config import ConfigError, load_config
from pathfm.heads import DINOHead
from pathfm.optim import param_groups, set_hparams
from pathfm.vit import ViTArgs, add_on_subset, build_vit, kept_count, pack, packed_subset, unpack, xformers_works

CUDA = torch.cuda.is_available()
XFORMERS = CUDA and xformers_works("cuda")


def tiny(**kw):
    torch.manual_seed(0)
    # LayerScale 1.0, not 1e-5: with 1e-5 every residual branch is nearly invisible and any bug in it passes
    args = dict(arch="vit_tiny", patch_size=16, img_size=64, num_registers=2, layerscale=1.0)
    args.update(kw)
    return build_vit(ViTArgs(**args))


def crops(device="cpu"):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 64, 64, generator=g), torch.randn(4, 3, 32, 32, generator=g)]  # 2 global, 4 local
    masks = [torch.rand(2, 16, generator=g) > 0.5, None]
    return [x.to(device) for x in xs], [m.to(device) if m is not None else None for m in masks]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_of(outs):
    return sum((o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).pow(2).mean() for o in outs)


# --- SDPA kernels --------------------------------------------------------------------------------


def test_sdpa_math_kernel_equals_default_choice():
    m = tiny().eval()
    xs, masks = crops()
    ref = m.forward_features_list(xs, masks)
    m.set_sdpa_kernels(["math"])
    for a, b in zip(m.forward_features_list(xs, masks), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown SDPA kernel.*'flash3'"):
        m.set_sdpa_kernels(["flash3"])


def test_config_checks_new_keys():
    cfg = load_config(None, ["model.sdpa_kernels=[flash, cudnn]", "model.drop_path_mode=subset"])
    assert cfg.model.sdpa_kernels == ["flash", "cudnn"] and cfg.model.drop_path_mode == "subset"
    with pytest.raises(ConfigError, match=r"model.sdpa_kernels\[1\]"):
        load_config(None, ["model.sdpa_kernels=[flash, fast]"])
    with pytest.raises(ConfigError, match="model.drop_path_mode"):
        load_config(None, ["model.drop_path_mode=skip"])


@pytest.mark.skipif(not CUDA, reason="flash / efficient / cuDNN SDPA kernels need CUDA; none here")
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_cuda_sdpa_kernels_match_math(kernel):
    m = tiny().cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m.set_sdpa_kernels(["math"])
        ref = m.forward_features(x).float()
        m.set_sdpa_kernels([kernel])
        try:
            out = m.forward_features(x).float()
        except RuntimeError as e:  # e.g. cuDNN attention missing from this build or GPU
            pytest.skip(f"SDPA kernel {kernel} does not run here: {str(e).splitlines()[0]}")
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


# --- packed crops: block-diagonal attention ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_equals_per_group(backend):
    m = tiny().eval()
    m.set_attn_backend(backend)
    xs, masks = crops()
    ref = m.forward_features_list(xs, masks, packed=False)
    out = m.forward_features_list(xs, masks, packed=True)
    assert [o.shape for o in out] == [(2, 3 + 16, 192), (4, 3 + 4, 192)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packed_gradients_equal_per_group():
    xs, masks = crops()
    result = []
    for packed in (False, True):
        m = tiny().train()
        loss_of(m.forward_features_list(xs, masks, packed=packed)).backward()
        result.append(grads(m))
    for n in result[0]:
        torch.testing.assert_close(result[1][n], result[0][n], atol=1e-6, rtol=1e-4, msg=n)


def test_pack_unpack_round_trip_and_mask():
    a, b = torch.randn(2, 3, 5), torch.randn(1, 4, 5)
    x, packing = pack([a, b], xformers=False)
    assert x.shape == (1, 10, 5)
    assert packing.image_of_token.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert packing.bias.sum() == 2 * 9 + 16 and packing.bias[0, :3].all() and not packing.bias[0, 3:].any()
    back = unpack(x, packing)
    assert torch.equal(back[0], a) and torch.equal(back[1], b)


@pytest.mark.parametrize("mode", ["mask", "subset"])
def test_packed_stochastic_depth_equals_per_group_with_the_same_draws(mode):
    """In a packed sequence each image keeps or drops its branch as a whole, as it would unpacked."""
    blk = tiny(drop_path=0.5, drop_path_mode=mode).train().blocks[-1]  # rate 0.5
    xs = [torch.randn(4, 19, 192), torch.randn(6, 7, 192)]
    x, packing = pack(xs, xformers=False)
    torch.manual_seed(3)
    out = unpack(blk._residual(x, blk._attn_branch, packing), packing)

    torch.manual_seed(3)  # replay the draws the packed path made, then apply them group by group
    if mode == "mask":
        keep = (torch.rand(10) >= 0.5).float() / 0.5  # one draw per image, all groups together
        ref = [t + blk._attn_branch(t, None) * k.view(-1, 1, 1) for t, k in zip(xs, keep.split([4, 6]))]
    else:
        idx = [torch.randperm(b)[: kept_count(b, 0.5)] for b in (4, 6)]  # per group, in group order
        ref = [add_on_subset(t, blk._attn_branch, i) for t, i in zip(xs, idx)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    changed = [(o - t).abs().amax(dim=(1, 2)) > 0 for o, t in zip(out, xs)]  # images whose branch was added
    if mode == "subset":
        assert [int(c.sum()) for c in changed] == [kept_count(4, 0.5), kept_count(6, 0.5)]


def test_packed_subset_keeps_whole_images():
    _, packing = pack([torch.zeros(4, 3, 8), torch.zeros(5, 2, 8)], xformers=False)
    positions, scales, kept = packed_subset(packing, 0.5, xformers=False)
    assert kept.groups == [(2, 3), (2, 2)]  # kept_count(4, .5) = 2, kept_count(5, .5) = round(2.5) = 2
    images = packing.image_of_token[positions].view(-1)
    assert positions.shape == (2 * 3 + 2 * 2,) and len(set(images.tolist())) == 4
    assert scales.tolist() == [2.0] * 6 + [2.5] * 4  # B_g / k_g
    assert kept.bias.shape == (10, 10)


# --- subset stochastic depth ---------------------------------------------------------------------


def test_subset_expectation_is_the_undropped_output_exactly():
    """Averaged over all C(B, k) subsets, x + B/k * branch on the subset is x + branch(x)."""
    torch.manual_seed(0)
    blk = tiny().blocks[0]
    x = torch.randn(5, 7, 192)
    k = kept_count(5, 0.4)  # 3
    outs = [add_on_subset(x, blk._mlp_branch, torch.tensor(s)) for s in itertools.combinations(range(5), k)]
    torch.testing.assert_close(torch.stack(outs).mean(0), x + blk._mlp_branch(x, None), atol=1e-5, rtol=1e-5)


def test_subset_mode_trains_and_matches_eval_without_drop():
    xs, masks = crops()
    m = tiny(drop_path=0.3, drop_path_mode="subset").train()
    loss_of(m.forward_features_list(xs, masks)).backward()
    g = grads(m)
    assert len(g) == sum(1 for n, _ in m.named_parameters() if n != "mask_token" or masks[0].any())
    assert all(torch.isfinite(t).all() for t in g.values())
    assert g["blocks.11.mlp.fc1.weight"].abs().sum() > 0  # the most dropped block still learns
    m0 = tiny(drop_path_mode="subset").train()  # rate 0: identical to eval
    for a, b in zip(m0.forward_features_list(xs, masks), m0.eval().forward_features_list(xs, masks)):
        assert torch.equal(a, b)


def test_subset_mode_does_not_change_the_state_dict():
    assert tiny(drop_path_mode="subset").state_dict().keys() == tiny().state_dict().keys()


# --- activation checkpointing --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mask", "subset"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    xs, masks = crops()
    result = {}
    for ac in (0, 1, 2):  # none, full, selective (every second block)
        m = tiny(drop_path=0.2, drop_path_mode=mode).train()
        m.set_grad_checkpointing(ac)
        torch.manual_seed(7)  # the recompute must replay the same stochastic-depth draws
        loss_of(m.forward_features_list(xs, masks)).backward()
        result[ac] = grads(m)
    for ac in (1, 2):
        for n in result[0]:
            torch.testing.assert_close(result[ac][n], result[0][n], atol=1e-6, rtol=1e-5, msg=f"ac={ac} {n}")


# --- fused AdamW -------------------------------------------------------------------------------


def test_fused_adamw_step_equals_foreach_step():
    model = torch.nn.ModuleDict({"backbone": tiny(), "dino_head": DINOHead(192, 64, 32, 16)})
    torch.manual_seed(1)
    fake_grads = [torch.randn_like(p) for p in model.parameters()]
    after = []
    for impl in ({"foreach": True}, {"fused": True}):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        groups = param_groups(model, weight_decay=0.04, layer_decay=0.9, patch_embed_lr_mult=0.2, num_layers=12)
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), **impl)
        set_hparams(opt, lr=1e-3, weight_decay=0.04, freeze_last_layer=False)
        for _ in range(2):  # two steps: the second uses the moments of the first
            for p, g in zip(model.parameters(), fake_grads):
                p.grad = g.clone()
            opt.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])  # the next optimizer starts from the same weights
    assert any(not torch.equal(after[0][n], state[n]) for n in state)
    for n in after[0]:
        torch.testing.assert_close(after[1][n], after[0][n], atol=1e-6, rtol=0, msg=n)


# --- torch.compile -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler; none here")
def test_compiled_block_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    m = tiny(drop_path=0.0).train()
    blk = m.blocks[0]
    x = torch.randn(2, 19, 192, requires_grad=True)
    ref = blk(x)
    ref.pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in blk.named_parameters()} | {"x": x.grad.clone()}
    blk.zero_grad()
    x.grad = None
    blk.compile()  # as dist.wrap_model(compile=True)
    try:
        out = blk(x)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        pytest.skip(f"inductor does not compile on this CPU: {str(e).splitlines()[0]}")
    out.pow(2).mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got = {n: p.grad for n, p in blk.named_parameters()} | {"x": x.grad}
    for n in ref_grads:
        torch.testing.assert_close(got[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


# --- xformers (CUDA) ---------------------------------------------------------------------------


@pytest.mark.skipif(not XFORMERS, reason="xformers needs CUDA and a working xformers install; none here")
@pytest.mark.parametrize("mode", ["mask", "subset"])
def test_xformers_packed_training_equals_sdpa_packed(mode):
    """xformers' implicit block-diagonal mask vs the explicit bool mask, in training, with stochastic depth."""
    xs, masks = crops("cuda")
    result = []
    for backend in ("sdpa", "xformers"):
        m = tiny(drop_path=0.3, drop_path_mode=mode).cuda().train()
        m.set_attn_backend(backend)
        torch.manual_seed(5)  # same draws on both paths: they consume the RNG identically
        outs = m.forward_features_list(xs, masks, packed=True)
        loss_of(outs).backward()
        result.append(([o.detach() for o in outs], grads(m)))
    for a, b in zip(result[1][0], result[0][0]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)
    for n in result[0][1]:
        torch.testing.assert_close(result[1][1][n], result[0][1][n], atol=2e-4, rtol=1e-2, msg=n)
