"""iBOT block masks, drawn in the collate step (DINOv2's recipe)."""

import math
import random

import numpy as np
import torch

MIN_BLOCK = 4  # patches: smallest rectangle worth adding
ASPECT = (0.3, 1 / 0.3)  # height / width range of a block
ATTEMPTS = 10  # tries per block before giving up on growing a mask


def _add_block(mask: np.ndarray, budget: int, rng: random.Random) -> int:
    """Mask one random rectangle of at most `budget` new patches; returns how many were new (0 = failed)."""
    grid = mask.shape[0]
    for _ in range(ATTEMPTS):
        area = rng.uniform(MIN_BLOCK, budget)
        aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (0 < h < grid and 0 < w < grid):
            continue
        top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
        block = mask[top : top + h, left : left + w]
        new = h * w - int(np.count_nonzero(block))
        if 0 < new <= budget:
            block[:] = True
            return new
    return 0


def block_mask(grid: int, n_masked: int, rng: random.Random) -> torch.Tensor:
    """(grid, grid) bool: a union of random rectangles covering at most n_masked patches.

    Blocks are added until the count is reached or a block cannot be placed within budget,
    so the result may fall a few patches short of n_masked but never exceeds it. Built in numpy: a torch call
    on a 16 x 16 mask costs several times a numpy one (the masks were 6-8% of a full sample's CPU time).
    """
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < n_masked:
        new = _add_block(mask, min(n_masked - count, grid * grid // 2), rng)
        if new == 0:
            break
        count += new
    return torch.from_numpy(mask)


def block_masks(n_images: int, grid: int, ratio_min: float, ratio_max: float, probability: float,
                generator: torch.Generator) -> torch.Tensor:
    """(n_images, grid*grid) bool iBOT masks, True = masked patch.

    int(probability * n_images) images, chosen at random, get a mask; their target ratios are
    stratified over [ratio_min, ratio_max] (image i draws from the i-th of equal sub-intervals), so
    every batch spans the whole range. The others get no masked patch.
    """
    if not 0 <= ratio_min <= ratio_max <= 1:
        raise ValueError(f"block_masks ratio_min={ratio_min}, ratio_max={ratio_max}: need 0 <= min <= max <= 1")
    if not 0 <= probability <= 1:
        raise ValueError(f"block_masks probability={probability}: need a value in [0, 1]")
    # Python's RNG is ~50x cheaper per draw than a torch call; seed it from the torch generator so
    # the masks follow the caller's generator state
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    n_masked_images = int(probability * n_images)
    edges = torch.linspace(ratio_min, ratio_max, n_masked_images + 1).tolist()
    masks = torch.zeros(n_images, grid * grid, dtype=torch.bool)
    chosen = rng.sample(range(n_images), n_masked_images)
    for i, image in enumerate(chosen):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks[image] = block_mask(grid, int(grid * grid * ratio), rng).flatten()
    return masks
