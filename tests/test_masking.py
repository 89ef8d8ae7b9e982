import pytest
import torch

from pathfm.data.masking import block_mask, block_masks


def test_shape_dtype_and_number_of_masked_images():
    masks = block_masks(64, 16, 0.1, 0.5, 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 256) and masks.dtype == torch.bool
    assert (masks.sum(1) > 0).sum() == 32


def test_ratios_spread_over_the_range():
    n, grid = 200, 16
    masks = block_masks(n, grid, 0.1, 0.5, 1.0, torch.Generator().manual_seed(1))
    ratios = masks.sum(1).double() / grid**2
    assert ratios.max() <= 0.5
    assert ratios.min() >= 0.1 - 4 / grid**2  # the last block may fall a few patches short
    assert abs(ratios.mean() - 0.3) < 0.02  # stratified over [0.1, 0.5]
    assert (ratios < 0.15).any() and (ratios > 0.45).any()


def test_deterministic_from_generator():
    a = block_masks(16, 14, 0.1, 0.5, 0.5, torch.Generator().manual_seed(3))
    b = block_masks(16, 14, 0.1, 0.5, 0.5, torch.Generator().manual_seed(3))
    c = block_masks(16, 14, 0.1, 0.5, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_edge_cases():
    assert not block_masks(8, 16, 0.1, 0.5, 0.0, torch.Generator()).any()
    assert not block_masks(8, 16, 0.0, 0.0, 1.0, torch.Generator()).any()
    with pytest.raises(ValueError, match="ratio_min=0.6, ratio_max=0.5"):
        block_masks(8, 16, 0.6, 0.5, 0.5, torch.Generator())


def test_a_small_target_is_one_rectangle():
    import random

    # a budget of 6 patches fits one block of 4 to 6 patches and nothing more
    mask = block_mask(16, 6, random.Random(0))
    rows, cols = mask.nonzero().unbind(1)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 4 <= mask.sum() <= 6 and mask.sum() == h * w


def test_masks_equal_the_torch_built_ones_bit_for_bit():
    """block_mask builds in numpy (cheaper per call on a 16 x 16 grid); the same draws on a torch mask give the
    same masks: the reference below is the torch version it replaced."""
    import math
    import random

    from pathfm.data import masking

    def torch_block_mask(grid, n_masked, rng):
        mask, count = torch.zeros(grid, grid, dtype=torch.bool), 0
        while count < n_masked:
            budget, new = min(n_masked - count, grid * grid // 2), 0
            for _ in range(masking.ATTEMPTS):
                area = rng.uniform(masking.MIN_BLOCK, budget)
                aspect = math.exp(rng.uniform(math.log(masking.ASPECT[0]), math.log(masking.ASPECT[1])))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (0 < h < grid and 0 < w < grid):
                    continue
                top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
                block = mask[top:top + h, left:left + w]
                if 0 < h * w - int(block.sum()) <= budget:
                    new = h * w - int(block.sum())
                    block.fill_(True)
                    break
            if new == 0:
                break
            count += new
        return mask

    for seed in range(20):
        n = random.Random(seed).randint(4, 128)
        assert torch.equal(block_mask(16, n, random.Random(seed)), torch_block_mask(16, n, random.Random(seed)))
