import pytest
import torch

from pathfm.config import load_config
from pathfm.flops import analytic_vit_flops, count_flops, mfu, peak_flops, peak_flops_by_name, step_flops
from pathfm.vit import ViTArgs, build_vit, kept_count


def meta_vit(args: ViTArgs):
    with torch.device("meta"):
        vit = build_vit(args)
    vit.set_attn_backend("sdpa")
    return vit


def test_vit_small_forward_flops_by_hand():
    # ViT-S/16 at 224: D = 384, 196 patches + CLS = 197 tokens, 12 blocks, MLP 4D.
    # per block: 197 * 2 * (3D^2 + D^2 + 8D^2) + 2 * 2 * 197^2 * D = 697,171,968 + 59,610,624
    # patch embedding: 2 * 196 * (3 * 16 * 16) * 384 = 115,605,504
    by_hand = 12 * (697_171_968 + 59_610_624) + 115_605_504  # 9.197 GFLOPs = 4.6 GMACs, the published figure
    args = ViTArgs(arch="vit_small", patch_size=16, img_size=224)
    assert analytic_vit_flops(args, 197, 1) == by_hand
    with torch.device("meta"):
        x = torch.empty(3, 3, 224, 224)
    assert count_flops(meta_vit(args).forward_features, x) == 3 * by_hand


@pytest.mark.parametrize("args,tokens", [
    (ViTArgs(arch="vit_small", patch_size=16, img_size=224), 197),
    (ViTArgs(arch="vit_giant2", patch_size=14, img_size=224, num_registers=4, ffn="swiglu"), 256 + 5),
])
def test_counted_flops_match_analytic(args, tokens):
    # counted on the meta device: ViT-g (1.1 B parameters) costs no memory and no compute
    with torch.device("meta"):
        x = torch.empty(2, 3, 224, 224)
    counted = count_flops(meta_vit(args).forward_features, x)
    analytic = analytic_vit_flops(args, tokens, 2)
    assert abs(counted - analytic) / analytic < 0.02, (counted, analytic)


def test_fvcore_counts_multiply_adds_half_of_ours():
    fvcore = pytest.importorskip("fvcore.nn")
    torch.manual_seed(0)
    vit = build_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64)).eval()
    vit.set_attn_backend("math")  # fvcore has no handle for SDPA; the written-out matmuls it counts
    x = torch.randn(2, 3, 64, 64)
    analysis = fvcore.FlopCountAnalysis(vit, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    matmuls = sum(v for k, v in by_op.items() if k in ("conv", "linear", "addmm", "matmul", "bmm"))
    # fvcore: one multiply-add = 1 flop; torch.utils.flop_counter and pathfm: 2
    assert 2 * matmuls == count_flops(vit.forward_features, x)


def test_subset_stochastic_depth_saves_the_dropped_share():
    args = ViTArgs(arch="vit_tiny", patch_size=16, img_size=64, drop_path=0.5, drop_path_mode="subset")
    vit = meta_vit(args)
    with torch.device("meta"):
        x = torch.empty(8, 3, 64, 64)
    dense = count_flops(vit.eval().forward_features, x)
    embed = 8 * 2 * 16 * (3 * 16 * 16) * 192
    for blk in vit.blocks:  # every block at rate 0.5: each runs on kept_count(8, 0.5) = 4 of 8 images
        blk.drop_path = 0.5
    sparse = count_flops(vit.train().forward_features, x)
    assert sparse - embed == (dense - embed) * 4 / 8
    # the model's own linear rates 0 .. 0.5, counted and analytic
    linear = meta_vit(args).train()
    assert count_flops(linear.forward_features, x) == analytic_vit_flops(args, 17, 8, training=True)
    kept = sum(kept_count(8, 0.5 * i / 11) for i in range(12))  # 8+8+7+7+7+6+6+5+5+5+4+4 images over 12 blocks
    assert kept == 72
    assert analytic_vit_flops(args, 17, 8, training=True) - embed == pytest.approx((dense - embed) * 72 / 96)
    # mask mode computes every branch: no saving
    masked = meta_vit(ViTArgs(arch="vit_tiny", patch_size=16, img_size=64, drop_path=0.5)).train()
    assert count_flops(masked.forward_features, x) == dense


def head_flops(cfg, tokens: int, prototypes: int) -> int:
    s, D = cfg.ssl, 384
    dims = [D] + [s.head_hidden] * (s.head_layers - 1) + [s.head_bottleneck, prototypes]
    return tokens * 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


@pytest.mark.parametrize("mode", ["mask", "subset"])
def test_step_flops_adds_up(mode):
    cfg = load_config("configs/vits16.yaml", ["optim.batch_size=4", "crops.n_local=6", "model.drop_path=0.3",
                                              f"model.drop_path_mode={mode}", "ssl.prototypes=1000"])
    s, B = cfg.ssl, 4
    flops = step_flops(cfg)
    args = ViTArgs(arch="vit_small", patch_size=16, drop_path=0.3, drop_path_mode=mode)
    patches = (cfg.crops.global_size // 16) ** 2
    n_global, n_local = patches + 1, (cfg.crops.local_size // 16) ** 2 + 1
    masked = round(2 * B * s.mask_probability * (s.mask_ratio_min + s.mask_ratio_max) / 2 * patches) if s.objective == "dinov2" else 0
    ibot_k = s.ibot_prototypes if s.ibot_separate_head else s.prototypes
    teacher = analytic_vit_flops(args, n_global, 2 * B) + head_flops(cfg, 2 * B, s.prototypes) + head_flops(cfg, masked, ibot_k)
    student = (analytic_vit_flops(args, n_global, 2 * B, training=True) + analytic_vit_flops(args, n_local, 6 * B, training=True)
               + head_flops(cfg, 8 * B, s.prototypes) + head_flops(cfg, masked, ibot_k))
    assert flops["teacher_forward"] == pytest.approx(teacher, rel=1e-9)
    assert flops["student_forward"] == pytest.approx(student, rel=1e-9)
    assert flops["total"] == flops["teacher_forward"] + 3 * flops["student_forward"]
    dense = analytic_vit_flops(args, n_global, 2 * B) + analytic_vit_flops(args, n_local, 6 * B)
    if mode == "subset":  # the student skips the dropped images, the teacher (no stochastic depth) does not
        assert student - head_flops(cfg, 8 * B, s.prototypes) - head_flops(cfg, masked, ibot_k) < 0.9 * dense
    else:
        assert student - head_flops(cfg, 8 * B, s.prototypes) - head_flops(cfg, masked, ibot_k) == dense


def test_step_flops_of_vitg_is_cheap_to_count():
    flops = step_flops(load_config("configs/vitg14.yaml"))  # 1.1 B parameters, 131072 prototypes: meta only
    assert 1.6e14 < flops["total"] < 2.2e14  # ~189 TFLOP per rank per step at batch 24 (98 px locals)


def test_peak_flops_by_device_name():
    assert peak_flops_by_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_by_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_by_name("NVIDIA H200") == 989e12
    assert peak_flops_by_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_by_name("NVIDIA L40S") == 362e12
    assert peak_flops_by_name("NVIDIA L4") == 121e12
    assert peak_flops_by_name("Some Future GPU") is None
    assert peak_flops("cpu") is None


def test_mfu():
    assert mfu(989e12, 2.0, 989e12) == 0.5
    assert mfu(1e12, 1.0, None) is None
    with pytest.raises(ValueError, match="step_time_s=0"):
        mfu(1e12, 0.0, 989e12)
