import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pathfm.data import augment as A
from pathfm.data.augment import MultiCrop

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "nct_crc_he_100k_sample9"
SMALL = dict(global_size=32, local_size=16, n_local=2)


def real_tiles(n=3, size=64):
    """(n, 3, size, size) uint8 crops of the real H&E tiles."""
    paths = sorted(DATA.glob("*/*.tif"))[:n]
    assert paths, f"no test tiles under {DATA}"
    arrays = [np.asarray(Image.open(p).convert("RGB"))[:size, :size] for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def no_geometry(p):
    """The same parameters without flips or transposes."""
    off = torch.zeros_like(p.hflip)
    return dataclasses.replace(p, hflip=off, vflip=off, transpose=off)


def test_shapes_dtypes_and_crop_major_order():
    # solid-colour tiles: whatever the crop, crop k of tile b keeps tile b's colour
    colours = torch.tensor([[200, 30, 60], [20, 180, 90], [90, 90, 250]], dtype=torch.uint8)
    tiles = colours.view(3, 3, 1, 1).expand(3, 3, 40, 40).contiguous()
    mc = MultiCrop(**SMALL, color_jitter=0, grayscale=0, blur_global=0, blur_local=0, solarize=0)
    out = mc(tiles, torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (6, 3, 32, 32) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (6, 3, 16, 16) and out["local_crops"].dtype == torch.float32
    expected = (colours.float() / 255 - 0.5) / 0.5  # (3 tiles, 3 channels)
    for crops in out.values():
        per_crop = crops.view(2, 3, 3, -1).mean(-1)  # (crop, tile, channel)
        torch.testing.assert_close(per_crop, expected.expand(2, 3, 3), atol=1e-5, rtol=0)


def test_no_local_crops_gives_empty_tensor():
    out = MultiCrop(global_size=32, local_size=16, n_local=0)(real_tiles(2), torch.Generator().manual_seed(0))
    assert out["local_crops"].shape == (0, 3, 16, 16) and out["global_crops"].shape == (4, 3, 32, 32)


def test_same_generator_state_same_output():
    tiles, mc = real_tiles(), MultiCrop(**SMALL, hed_jitter=0.05)
    a = mc(tiles, torch.Generator().manual_seed(7))
    b = mc(tiles, torch.Generator().manual_seed(7))
    c = mc(tiles, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["global_crops"], c["global_crops"])


def test_parameters_follow_the_dinov2_distributions():
    b, size = 4000, 256
    g, loc = MultiCrop().sample_params(b, size, size, torch.Generator().manual_seed(0))
    frac = lambda p: (p.box[:, 2] * p.box[:, 3]).double() / size**2
    slack = 2 * size / size**2  # rounding of height and width to whole pixels
    assert frac(g).min() >= 0.32 - slack and frac(g).max() <= 1.0
    assert frac(loc).min() >= 0.05 - slack and frac(loc).max() <= 0.32 + slack
    assert (g.box[:, :2] >= 0).all() and (g.box[:, 0] + g.box[:, 2] <= size).all() and (g.box[:, 1] + g.box[:, 3] <= size).all()
    rate = lambda x: x.double().mean().item()
    for p in (g, loc):
        for coin in (p.hflip, p.vflip, p.transpose):
            assert abs(rate(coin) - 0.5) < 0.03
        assert abs(rate(p.jitter) - 0.8) < 0.03 and abs(rate(p.gray) - 0.2) < 0.03
        assert 0.6 <= p.brightness.min() and p.brightness.max() <= 1.4 and abs(rate(p.brightness) - 1) < 0.02
        assert 0.8 <= p.saturation.min() and p.saturation.max() <= 1.2
        assert -0.1 <= p.hue.min() and p.hue.max() <= 0.1 and abs(rate(p.hue)) < 0.01
        assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0
    assert rate(g.blur[:b]) == 1.0 and abs(rate(g.blur[b:]) - 0.1) < 0.03 and abs(rate(loc.blur) - 0.5) < 0.03
    assert rate(g.solarize[:b]) == 0.0 and abs(rate(g.solarize[b:]) - 0.2) < 0.03 and rate(loc.solarize) == 0.0
    assert torch.equal(g.src, torch.arange(b).repeat(2)) and torch.equal(loc.src, torch.arange(b).repeat(8))


def test_resized_crop_matches_torchvision_and_transpose():
    tiles = real_tiles(2)
    box, src = torch.tensor([[5, 9, 40, 31], [0, 3, 20, 50]]), torch.tensor([1, 0])
    ours = A.resized_crops(tiles, A.transposed_tiles(tiles), src, box, torch.tensor([False, False]), 24)
    for i in range(2):
        top, left, h, w = box[i].tolist()
        ref = TF.resized_crop(tiles[src[i]], top, left, h, w, [24, 24], TF.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(ours[i], ref)
    flipped = A.resized_crops(tiles, A.transposed_tiles(tiles), src, box, torch.tensor([True, True]), 24)
    # the uint8 kernel rounds between its horizontal and vertical passes, so the pass order shows
    diff = (flipped.int() - ours.transpose(-2, -1).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05


def test_flips():
    x = torch.arange(2 * 1 * 2 * 2).view(2, 1, 2, 2)
    out = A.flips(x.clone(), torch.tensor([True, False]), torch.tensor([True, True]))
    assert out[0, 0].tolist() == [[3, 2], [1, 0]] and out[1, 0].tolist() == [[6, 7], [4, 5]]


def test_opencv_flips_equal_torchs(monkeypatch):
    """Channels-last uint8 crops (the resize's output on the CPU) flip in place with cv2.flip: the same bytes."""
    x = real_tiles(4, size=24).contiguous(memory_format=torch.channels_last)
    h, v = torch.tensor([False, True, False, True]), torch.tensor([False, False, True, True])
    monkeypatch.setattr(A, "OPENCV", False)
    ref = A.flips(x.clone(), h, v)
    monkeypatch.setattr(A, "OPENCV", True)
    assert torch.equal(A.flips(x.clone(), h, v), ref) and not torch.equal(ref[1:], x[1:])
    assert torch.equal(A.flips(x.contiguous(), h, v), ref)  # NCHW crops: torch's flips


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_ops_match_torchvision(name):
    x = torch.rand(3, 3, 9, 11, generator=torch.Generator().manual_seed(1))
    x[:, :, 0] = torch.tensor([1.0, 1.0, 0.2]).view(1, 3, 1)  # ties between channels at the max
    x[:, :, 1] = 0.5  # grey
    factors = {"hue": torch.tensor([-0.1, 0.03, 0.5])}.get(name, torch.tensor([0.6, 1.0, 1.4]))
    ours = getattr(A, f"adjust_{name}")(x.clone(), factors)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x[i], float(f)) for i, f in enumerate(factors)])
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


def test_grayscale_weights_by_hand():
    x = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]).view(3, 3, 1, 1)  # pure R, G, B
    assert A.grayscale(x).flatten().tolist() == pytest.approx([0.2989, 0.587, 0.114])


def test_blur_matches_torchvision_per_image_sigma():
    x = torch.rand(3, 3, 20, 17, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    ref = torch.stack([TF.gaussian_blur(x[i], [9, 9], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(A.gaussian_blur(x, sigma), ref, atol=1e-6, rtol=0)


def test_opencv_cpu_ops_equal_the_torch_ops(monkeypatch):
    """On the CPU the hue rotation and the blur run in OpenCV; they equal the torch code (the device path) on
    rows wide enough for OpenCV's SIMD code and on hue shifts of both signs, and so do whole views."""
    x = torch.rand(4, 3, 40, 224, generator=torch.Generator().manual_seed(3))
    shift, sigma = torch.tensor([-0.1, -0.5, 0.03, 0.1]), torch.tensor([0.1, 0.7, 1.3, 2.0])
    tiles = torch.randint(0, 256, (3, 3, 96, 96), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    mc = A.MultiCrop(global_size=112, local_size=48, n_local=1)
    params = mc.sample_params(3, 96, 96, torch.Generator().manual_seed(5))
    out = {}
    for opencv in (False, True):
        monkeypatch.setattr(A, "OPENCV", opencv)
        out[opencv] = A.adjust_hue(x.clone(), shift), A.gaussian_blur(x, sigma), mc.apply(tiles, params)
    (hue, blur, views), (hue_cv, blur_cv, views_cv) = out[False], out[True]
    torch.testing.assert_close(hue_cv, hue, atol=3e-6, rtol=0)
    torch.testing.assert_close(blur_cv, blur, atol=1e-6, rtol=0)
    for k in views:
        torch.testing.assert_close(views_cv[k], views[k], atol=6e-6, rtol=0)


def test_cpu_render_is_the_plain_ops_bit_for_bit():
    """render's CPU shortcuts (crops sorted by op and cut in chunks, OpenCV's transposed tiles, the normalisation as a
    multiply then an add) give the views of the plain ops on all crops at once, bit for bit at the shipped mean and std."""
    tiles = real_tiles(3)
    mc = MultiCrop(global_size=48, local_size=24, n_local=3)
    g, loc = mc.sample_params(3, 64, 64, torch.Generator().manual_seed(6))
    out = mc.apply(tiles, (g, loc))
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)
    scale, offset = mc._normalisation("cpu")
    for p, size, key in ((g, 48, "global_crops"), (loc, 24, "local_crops")):
        x = A.resized_crops(channels_last(tiles), channels_last(tiles.transpose(-2, -1)), p.src, p.box, p.transpose, size)
        x = mc._colour(A.flips(x, p.hflip, p.vflip).contiguous().float() / 255, p)
        assert torch.equal(out[key], torch.addcmul(offset, x, scale)), key


def test_crops_are_chunked_by_the_ops_they_take():
    """Crops sorted by their optional ops (stable), cut into chunks of at most a given number that each take the same ops."""
    _, p = MultiCrop(**SMALL).sample_params(4, 64, 64, torch.Generator().manual_seed(0))  # 8 local crops
    off = torch.zeros(8, dtype=torch.bool)
    p = dataclasses.replace(p, jitter=torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool), blur=off, gray=off,
                            solarize=off)
    order, chunks = A._group_by_ops(p, 4)
    assert order.tolist() == [1, 4, 0, 2, 3, 5, 6, 7]
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 6), (6, 8)]

def test_solarize_threshold_is_128():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    ours = A.solarize(u.float() / 255)
    torch.testing.assert_close(ours, TF.solarize(u, 128).float() / 255, atol=1e-7, rtol=0)
    assert ours[0, 0, 7, 15] == pytest.approx(127 / 255) and ours[0, 0, 8, 0] == pytest.approx(127 / 255)  # 127 kept, 128 inverted


def test_hed_round_trip_is_identity_and_scaling_acts_on_one_stain():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * (1 - 1 / 255) + 1 / 255
    same = A.hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    # a pure-haematoxylin pixel of concentration c has od = c * h; doubling H doubles its od
    h = A.RGB_FROM_HED[0].float()
    pixel = torch.pow(10.0, -0.3 * h).view(1, 3, 1, 1)
    out = A.hed_jitter(pixel, torch.tensor([[2.0, 1.0, 1.0]]), torch.zeros(1, 3))
    torch.testing.assert_close(out.flatten(), torch.pow(10.0, -0.6 * h), atol=1e-5, rtol=0)


def test_normalisation_and_identity_render():
    tiles = real_tiles(2, size=32)
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    mc = MultiCrop(global_size=32, local_size=16, n_local=0, global_scale=(1.0, 1.0), color_jitter=0,
                   grayscale=0, blur_global=0, blur_local=0, solarize=0, mean=mean, std=std)
    g, loc = mc.sample_params(2, 32, 32, torch.Generator().manual_seed(0))
    out = mc.apply(tiles, (no_geometry(g), loc))["global_crops"]
    expected = (tiles.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected.repeat(2, 1, 1, 1), atol=1e-5, rtol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="need uint8 of shape"):
        MultiCrop(**SMALL)(torch.rand(2, 3, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="global_scale"):
        MultiCrop(global_scale=(0.5, 0.2))


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, tiles):
        self.tiles = tiles

    def __len__(self):
        return 1

    def __getitem__(self, _):
        return MultiCrop(**SMALL, hed_jitter=0.05)(self.tiles, torch.Generator().manual_seed(11))


def test_worker_process_and_main_process_agree():
    tiles = real_tiles()
    main = _Augmented(tiles)[0]
    loader = torch.utils.data.DataLoader(_Augmented(tiles), batch_size=None, num_workers=1)
    worker = next(iter(loader))
    assert all(torch.equal(main[k], worker[k]) for k in main)


# --- batched mode (the device-side default) ---------------------------------------------------


def assert_views_close(a: dict, b: dict, max_levels: float = 5):
    """Views of the two modes: the resizes round differently (fixed-point weights on the CPU), by a grey
    level at a few pixels, which the colour ops can grow to a few; normalisation by std 0.5 doubles them."""
    for k in a:
        diff = (a[k].cpu() - b[k].cpu()).abs() * 255 * 0.5  # grey levels
        assert diff.max() < max_levels and (diff > 0.5).float().mean() < 0.01, (k, diff.max(), (diff > 0.5).float().mean())


def test_resample_weights_are_torchs_antialiased_bicubic():
    x = torch.rand(1, 1, 1, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    for start, length, size in ((7, 41, 24), (0, 60, 60), (10, 12, 30), (3, 57, 9)):  # down, same, up, far down
        ref = F.interpolate(x[..., start : start + length], size=(1, size), mode="bicubic", antialias=True)
        for flip in (False, True):
            w = A.resample_weights(torch.tensor([start]), torch.tensor([length]), size, torch.tensor([flip]), 60, "cpu")
            out = x.view(1, 60) @ w[0].T  # (1, size)
            torch.testing.assert_close(out.view(-1), ref.view(-1).flip(0) if flip else ref.view(-1), atol=1e-5, rtol=0)


def test_batched_crops_equal_per_crop_resize_flip_and_transpose():
    tiles = real_tiles(2)
    g, _ = MultiCrop(**SMALL).sample_params(2, 64, 64, torch.Generator().manual_seed(3))
    n = len(g)
    g.hflip, g.vflip, g.transpose = (torch.tensor([i >> k & 1 for i in range(n)], dtype=torch.bool) for k in range(3))
    ours = A.batched_resized_crops(tiles, g, 32)
    ref = A.flips(A.resized_crops(tiles.contiguous(memory_format=torch.channels_last), A.transposed_tiles(tiles),
                                  g.src, g.box, g.transpose, 32).contiguous(), g.hflip, g.vflip)
    diff = (ours.round() - ref.float()).abs()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01  # the CPU kernel's fixed-point weights


def test_batched_mode_gives_the_cpu_modes_views():
    tiles = real_tiles(3)
    mc = MultiCrop(**SMALL, hed_jitter=0.05)
    params = mc.sample_params(3, 64, 64, torch.Generator().manual_seed(5))
    assert_views_close(mc.apply(tiles, params, batched=True), mc.apply(tiles, params, batched=False))
    none = MultiCrop(global_size=32, local_size=16, n_local=0)
    out = none.apply(tiles, none.sample_params(3, 64, 64, torch.Generator().manual_seed(5)), batched=True)
    assert out["local_crops"].shape == (0, 3, 16, 16) and out["global_crops"].shape == (6, 3, 32, 32)
    with pytest.raises(ValueError, match="need square tiles"):
        mc.apply(tiles[:, :, :, :40], params, batched=True)


def test_batched_mode_calls_torch_as_often_for_any_batch():
    """No per-crop kernel storm: the batched mode's torch calls do not grow with the number of crops."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def calls(batch, batched):
        tiles = real_tiles(3).repeat(batch // 3, 1, 1, 1).to("meta")  # meta: the device code path, no device
        mc = MultiCrop(**SMALL)
        params = mc.sample_params(batch, 64, 64, torch.Generator().manual_seed(0))
        Count.calls = 0
        with Count():
            mc.apply(tiles, params, batched=batched)
        return Count.calls

    assert calls(24, True) <= calls(6, True) + 10
    assert calls(24, False) > calls(6, False) + 100  # per-crop calls: several per crop


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-side mode needs a CUDA device")
def test_cuda_matches_cpu():
    tiles = real_tiles()
    mc = MultiCrop(**SMALL, hed_jitter=0.05)
    cpu = mc(tiles, torch.Generator().manual_seed(5))
    assert_views_close(mc(tiles.cuda(), torch.Generator().manual_seed(5)), cpu)
    assert_views_close(mc.apply(tiles.cuda(), mc.sample_params(3, 64, 64, torch.Generator().manual_seed(5)), batched=False), cpu)
