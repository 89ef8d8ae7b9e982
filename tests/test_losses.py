import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pathfm.losses import Centering, dino_loss, ibot_loss, kde_loss, koleo_loss, sinkhorn_knopp

LOG2 = math.log(2)


def logits_of(probs):
    # softmax(log p) = p when p sums to 1, so these logits have the given probabilities at temperature 1
    return torch.tensor(probs).log()


# ---------------------------------------------------------------- DINO


def test_dino_loss_by_hand():
    # 2 crops x 2 images x 3 prototypes. Pairs of different views: (teacher 0, student 1), (teacher 1, student 0).
    teacher = torch.tensor([[[1.0, 0, 0], [0, 1, 0]],          # teacher crop 0: images a, b
                            [[0, 0, 1.0], [0.5, 0.5, 0]]])     # teacher crop 1
    student = logits_of([[[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]],   # student crop 0
                         [[1 / 4, 1 / 4, 1 / 2], [1 / 2, 1 / 4, 1 / 4]]])  # student crop 1
    # (t0, s1): a -log(1/4) = 2 log2, b -log(1/4) = 2 log2         -> mean 2 log2
    # (t1, s0): a -log(1/4) = 2 log2, b -(log(1/4) + log(1/2))/2 = 1.5 log2 -> mean 1.75 log2
    # average of the two pairs: 1.875 log2
    expected = 1.875 * LOG2
    torch.testing.assert_close(dino_loss(student, teacher, 1.0), torch.tensor(expected))
    # temperature divides the logits: logits * 0.5 at temperature 0.5 are the same distributions
    torch.testing.assert_close(dino_loss(student * 0.5, teacher, 0.5), torch.tensor(expected))


def test_dino_loss_with_local_crops_matches_pair_loop():
    torch.manual_seed(0)
    student = torch.randn(5, 4, 7)  # 2 global + 3 local crops, B=4, K=7
    teacher = torch.softmax(torch.randn(2, 4, 7), dim=-1)
    terms = [-(teacher[t] * F.log_softmax(student[s] / 0.1, -1)).sum(-1).mean()
             for t in range(2) for s in range(5) if s != t]
    assert len(terms) == 8
    torch.testing.assert_close(dino_loss(student, teacher, 0.1), torch.stack(terms).mean())


def test_dino_loss_against_itself_is_entropy():
    p = torch.tensor([0.7, 0.2, 0.1])
    entropy = -(p * p.log()).sum()
    probs = p.expand(2, 3, 3)  # 2 crops, 3 images, all the same distribution
    torch.testing.assert_close(dino_loss(probs.log(), probs, 1.0), entropy)


def test_dino_loss_needs_a_pair():
    with pytest.raises(ValueError, match="no pair"):
        dino_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 0.1)


def test_centering_by_hand():
    c = Centering(3, momentum=0.9)
    c.update(torch.tensor([[1.0, 2, 3], [3, 4, 5]]))  # batch mean (2, 3, 4); centre 0.9 * 0 + 0.1 * mean
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.3, 0.4]]))
    c.update(torch.zeros(2, 2, 3))  # any leading dims; mean 0 -> centre 0.9 * previous
    torch.testing.assert_close(c.center, torch.tensor([[0.18, 0.27, 0.36]]))
    # logits equal to the centre: uniform; centre + T * log p: p
    torch.testing.assert_close(c.probs(c.center.expand(4, 3), 0.04), torch.full((4, 3), 1 / 3))
    p = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(c.probs(c.center + 0.04 * p.log(), 0.04), p)
    assert "center" in c.state_dict()


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_knopp_marginals():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)  # N=12, K=4
    q = sinkhorn_knopp(logits, 0.1, n_iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # the last step normalises rows exactly
    q = sinkhorn_knopp(logits, 0.1, n_iters=200)
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 12 / 4), atol=1e-4, rtol=0)
    # logits all equal: uniform
    torch.testing.assert_close(sinkhorn_knopp(torch.zeros(6, 3), 0.05), torch.full((6, 3), 1 / 3))


def test_sinkhorn_knopp_by_hand_one_iteration():
    # N=2, K=2, T=1, Q = exp(logits) = [[2, 1], [1, 1]] (rows samples). One iteration:
    # prototype (column) sums 3 and 2 -> columns /3, /2 -> [[2/3, 1/2], [1/3, 1/2]];
    # then rows normalised: [[4/7, 3/7], [2/5, 3/5]]
    q = sinkhorn_knopp(torch.tensor([[2.0, 1.0], [1.0, 1.0]]).log(), 1.0, n_iters=1)
    torch.testing.assert_close(q, torch.tensor([[4 / 7, 3 / 7], [2 / 5, 3 / 5]]))


def test_sinkhorn_knopp_large_logits_stay_finite():
    q = sinkhorn_knopp(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), 0.005)  # exp(200) overflows fp32
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------- 2 gloo processes


def _distributed_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    logits = torch.randn(8, 5)  # the same full batch on both ranks; each takes its rows
    results = {
        # equal halves
        "even": sinkhorn_knopp(logits[rank * 4:(rank + 1) * 4], 0.1, n_iters=3),
        # uneven split 3 / 5 (like iBOT masked patches): no rank needs the total row count
        "uneven": sinkhorn_knopp(logits[:3] if rank == 0 else logits[3:], 0.1, n_iters=3),
        # rank 0 has no rows at all
        "empty": sinkhorn_knopp(logits[:0] if rank == 0 else logits, 0.1, n_iters=3),
    }
    centering = Centering(5, momentum=0.9)
    centering.update(logits[:1] if rank == 0 else logits[1:4])  # 1 + 3 rows
    results["center"] = centering.center
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    full = sinkhorn_knopp(logits, 0.1, n_iters=3)
    torch.testing.assert_close(torch.cat([r0["even"], r1["even"]]), full)
    torch.testing.assert_close(torch.cat([r0["uneven"], r1["uneven"]]), full)
    assert r0["empty"].shape == (0, 5)
    torch.testing.assert_close(r1["empty"], full)
    # centre: 0.1 x mean over the 4 rows of both ranks (not the mean of the two rank means)
    expected = 0.1 * logits[:4].mean(0, keepdim=True)
    torch.testing.assert_close(r0["center"], expected)
    torch.testing.assert_close(r1["center"], expected)


# ---------------------------------------------------------------- iBOT


def test_ibot_loss_by_hand():
    # 3 images x 3 patches; image 0 has 2 masked patches, image 1 none, image 2 one.
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    student = logits_of([[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 4, 1 / 2]])
    teacher = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    # CE per patch: log2, 2 log2 (image 0, weight 1/2 each), log2 (image 2, weight 1)
    # sum 0.5 log2 + log2 + log2 = 2.5 log2, over 3 images
    torch.testing.assert_close(ibot_loss(student, teacher, masks, 1.0), torch.tensor(2.5 * LOG2 / 3))


def test_ibot_loss_rows_must_match_masks():
    masks = torch.tensor([[True, False]])
    with pytest.raises(ValueError, match="masks select 1 patches but got 2 student"):
        ibot_loss(torch.zeros(2, 3), torch.zeros(2, 3), masks, 0.1)


# ---------------------------------------------------------------- KoLeo and KDE

# three points on the unit circle at 0, 60 and 180 degrees, given at different lengths
# (the losses normalise): squared distances a-b 1, b-c 3, a-c 4
THREE = torch.tensor([[3.0, 0.0], [0.5, math.sqrt(3) / 2], [-2.0, 0.0]])


def test_koleo_by_hand():
    # nearest neighbours: a -> b (1), b -> a (1), c -> b (sqrt 3); loss -(0 + 0 + log sqrt3) / 3
    torch.testing.assert_close(koleo_loss(THREE), torch.tensor(-math.log(3) / 6))


def test_koleo_duplicated_points_finite():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() > 10  # two points at distance ~0: -log(~1e-8) each


def test_kde_by_hand():
    # bandwidth h = 1/sqrt2: log k = -d^2 / (2 h^2) = -d^2. Leave-one-out mean over the other 2 points:
    # a: log((e^-1 + e^-4) / 2), b: log((e^-1 + e^-3) / 2), c: log((e^-4 + e^-3) / 2); loss = mean
    e = math.exp
    expected = (math.log((e(-1) + e(-4)) / 2) + math.log((e(-1) + e(-3)) / 2) + math.log((e(-4) + e(-3)) / 2)) / 3
    torch.testing.assert_close(kde_loss(THREE, bandwidth=2 ** -0.5), torch.tensor(expected))


def test_kde_prefers_spread_points_and_is_bounded_on_duplicates():
    torch.manual_seed(0)
    spread = torch.randn(32, 16)
    clustered = torch.randn(1, 16) + 0.05 * torch.randn(32, 16)
    assert kde_loss(spread) < kde_loss(clustered)
    x = torch.ones(4, 3, requires_grad=True)  # all identical: every kernel is 1, loss log 1 = 0
    loss = kde_loss(x, bandwidth=0.1)
    loss.backward()
    # 0 up to fp32 rounding of 2 - 2 z.z, amplified by 1 / (2 h^2) = 50
    assert loss.item() == pytest.approx(0.0, abs=1e-4) and torch.isfinite(x.grad).all()
    # a small bandwidth makes far kernels underflow fp32 (exp(-200)); logsumexp keeps the loss finite
    assert torch.isfinite(kde_loss(torch.tensor([[1.0, 0], [-1.0, 0]]), bandwidth=0.1))


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("name", ["dino", "sinkhorn", "centering", "ibot", "koleo", "kde"])
def test_fp32_under_bf16_autocast(name):
    # bf16 inputs (as a bf16 head would give) under CPU bf16 autocast: the loss is fp32 and equals
    # the loss of the same values upcast to fp32 outside autocast (inside, matmuls would run in bf16)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64).bfloat16()  # (crops, B, K)
    probs = torch.softmax(torch.randn(2, 16, 64), -1).bfloat16()
    masks = torch.rand(16, 4) < 0.5
    fns = {
        "dino": lambda x, p: dino_loss(x, p, 0.1),
        "sinkhorn": lambda x, p: sinkhorn_knopp(x[0], 0.04),
        "centering": lambda x, p: Centering(64).probs(x, 0.04),
        "ibot": lambda x, p: ibot_loss(x.reshape(32, 64)[: int(masks.sum())], p.reshape(32, 64)[: int(masks.sum())],
                                       masks, 0.1),
        "koleo": lambda x, p: koleo_loss(x[0]),
        "kde": lambda x, p: kde_loss(x[0], bandwidth=0.1),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fns[name](x, probs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fns[name](x.float(), probs.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("error")  # metrics.spread on a tensor with a graph must not warn
def test_a_gradient_step_on_the_kde_term_spreads_the_embeddings():
    # The sign Midnight means: its KDE term replaces KoLeo "to ensure embedding diversity" (kaiko-ai/Midnight), so
    # a step that lowers it must push the CLS embeddings apart; with the opposite sign it would pull them together
    # (collapse). pathfm minimises the mean log-density of the batch at its own points.
    from pathfm.metrics import spread

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 16, generator=g) + 0.3 * torch.randn(32, 16, generator=g)).requires_grad_()  # a tight cluster
    kde_loss(x).backward()
    with torch.no_grad():
        stepped = x - 20.0 * x.grad  # (the gradient of unit-sphere distances is small for rows of norm ~4)
    assert kde_loss(stepped) < kde_loss(x)
    assert spread(stepped) > spread(x) + 0.01  # spread: 1 - |mean unit vector|^2, 0 = all one direction
