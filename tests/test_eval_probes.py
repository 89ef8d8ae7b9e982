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


def test_knn_vote_matches_hand_computation():
    # unit vectors at angles 0, 10, 80, 90 degrees; labels 0, 0, 1, 1; query at 60 degrees
    ang = torch.tensor([0.0, 10.0, 80.0, 90.0]).deg2rad()
    train = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5]])  # norms must not matter
    y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[math.cos(math.radians(60)), math.sin(math.radians(60))]])
    # k=3: neighbours 80 (cos 20), 90 (cos 30), 10 (cos 50); class 1 gets exp(cos20/T) + exp(cos30/T)
    preds = knn_predict(train, y, q, 2, ks=(1, 3, 4), temperature=0.07)
    assert preds[1].item() == 1 and preds[3].item() == 1
    # k=4 with a large temperature: every vote nearly equal, two each; the hand computation decides
    T = 10.0
    w = [math.exp(math.cos(math.radians(a)) / T) for a in (60, 50, 20, 30)]
    assert knn_predict(train, y, q, 2, ks=(4,), temperature=T)[4].item() == int(w[2] + w[3] > w[0] + w[1])


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
