"""DINOv2 multi-crop augmentation, batched on uint8 tile tensors.

Per-image PIL pipelines run at ~45 samples/s per core, too slow to feed a GPU, so every op here
works on a whole batch of crops at once. MultiCrop draws all random parameters on the CPU from one
torch.Generator (sample_params), then applies them on the device that holds the tiles (apply): the
CPU in loader workers, or the GPU in device-side mode. Both modes therefore draw from the same
distributions, and one generator state gives the same parameters on any device.

Two ways to apply them, with the same views up to resize rounding: on the CPU, chunks of crops (CPU_CHUNK_PIXELS
pixels at most) with torch's fast channels-last uint8 resize, one call per crop (cheap there); on a GPU,
`batched` mode, where every crop of one size is cut out, resized, flipped and transposed by two
batched matmuls with per-crop resampling matrices, so a step costs a few hundred kernel launches
instead of several per crop (a batch of 48 tiles has 480 crops).

Per crop, in order: random resized crop (antialiased bicubic), flips and 90-degree rotations,
optional HED stain jitter, colour jitter, grayscale, Gaussian blur, solarisation, normalisation.
Colour ops work in float32 in [0, 1] and mirror torchvision's functional ops, except that colour
jitter applies brightness, contrast, saturation, hue in this fixed order where torchvision
shuffles the order per image.
"""

import functools
import math
from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Crops are augmented this many pixels at a time on the CPU: 8 crops of 224 px (an (8, 3, 224, 224) float32
# chunk is ~5 MB, which stays in cache; a whole (128, 3, 224, 224) batch would run ~10x slower per element),
# 43 of 96 px (6% faster a sample than 8: fewer calls per crop).
CPU_CHUNK_PIXELS = 8 * 224 * 224

# On the CPU the two costliest colour ops, the hue rotation and the blur, run as OpenCV's SIMD kernels
# one crop at a time (4x and 3.5x faster than the torch code below, equal to it within 2e-6); the torch
# code runs on other devices, and on the CPU when this is False (tests compare the two).
OPENCV = True

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
BLUR_KERNEL = 9  # DINOv2's GaussianBlur kernel size, for global and local crops alike
SECOND_GLOBAL_BLUR = 0.1  # DINOv2 blurs the second global crop with this probability

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB (rows),
# normalised to unit length below. Stain concentrations c relate to optical density by
# od = c @ RGB_FROM_HED, with od = -log10(intensity).
_STAINS = torch.tensor([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=torch.float64)
RGB_FROM_HED = _STAINS / _STAINS.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


@dataclass
class CropParams:
    """Random parameters of n crops that share an output size; every field has leading dim n."""

    src: torch.Tensor  # (n,) int64: index of the source tile in the batch
    box: torch.Tensor  # (n, 4) int64: top, left, height, width in tile pixels
    hflip: torch.Tensor  # (n,) bool
    vflip: torch.Tensor  # (n,) bool
    transpose: torch.Tensor  # (n,) bool: swap rows and columns (with the flips: all 8 rotations/reflections)
    jitter: torch.Tensor  # (n,) bool: colour jitter applied
    brightness: torch.Tensor  # (n,) factor
    contrast: torch.Tensor  # (n,) factor
    saturation: torch.Tensor  # (n,) factor
    hue: torch.Tensor  # (n,) shift in turns of the colour wheel
    gray: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) blur sigma in output pixels
    solarize: torch.Tensor  # (n,) bool
    hed_scale: torch.Tensor  # (n, 3) per-stain factor on the concentrations
    hed_shift: torch.Tensor  # (n, 3) per-stain offset on the concentrations

    def __getitem__(self, idx) -> "CropParams":
        return CropParams(*(getattr(self, f.name)[idx] for f in fields(self)))

    def __len__(self) -> int:
        return len(self.src)


# ---------------------------------------------------------------- random parameters (CPU)


def _uniform(shape, low: float, high: float, generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _bernoulli(p: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(p.shape, generator=generator, dtype=torch.float64) < p


def sample_boxes(n: int, height: int, width: int, scale: tuple[float, float], generator,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's box distribution, vectorised: (n, 4) int64 top, left, height, width.

    Each crop tries `attempts` (area fraction, aspect ratio) pairs and keeps the first that fits in
    the tile; when none fits it takes the central crop with the aspect ratio clamped to `ratio`.
    """
    area = height * width * _uniform((n, attempts), *scale, generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.sqrt(area * aspect).round().long()
    h = torch.sqrt(area / aspect).round().long()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)  # (n, attempts)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = (u[:, 0] * (height - h + 1)).floor().long()
    left = (u[:, 1] * (width - w + 1)).floor().long()

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none = ~fits.any(dim=1)
    h, w = torch.where(none, fh, h), torch.where(none, fw, w)
    top = torch.where(none, (height - fh) // 2, top)
    left = torch.where(none, (width - fw) // 2, left)
    return torch.stack([top, left, h, w], dim=1)


def sample_crop_params(src: torch.Tensor, height: int, width: int, scale: tuple[float, float], *,
                       color_jitter: float, grayscale: float, blur: torch.Tensor, solarize: torch.Tensor,
                       hed_jitter: float, generator) -> CropParams:
    """Parameters for crops of tiles `src` (n,); blur and solarize are per-crop probabilities (n,)."""
    n = len(src)
    full = lambda p: torch.full((n,), float(p), dtype=torch.float64)
    box = sample_boxes(n, height, width, scale, generator)
    # tissue has no canonical orientation: three fair coins give each of the 8 symmetries of the
    # square (4 quarter turns, each optionally mirrored) probability 1/8
    hflip, vflip = _bernoulli(full(0.5), generator), _bernoulli(full(0.5), generator)
    transpose = _bernoulli(full(0.5), generator)
    # DINOv2's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    jitter = _bernoulli(full(color_jitter), generator)
    brightness = _uniform(n, 0.6, 1.4, generator)
    contrast = _uniform(n, 0.6, 1.4, generator)
    saturation = _uniform(n, 0.8, 1.2, generator)
    hue = _uniform(n, -0.1, 0.1, generator)
    gray = _bernoulli(full(grayscale), generator)
    blur_on = _bernoulli(blur, generator)
    sigma = _uniform(n, 0.1, 2.0, generator)
    solarize_on = _bernoulli(solarize, generator)
    # Tellez et al. (2018) style: concentration * U(1-s, 1+s) + U(-s, s), per stain
    hed_scale = _uniform((n, 3), 1 - hed_jitter, 1 + hed_jitter, generator)
    hed_shift = _uniform((n, 3), -hed_jitter, hed_jitter, generator)
    f32 = lambda t: t.to(torch.float32)
    return CropParams(src, box, hflip, vflip, transpose, jitter, f32(brightness), f32(contrast), f32(saturation),
                      f32(hue), gray, blur_on, f32(sigma), solarize_on, f32(hed_scale), f32(hed_shift))


# ---------------------------------------------------------------- ops on batches of crops


def resized_crops(tiles: torch.Tensor, tiles_t: torch.Tensor, src: torch.Tensor, box: torch.Tensor,
                  transpose: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, size, size) uint8: box i of tiles[src[i]], resized with antialiased bicubic (PIL's filter).

    Crops with transpose[i] set are read from tiles_t, the tiles with rows and columns swapped, at
    the swapped box: that gives the transposed crop at no extra cost. Crops differ in size, so each
    is resized by its own call. On the CPU, torch's fast uint8 kernel wants channels-last tiles (3x
    faster than NCHW); other devices resize in float32 and round back to uint8, so both give the
    same values up to rounding. The result is channels-last on the CPU.
    """
    on_cpu = tiles.device.type == "cpu"
    crops = []
    for i, (top, left, h, w), t in zip(src.tolist(), box.tolist(), transpose.tolist()):
        if t:
            crop = tiles_t[i : i + 1, :, left : left + w, top : top + h]  # (1, 3, w, h) view
        else:
            crop = tiles[i : i + 1, :, top : top + h, left : left + w]  # (1, 3, h, w) view
        crop = crop if on_cpu else crop.float()
        crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False))
    x = torch.cat(crops)  # channels-last on the CPU: render's float conversion makes it NCHW
    return x if on_cpu else x.round_().clamp_(0, 255).to(torch.uint8)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5: PIL's bicubic filter, and torch's when antialias=True."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, flip: torch.Tensor, extent: int,
                     device) -> torch.Tensor:
    """(n, size, extent) float32: row i of matrix k resamples pixels [start_k, start_k + length_k) of an
    axis of `extent` pixels to output pixel i (pixel size - 1 - i where flip_k), with the weights of
    F.interpolate(mode="bicubic", antialias=True, align_corners=False): the filter widened by the
    downscale factor, cut at the crop's edges and renormalised.
    """
    n = len(start)
    start, length = (t.to(device, torch.float32).view(n, 1, 1) for t in (start, length))
    scale = length / size  # input pixels per output pixel
    widen = scale.clamp(min=1)  # antialiasing: the filter spans `scale` input pixels when downscaling
    i = torch.arange(size, device=device, dtype=torch.float32).view(1, size, 1)
    i = torch.where(flip.to(device).view(n, 1, 1), size - 1 - i, i)  # (n, size, 1)
    centre = scale * (i + 0.5)  # in crop coordinates
    j = torch.arange(extent, device=device, dtype=torch.float32).view(1, 1, extent) - start  # crop coordinates
    w = _bicubic((j + 0.5 - centre) / widen) * ((j >= 0) & (j < length))  # (n, size, extent)
    return w / w.sum(dim=2, keepdim=True)


def batched_resized_crops(tiles: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """(n, 3, size, size) float32 in uint8 units: every crop of params, transposed and flipped, in two
    batched matmuls; the same values as resized_crops + flips on the CPU, up to the rounding of its weights.

    out_k = R_k @ (S_k @ C_k^T) with R_k (size, T) and C_k (size, T) from resample_weights and S_k the
    tile, or for a transposed crop the transposed tile read at the swapped box (as resized_crops); a
    flip reverses the rows of R_k or C_k. Like torch's uint8 CPU kernel, the horizontal pass runs
    first and rounds and clamps to uint8 values before the vertical one. Tiles must be square (T x T).
    """
    device, b = tiles.device, tiles.shape[0]
    top, left, h, w = params.box.unbind(1)
    t = params.transpose
    rows = resample_weights(torch.where(t, left, top), torch.where(t, w, h), size, params.vflip, tiles.shape[2], device)
    cols = resample_weights(torch.where(t, top, left), torch.where(t, h, w), size, params.hflip, tiles.shape[3], device)
    both = torch.cat([tiles, tiles.transpose(-2, -1)])  # (2B, 3, T, T): entry B + i is tile i transposed
    x = both.index_select(0, (params.src + b * t.long()).to(device)).float()  # (n, 3, T, T)
    x = (x @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # (n, 3, T, size)
    return rows.unsqueeze(1) @ x  # (n, 3, size, size)


def transposed_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """tiles with rows and columns swapped; on the CPU a channels-last copy, for the fast resize (with OPENCV
    one cv2.transpose a tile: 8x faster than torch's strided copy, the same bytes)."""
    tiles_t = tiles.transpose(-2, -1)
    if tiles.device.type != "cpu":
        return tiles_t
    if not OPENCV:
        return tiles_t.contiguous(memory_format=torch.channels_last)
    src = tiles.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3) view
    out = np.empty((src.shape[0], src.shape[2], src.shape[1], src.shape[3]), dtype=src.dtype)  # (B, W, H, 3)
    for tile, t in zip(src, out):
        cv2.transpose(tile, t)
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, 3, W, H), channels-last


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn, *params: torch.Tensor) -> torch.Tensor:
    """x[mask] = fn(x[mask], *(p[mask] for p in params)), computing fn only where mask (CPU bool (n,)) is set."""
    if not mask.any():
        return x
    if mask.all():
        return fn(x, *(p.to(x.device) for p in params))
    idx = mask.nonzero().squeeze(1)
    idx_dev = idx.to(x.device)
    return x.index_copy_(0, idx_dev, fn(x.index_select(0, idx_dev), *(p[idx].to(x.device) for p in params)))


def _group_by_ops(params: CropParams, chunk: int) -> tuple[torch.Tensor, list[slice]]:
    """(n,) int64 order of the crops that puts crops taking the same optional ops next to each other, and
    the chunks of that order: at most `chunk` crops, each taking the same ops.

    Every op acts on each crop alone, so crops can be augmented in any order and chunks. A chunk
    uniform in each of jitter, grayscale, blur and solarisation runs each op on the whole chunk
    instead of copying a subset out and back (_on_subset; 3% of MultiCrop's time on the CPU).
    """
    key = params.jitter.long() * 8 + params.blur.long() * 4 + params.gray.long() * 2 + params.solarize.long()
    key, order = torch.sort(key, stable=True)
    chunks, start, key = [], 0, key.tolist()
    for end in range(1, len(key) + 1):
        if end == len(key) or key[end] != key[start] or end - start == chunk:
            chunks.append(slice(start, end))
            start = end
    return order, chunks


def flips(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right where hflip (n,), top-bottom where vflip (n,); x (n, C, H, W), in place.

    One crop at a time, both flips in one pass: on the CPU, flipping a copied-out subset of a
    (8, 3, 224, 224) uint8 chunk takes ~30x longer than flipping its crops one by one.
    """
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if OPENCV and x.device.type == "cpu" and x.dtype == torch.uint8 and channels_last:
        # cv2.flip in place on each crop's (H, W, C) view: twice as fast as torch's flip and copy back
        for crop, h, v in zip(x.permute(0, 2, 3, 1).numpy(), hflip.tolist(), vflip.tolist()):
            if h or v:  # flipCode 1: left-right, 0: top-bottom, -1: both
                cv2.flip(crop, -1 if h and v else 1 if h else 0, dst=crop)
        return x
    for i, (h, v) in enumerate(zip(hflip.tolist(), vflip.tolist())):
        dims = [d for d, on in ((-1, h), (-2, v)) if on]
        if dims:
            x[i] = x[i].flip(dims)
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the image's mean luma (one number per image), in place."""
    f = factor.view(-1, 1, 1, 1)
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (n, 1, 1, 1)
    return x.mul_(f).add_(mean * (1 - f)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards the per-pixel luma, in place: lerp(luma, x, factor) is one pass over x."""
    return torch.lerp(grayscale(x), x, factor.view(-1, 1, 1, 1), out=x).clamp_(0, 1)


def _step(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x >= 0, else 0.0, for x in [-1, 1).

    Float arithmetic on purpose: comparisons and torch.where run 10-50x slower than floor on the
    CPU (bool tensors are not vectorised there).
    """
    return x.floor().add_(1)


@functools.cache
def _opencv_one_thread() -> None:
    cv2.setNumThreads(1)  # a loader worker is one core, as torch's threads there; once per process


def _opencv(x: torch.Tensor) -> bool:
    """Use OpenCV for x: on the CPU, float32, NCHW-contiguous (its planes are written in place), and OPENCV on."""
    if OPENCV and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        _opencv_one_thread()
        return True
    return False


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by shift (n,) turns, in place; value (max) and chroma (max - min) are kept.
    On the CPU: OpenCV's RGB -> HSV -> RGB per crop.

    Channel c of a pixel with value v, chroma C and hue h (in sixths of a turn) is
    v - C * clamp(d - 1, 0, 1), d the circular distance from h to the channel's own hue (0, 2, 4
    for R, G, B); with y = 3 - d that is (v - 2C) + C * clamp(y, 1, 2). Written with (n, H, W)
    planes only, lerp for the case split: a third fewer passes than a (n, 3, H, W) form, 1.5-2x faster.
    """
    if _opencv(x):
        for crop, turns in zip(x.numpy(), shift.tolist()):
            planes = list(crop)  # views of x's (H, W) planes
            hsv = cv2.cvtColor(cv2.merge(planes), cv2.COLOR_RGB2HSV)  # interleaved; H in degrees, S and V in [0, 1]
            cv2.add(hsv, (360.0 * (turns % 1.0), 0.0, 0.0, 0.0), dst=hsv)  # a shift >= 0: HSV2RGB wraps >= 360, not < 0
            # back into x's planes (merge / split: twice as fast as torch's permuted copies)
            cv2.split(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=hsv), planes)
        return x
    r, g, b = x.unbind(1)  # each (n, H, W)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    # hue times chroma, from the channel that holds the max (red wins ties, then green, as in
    # torchvision); ceil(max - channel) is 0 on that channel and 1 elsewhere: a branch-free
    # select, as comparisons and torch.where run 10-50x slower than float arithmetic on the CPU
    h6 = torch.lerp(torch.add(b - r, chroma, alpha=2), torch.add(r - g, chroma, alpha=4), (maxc - g).ceil_())
    h6 = torch.lerp(g - b, h6, (maxc - r).ceil_())
    # shifted hue, grey pixels (chroma 0) get hue 0: any hue gives them back
    h6 = torch.addcdiv((6 * shift).view(-1, 1, 1), h6, chroma.clamp(min=1e-12))
    h6 = h6.sub_(h6.div(6).floor_(), alpha=6)  # mod 6, into [0, 6), without the slow torch.remainder
    base = torch.add(maxc, chroma, alpha=-2)
    for channel, centre in ((r, 0.0), (g, 2.0), (b, 4.0)):
        y = (h6 - centre).abs_().sub_(3).abs_()  # 3 - circular distance to the channel's hue
        torch.addcmul(base, chroma, y.clamp_(1, 2), out=channel)  # r, g, b are no longer read
    return x


def color_jitter(x, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter with per-image factors (n,), in a fixed order."""
    x = adjust_brightness(x, brightness)
    x = adjust_contrast(x, contrast)
    x = adjust_saturation(x, saturation)
    return adjust_hue(x, hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (n,), reflect padding, as torchvision's.

    Each pass is a sum of kernel_size shifted slices weighted per image: on the CPU that is ~4x
    faster than a grouped conv2d (one group per image and channel) on 224 px crops, and the same
    at 96 px.
    """
    if _opencv(x):  # one plane at a time: the same kernel (OpenCV's reflect-101 border is torch's "reflect")
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        for src, dst, s in zip(x.numpy(), y.numpy(), sigma.tolist()):
            for c in range(x.shape[1]):
                cv2.GaussianBlur(src[c], (kernel_size, kernel_size), s, dst=dst[c], sigmaY=s,
                                 borderType=cv2.BORDER_REFLECT_101)
        return y
    n, c, h, w = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(n, kernel_size, 1, 1, 1)  # (n, K, 1, 1, 1)
    x = F.pad(x, (r, r, 0, 0), mode="reflect")  # (n, c, h, w + 2r)
    y = x[..., :w] * kernel[:, 0]
    for j in range(1, kernel_size):
        y.addcmul_(x[..., j : j + w], kernel[:, j])
    y = F.pad(y, (0, 0, r, r), mode="reflect")  # (n, c, h + 2r, w)
    x = y[:, :, :h] * kernel[:, 0]
    for j in range(1, kernel_size):
        x.addcmul_(y[:, :, j : j + h], kernel[:, j])
    return x


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Invert values >= 128/255, as torchvision's RandomSolarize(threshold=128) on 8-bit images."""
    return torch.lerp(x, 1 - x, _step(x - 128 / 255))


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Colour-deconvolve into H, E, DAB concentrations, scale (n, 3) and shift (n, 3) them, back to RGB.

    Deconvolution, jitter and reconvolution are linear in optical density, so they fold into one
    3x3 matrix and offset per image: od' = M_i od + b_i.
    """
    n, _, h, w = x.shape
    hed_from_rgb = HED_FROM_RGB.to(x.device, x.dtype)
    rgb_from_hed = RGB_FROM_HED.to(x.device, x.dtype)
    # row-vector convention: od' = (od @ A * scale + shift) @ R, A = HED_FROM_RGB, R = RGB_FROM_HED
    m = hed_from_rgb @ torch.diag_embed(scale) @ rgb_from_hed  # (n, 3, 3)
    b = shift @ rgb_from_hed  # (n, 3)
    od = -torch.log10(x.clamp(min=1 / 255)).reshape(n, 3, h * w)  # 8-bit floor keeps od <= 2.4
    od = torch.baddbmm(b.unsqueeze(2), m.transpose(1, 2), od)  # (n, 3, h*w)
    return torch.pow(10.0, -od).clamp_(0, 1).view(n, 3, h, w)


# ---------------------------------------------------------------- the multi-crop transform


class MultiCrop:
    """DINOv2 multi-crop: 2 global and n_local local crops of every tile, augmented in batches."""

    def __init__(self, *, global_size=224, local_size=96, n_local=8, global_scale=(0.32, 1.0),
                 local_scale=(0.05, 0.32), color_jitter=0.8, grayscale=0.2, blur_global=1.0,
                 blur_local=0.5, solarize=0.2, hed_jitter=0.0, mean=(0.5,) * 3, std=(0.5,) * 3):
        for name, (lo, hi) in {"global_scale": global_scale, "local_scale": local_scale}.items():
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"MultiCrop {name}={(lo, hi)}: need 0 < min <= max <= 1")
        for name, p in {"color_jitter": color_jitter, "grayscale": grayscale, "blur_global": blur_global,
                        "blur_local": blur_local, "solarize": solarize}.items():
            if not 0 <= p <= 1:
                raise ValueError(f"MultiCrop {name}={p}: a probability must be in [0, 1]")
        if not 0 <= hed_jitter < 1:
            raise ValueError(f"MultiCrop hed_jitter={hed_jitter}: need 0 <= hed_jitter < 1 (0 = off)")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"MultiCrop mean={tuple(mean)} std={tuple(std)}: need 3 values each, std > 0")
        if global_size <= 0 or local_size <= 0 or n_local < 0:
            raise ValueError(f"MultiCrop sizes {global_size}, {local_size}, n_local={n_local}: need sizes > 0, n_local >= 0")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.color_jitter, self.grayscale = color_jitter, grayscale
        self.blur_global, self.blur_local, self.solarize = blur_global, blur_local, solarize
        self.hed_jitter = hed_jitter
        self.mean, self.std = tuple(mean), tuple(std)

    def sample_params(self, batch_size: int, height: int, width: int, generator) -> tuple[CropParams, CropParams]:
        """Parameters of the 2*B global and n_local*B local crops, crop-major (index = crop * B + image)."""
        b = batch_size
        common = dict(color_jitter=self.color_jitter, grayscale=self.grayscale, hed_jitter=self.hed_jitter,
                      generator=generator)
        # DINOv2: global crop 1 always blurred (blur_global), crop 2 rarely blurred but maybe solarised
        g_blur = torch.cat([torch.full((b,), self.blur_global), torch.full((b,), SECOND_GLOBAL_BLUR)]).double()
        g_solarize = torch.cat([torch.zeros(b), torch.full((b,), self.solarize)]).double()
        g = sample_crop_params(torch.arange(b).repeat(2), height, width, self.global_scale,
                               blur=g_blur, solarize=g_solarize, **common)
        n = self.n_local * b
        loc = sample_crop_params(torch.arange(b).repeat(self.n_local), height, width, self.local_scale,
                                 blur=torch.full((n,), float(self.blur_local), dtype=torch.float64),
                                 solarize=torch.zeros(n, dtype=torch.float64), **common)
        return g, loc

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - mean) / std as one multiply-add, x * scale + offset: (scale, offset), each (3, 1, 1)."""
        scale = 1 / torch.tensor(self.std, device=device).view(3, 1, 1)
        return scale, -torch.tensor(self.mean, device=device).view(3, 1, 1) * scale

    def _colour(self, x: torch.Tensor, p: CropParams) -> torch.Tensor:
        """The colour ops on float32 crops x (n, 3, S, S) in [0, 1], each on the crops that take it."""
        if self.hed_jitter > 0:
            x = hed_jitter(x, p.hed_scale.to(x.device), p.hed_shift.to(x.device))
        x = _on_subset(x, p.jitter, color_jitter, p.brightness, p.contrast, p.saturation, p.hue)
        x = _on_subset(x, p.gray, lambda y: y.copy_(grayscale(y).expand_as(y)))
        x = _on_subset(x, p.blur, gaussian_blur, p.sigma)
        return _on_subset(x, p.solarize, solarize)

    def render(self, tiles: torch.Tensor, tiles_t: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
        """Apply params to tiles (and their transposes tiles_t) in chunks, one resize per crop: (n, 3, size, size)
        float32, normalised."""
        out = torch.empty(len(params), 3, size, size, device=tiles.device)
        chunk = max(CPU_CHUNK_PIXELS // size**2, 1) if tiles.device.type == "cpu" else max(len(params), 1)
        scale, offset = self._normalisation(tiles.device)
        order, chunks = _group_by_ops(params, chunk)
        params = params[order]  # once: a chunk is then a slice
        for c in chunks:
            idx, p = order[c], params[c]
            x = resized_crops(tiles, tiles_t, p.src, p.box, p.transpose, size)  # (c, 3, S, S) uint8
            x = flips(x, p.hflip, p.vflip)
            # one copy makes it float32 and NCHW (the colour ops work on channel planes): on the CPU
            # 1.5x faster than changing the uint8 layout first
            x = self._colour(torch.empty(x.shape, device=x.device).copy_(x).div_(255), p)
            if tiles.device.type == "cpu":  # row by row: 2.5x faster than index_copy_ on the CPU; a multiply, then
                # an add in cache: 2.6x faster than torch.addcmul's broadcast (the same values where 1 / std is a
                # power of two, as the shipped 0.5; else within an ulp: addcmul rounds once)
                for j, i in enumerate(idx.tolist()):
                    torch.mul(x[j], scale, out=out[i]).add_(offset)
            else:
                out.index_copy_(0, idx.to(out.device), torch.addcmul(offset, x, scale))
        return out

    def render_batched(self, tiles: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
        """The same views as render, with every op called once for all crops of this size."""
        x = batched_resized_crops(tiles, params, size).round_().clamp_(0, 255)  # uint8 values, as render's resize
        scale, offset = self._normalisation(tiles.device)
        return torch.addcmul(offset, self._colour(x.div_(255), params), scale)

    def geometric(self, tiles: torch.Tensor, params: CropParams, size: int, box_scale: int = 1) -> torch.Tensor:
        """The crops of params with their geometry only (box, flips, transpose) and none of the colour ops: (n, 3, size,
        size) float32, normalised. box_scale: tiles has that many times the pixels of the tiles params were drawn on
        (Gram anchoring at gram.scale 2: the same regions at twice the pixels, as DINOv3's undistorted Gram crops)."""
        if tiles.device.type == "cpu":
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        x = resized_crops(tiles, transposed_tiles(tiles), params.src, params.box * box_scale, params.transpose, size)
        x = flips(x, params.hflip, params.vflip)  # (n, 3, size, size) uint8
        scale, offset = self._normalisation(tiles.device)
        return torch.addcmul(offset, x.float().div_(255), scale).contiguous()

    def apply(self, tiles: torch.Tensor, params: tuple[CropParams, CropParams], batched: bool | None = None) -> dict:
        """batched: render_batched (default off the CPU) or render in chunks (default on the CPU)."""
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[1] != 3:
            raise ValueError(f"MultiCrop tiles: got {tiles.dtype} of shape {tuple(tiles.shape)}, "
                             "need uint8 of shape (B, 3, H, W)")
        g, loc = params
        if tiles.device.type != "cpu" if batched is None else batched:
            if tiles.shape[2] != tiles.shape[3]:
                raise ValueError(f"MultiCrop batched mode: tiles of {tiles.shape[2]} x {tiles.shape[3]} px, need square tiles")
            return {"global_crops": self.render_batched(tiles, g, self.global_size),
                    "local_crops": self.render_batched(tiles, loc, self.local_size)}
        if tiles.device.type == "cpu":  # one pass here makes every crop's resize 3x faster
            tiles = tiles.contiguous(memory_format=torch.channels_last)
        tiles_t = transposed_tiles(tiles)
        return {"global_crops": self.render(tiles, tiles_t, g, self.global_size),
                "local_crops": self.render(tiles, tiles_t, loc, self.local_size)}

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator) -> dict:
        """tiles uint8 (B, 3, T, T) on any device; generator a CPU torch.Generator.

        Returns {"global_crops": (2*B, 3, G, G), "local_crops": (n_local*B, 3, L, L)} float32,
        crop-major: global_crops.view(2, B, 3, G, G)[k] is crop k of every tile.
        """
        return self.apply(tiles, self.sample_params(tiles.shape[0], tiles.shape[2], tiles.shape[3], generator))
