"""Probe and metric math: hand-computed values, chance on shuffled labels, alternative paths agree."""

import math

import pytest
import torch
import torch.nn.functional as F

from eval.knn import knn_predict, knn_topk
from eval.linear import LinearGrid, run_probe, train_linear, train_linear_grid
from eval.metrics import aggregate, classification_metrics
from eval.unsupervised import alignment, participation_ratio, rankme, uniformity


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: thread hand-offs on two busy cores cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _split(x, y, classes):
    return {"embeddings": x, "labels": y, "classes": classes}


def _clusters(n, c, d=16, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(n) % c
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_balanced_accuracy_differs_from_accuracy_on_imbalanced_labels():
    labels = torch.tensor([0] * 8 + [1] * 2)
    m = classification_metrics(labels, torch.zeros(10, dtype=torch.long), 2)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # recall 1.0 on class 0, 0.0 on class 1
    assert m["macro_f1"] == pytest.approx((2 * 8 / 18 + 0) / 2)
    assert m["confusion_matrix"] == [[8, 0], [2, 0]]


def test_aggregate_is_evas_layout():
    out = aggregate([{"accuracy": 0.5, "cm": [[1]]}, {"accuracy": 0.7, "cm": [[1]]}])
    assert set(out) == {"accuracy"}
    assert out["accuracy"]["mean"] == pytest.approx(0.6) and out["accuracy"]["values"] == [0.5, 0.7]
    assert out["accuracy"]["stdev"] == pytest.approx(math.sqrt(0.02))  # sample standard deviation


def _unit(*degrees):
    a = torch.tensor(degrees).deg2rad()
    return torch.stack([a.cos(), a.sin()], 1)


def _vote(cosines, labels, T, k):
    """DINOv2's vote by hand: the k most similar each add exp(cos / T) to their class."""
    order = sorted(range(len(cosines)), key=lambda i: -cosines[i])[:k]
    votes = {}
    for i in order:
        votes[labels[i]] = votes.get(labels[i], 0.0) + math.exp(cosines[i] / T)
    return max(votes, key=votes.get)


def test_knn_vote_matches_hand_computation():
    # query at 0 degrees. Case 1: one class-0 neighbour at 5 degrees against two class-1 ones at +-30:
    # the majority says 1, the temperature-weighted vote says 0 (exp(cos 5 / 0.07) > 2 exp(cos 30 / 0.07)),
    # and without the temperature (exp(cos)) it would say 1.
    train = _unit(5.0, 30.0, -30.0) * torch.tensor([[2.0], [0.5], [3.0]])  # norms must not matter
    y, cos = [0, 1, 1], [math.cos(math.radians(a)) for a in (5, 30, -30)]
    assert _vote(cos, y, 0.07, 3) == 0 and _vote(cos, y, 1.0, 3) == 1
    assert knn_predict(train, torch.tensor(y), _unit(0.0), 2, ks=(3,), temperature=0.07)[3].item() == 0
    assert knn_predict(train, torch.tensor(y), _unit(0.0), 2, ks=(3,), temperature=1.0)[3].item() == 1
    # case 2: class 0 at 10 degrees, class 1 at +-12: k = 1 says 0, k = 3 says 1 (2 exp(cos 12 / T) wins)
    train = _unit(10.0, 12.0, -12.0)
    cos = [math.cos(math.radians(a)) for a in (10, 12, -12)]
    assert _vote(cos, y, 0.07, 1) == 0 and _vote(cos, y, 0.07, 3) == 1
    preds = knn_predict(train, torch.tensor(y), _unit(0.0), 2, ks=(1, 3), temperature=0.07)
    assert (preds[1].item(), preds[3].item()) == (0, 1)
    # both cases as one batch of queries, each its own answer: rows are not mixed up
    train = torch.cat([_unit(5.0, 30.0, -30.0), _unit(100.0, 102.0, 78.0)])
    both = knn_predict(train, torch.tensor([0, 1, 1, 2, 1, 1]), _unit(0.0, 90.0), 3, ks=(1, 3), temperature=0.07)
    assert both[1].tolist() == [0, 2] and both[3].tolist() == [0, 1]
    # k = 4 with a large temperature: every vote nearly equal, two each; the hand computation decides
    train = _unit(0.0, 10.0, 80.0, 90.0) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])
    cos = [math.cos(math.radians(a - 60)) for a in (0, 10, 80, 90)]
    assert knn_predict(train, torch.tensor([0, 0, 1, 1]), _unit(60.0), 2, ks=(4,), temperature=10.0)[4].item() == \
        _vote(cos, [0, 0, 1, 1], 10.0, 4)


def test_knn_chunked_topk_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(57, 8, generator=g), torch.randn(11, 8, generator=g)
    s, i = knn_topk(train, test, 7, test_chunk=3, train_chunk=5)
    full = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    ref_s, ref_i = full.topk(7, dim=1)
    assert torch.allclose(s, ref_s, atol=1e-6) and torch.equal(i, ref_i)


def test_probes_reach_one_on_separable_and_chance_on_shuffled_labels():
    for c in (2, 4):  # binary (one logit, eva) and multiclass
        x, y = _clusters(400, c)
        xt, yt = _clusters(200, c, seed=1)
        data = {"train": _split(x, y, list("abcd")[:c]), "test": _split(xt, yt, list("abcd")[:c])}
        r = run_probe(data, runs=2, max_steps=200, lr=1e-2)  # eva's 3e-4 suits real embeddings, not these
        assert r["metrics"]["test"]["balanced_accuracy"]["mean"] == 1.0 and r["val_is_test"]
        assert knn_predict(x, y, xt, c, ks=(10,))[10].eq(yt).all()
        g = run_probe(data, grid=True, runs=1, max_steps=200)
        assert g["metrics"]["test"]["balanced_accuracy"]["mean"] == 1.0
    # labels unrelated to the embeddings: a probe can only guess
    gen = torch.Generator().manual_seed(3)
    x, xt = torch.randn(2000, 32, generator=gen), torch.randn(2000, 32, generator=gen)
    y, yt = torch.randint(0, 4, (2000,), generator=gen), torch.randint(0, 4, (2000,), generator=gen)
    head, _ = train_linear(x, y, x[:500], y[:500], 4, max_steps=300, patience=3)
    from eval.linear import predict

    assert abs(classification_metrics(yt, predict(head, xt, 4), 4)["balanced_accuracy"] - 0.25) < 0.05
    assert abs(classification_metrics(yt, knn_predict(x, y, xt, 4, ks=(20,))[20], 4)["balanced_accuracy"] - 0.25) < 0.05


def _noisy_labels(n, seed, noise_dims, flip, noise=0.5):
    """Class = sign of feature 0 (+-3, sd 1) plus `noise_dims` features of pure noise; the first `flip` share of the
    labels flipped. Few noisy training points in many dimensions: a short or slow fit finds feature 0, a long or fast
    one memorises the flipped labels through the noise features, and clean held-out data shows the difference."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.cat([(2 * y[:, None] - 1) * 3.0 + torch.randn(n, 1, generator=g),
                   noise * torch.randn(n, noise_dims, generator=g)], 1)
    y[: int(flip * n)] = 1 - y[: int(flip * n)]
    return x, y


def test_lr_grid_chooses_on_validation_where_only_middle_lrs_succeed():
    from eval.linear import DINOV2_LRS

    data = {split: _split(*_noisy_labels(n, seed, 100, flip), ["a", "b"])
            for split, n, seed, flip in (("train", 40, 0, 0.3), ("val", 400, 1, 0.0), ("test", 400, 2, 0.0))}
    r = run_probe(data, grid=True, runs=1, max_steps=200)
    (run,) = r["per_run"]
    # the validation scores by hand: the same grid (same seed, same full batch), each head on the val split
    grid = train_linear_grid(data["train"]["embeddings"], data["train"]["labels"], 2, max_steps=200, seed=0)
    val = [classification_metrics(data["val"]["labels"], p, 2)["balanced_accuracy"]
           for p in grid.predict(data["val"]["embeddings"])]
    assert run["val_scores"] == pytest.approx(val)
    assert max(val[:2]) < 0.9 and max(val[-3:]) < 0.9 and max(val) == 1.0  # the slowest and fastest heads fail
    best = val.index(max(val))
    assert run["lr"] == pytest.approx(DINOV2_LRS[best]) and 1e-5 < run["lr"] < 2e-2
    test_pred = grid.predict(data["test"]["embeddings"])[best]
    assert run["test"] == classification_metrics(data["test"]["labels"], test_pred, 2)  # that head, on the test split
    assert run["test"]["balanced_accuracy"] > 0.95 and not r["val_is_test"]


def test_eva_probe_returns_the_head_of_its_best_validation():
    x, y = _noisy_labels(16, 0, 30, 0.25, noise=0.3)
    xv, yv = _noisy_labels(200, 1, 30, 0.0, noise=0.3)
    xt, yt = _noisy_labels(200, 2, 30, 0.0, noise=0.3)
    head, info = train_linear(x, y, xv, yv, 2, lr=0.05, weight_decay=0.0, max_steps=80, patience=1000)
    # validated at every step (one batch per epoch); the best comes early, then the flipped labels are memorised
    # (the last head scores about 0.8 on val: returning it instead of the best one fails the next lines)
    assert 1 < info["best_step"] < info["steps"] == 80 and info["best_val"] > 0.95
    from eval.linear import predict

    assert classification_metrics(yv, predict(head, xv, 2), 2)["balanced_accuracy"] == info["best_val"]
    assert classification_metrics(yt, predict(head, xt, 2), 2)["balanced_accuracy"] > 0.9  # and on the test split


def test_linear_grid_equals_independent_sgd_heads():
    x, y = _clusters(300, 3, d=8, spread=2.0)
    lrs, steps, bs = (0.01, 0.3), 25, 64
    grid = train_linear_grid(x, y, 3, lrs=lrs, batch_size=bs, max_steps=steps, seed=5)
    init = LinearGrid(8, 3, lrs, seed=5)
    for g, lr in enumerate(lrs):
        head = torch.nn.Linear(8, 3)
        with torch.no_grad():
            head.weight.copy_(init.weight[g].T)
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(5)  # the same batches as the grid
        done = 0
        while done < steps:
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                opt.zero_grad()
                F.cross_entropy(head(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
                done += 1
                if done == steps:
                    break
        assert torch.allclose(grid.weight[g].detach(), head.weight.detach().T, atol=1e-5)
        assert torch.allclose(grid.bias[g].detach(), head.bias.detach(), atol=1e-5)


def test_rank_and_sphere_metrics_hand_values():
    assert rankme(torch.eye(4)) == pytest.approx(4.0, rel=1e-5)  # four equal singular values
    assert rankme(torch.ones(6, 3)) == pytest.approx(1.0, rel=1e-5)  # rank one
    z = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])  # variance 0.5, 0.5, 0
    assert participation_ratio(z) == pytest.approx(2.0)
    assert uniformity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-8.0)  # |u - v|^2 = 4, t = 2
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)
    assert alignment(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])) == pytest.approx(2.0)
