"""Linear probe on frozen embeddings: eva's protocol (default) or a DINOv2-style learning-rate grid.

    python eval/linear.py --ckpt runs/<run>/checkpoints/last --train bach:/data/bach:train --test bach:/data/bach:val
    python eval/linear.py --embeddings runs/<run>/eval/last/bach/embeddings --grid

eva (the kaiko.ai paper's numbers): one linear layer on the CLS embedding, AdamW lr 3e-4 with a cosine
schedule, batch 256, at most 12,500 steps, validation once per epoch, early stopping after 400
validations without improvement, the best validation state evaluated; 5 runs (seeds 0-4), mean and
standard deviation. Binary tasks use one logit and a sigmoid, as eva does. Like eva, tasks that ship
no separate validation set (BACH, CRC, MHIST) use the evaluation set for model selection.

grid (DINOv2): 13 heads with learning rates 1e-5 ... 0.1, SGD momentum 0.9, cosine schedule, trained
together on the same batches (one pass over the embeddings serves them all); the head with the best
validation score is reported.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/linear.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVA = dict(lr=3e-4, weight_decay=0.01, batch_size=256, max_steps=12_500, patience=400)  # AdamW's default decay
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def _batches(n: int, batch_size: int, max_steps: int, generator):
    """(step, index batch) over shuffled epochs until max_steps; the flag marks the last batch of an epoch."""
    import torch

    step = 0
    while True:
        batches = torch.randperm(n, generator=generator).split(batch_size)
        for i, idx in enumerate(batches):
            step += 1
            yield step, idx, i == len(batches) - 1
            if step >= max_steps:
                return


def predict(head, x, num_classes: int, batch: int = 65536):
    """(N, D) embeddings -> (N,) classes; a one-logit head (binary) predicts class 1 when the logit > 0."""
    import torch

    with torch.no_grad():
        logits = torch.cat([head(chunk) for chunk in x.split(batch)])
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def train_linear(train_x, train_y, val_x, val_y, num_classes: int, *, lr=EVA["lr"], weight_decay=EVA["weight_decay"],
                 batch_size=EVA["batch_size"], max_steps=EVA["max_steps"], patience=EVA["patience"],
                 monitor: str = "balanced_accuracy", seed: int = 0, device: str = "cpu"):
    """eva's head training. Returns (best head on CPU, {"best_step", "steps", "best_val"})."""
    import copy

    import torch
    import torch.nn.functional as F

    from eval.metrics import classification_metrics

    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    val_x, val_y = val_x.float().to(device), val_y.long().to(device)
    binary = num_classes == 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(train_x.shape[1], 1 if binary else num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps)))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_step, stale, step = -1.0, None, 0, 0, 0
    for step, idx, epoch_end in _batches(len(train_x), batch_size, max_steps, generator):
        idx = idx.to(device)
        logits = head(train_x[idx])  # (b, 1) or (b, C)
        y = train_y[idx]
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float()) if binary else F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if epoch_end or step == max_steps:  # validate once per epoch, as eva does
            score = classification_metrics(val_y.cpu(), predict(head, val_x, num_classes).cpu(), num_classes)[monitor]
            if score > best:
                best, best_state, best_step, stale = score, copy.deepcopy(head.state_dict()), step, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    head.load_state_dict(best_state)
    return head.cpu(), {"best_step": best_step, "steps": step, "best_val": best}


class LinearGrid:
    """G linear heads in one (G, D, C) tensor, each with its own learning rate (DINOv2's grid).

    Summing the heads' losses gives every head exactly its own gradient, and SGD with momentum is applied
    per head with its own lr, so this trains G independent probes for the price of one batched matmul.
    """

    def __init__(self, dim: int, num_classes: int, lrs, momentum: float = 0.9, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.lrs = torch.tensor(lrs, dtype=torch.float32)  # (G,)
        self.weight = (torch.randn(len(lrs), dim, num_classes, generator=g) * 0.01).requires_grad_()  # DINOv2: std 0.01
        self.bias = torch.zeros(len(lrs), num_classes, requires_grad=True)
        self.momentum = momentum
        self.buffers = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]

    def logits(self, x):
        G, D, C = self.weight.shape
        # one (B, D) @ (D, G*C) matmul for all heads (a batched (G, D, C) matmul would copy x G times)
        out = (x @ self.weight.permute(1, 0, 2).reshape(D, G * C)).view(len(x), G, C)
        return out.transpose(0, 1) + self.bias[:, None]  # (G, B, C)

    def step(self, x, y, lr_scale: float) -> None:
        import torch
        import torch.nn.functional as F

        logits = self.logits(x)  # (G, B, C)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(self.lrs)), reduction="sum") / len(y)
        grads = torch.autograd.grad(loss, [self.weight, self.bias])
        with torch.no_grad():
            for p, g, buf in zip((self.weight, self.bias), grads, self.buffers):
                buf.mul_(self.momentum).add_(g)  # torch.optim.SGD's momentum (dampening 0)
                lr = (self.lrs * lr_scale).view(-1, *[1] * (p.dim() - 1))
                p.sub_(lr * buf)

    def predict(self, x):
        import torch

        with torch.no_grad():
            return self.logits(x).argmax(-1)  # (G, N)


def train_linear_grid(train_x, train_y, num_classes: int, *, lrs=DINOV2_LRS, batch_size: int = 256,
                      max_steps: int = 12_500, seed: int = 0, device: str = "cpu") -> LinearGrid:
    import torch

    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    grid = LinearGrid(train_x.shape[1], num_classes, lrs, seed=seed)
    for name in ("weight", "bias"):
        setattr(grid, name, getattr(grid, name).detach().to(device).requires_grad_())
    grid.buffers = [b.to(device) for b in grid.buffers]
    grid.lrs = grid.lrs.to(device)
    generator = torch.Generator().manual_seed(seed)
    for step, idx, _ in _batches(len(train_x), batch_size, max_steps, generator):
        scale = 0.5 * (1 + math.cos(math.pi * (step - 1) / max_steps))  # cosine, as the lr of step `step`
        idx = idx.to(device)
        grid.step(train_x[idx], train_y[idx], scale)
    return grid


# ---------------------------------------------------------------------------------------------


def run_probe(data: dict, *, grid: bool = False, runs: int = 5, monitor: str | None = None, device: str = "cpu",
              **hparams) -> dict:
    """Train `runs` probes (seeds 0..runs-1) and evaluate them. data: {"train", "val"?, "test"} embedding dicts.
    Returns {"metrics": {split: {metric: {mean, stdev, values}}}, "per_run": [...], "val_is_test": bool}."""
    from eval.metrics import aggregate, classification_metrics

    classes = data["train"]["classes"]
    for split, d in data.items():
        if d["classes"] != classes:
            raise ValueError(f"{split} classes {d['classes']} differ from train classes {classes}")
    c = len(classes)
    val = data.get("val", data["test"])
    monitor = monitor or ("balanced_accuracy" if c == 2 else "accuracy")  # eva's monitored metric
    per_run = []
    for seed in range(runs):
        if grid:
            g = train_linear_grid(data["train"]["embeddings"], data["train"]["labels"], c, seed=seed, device=device,
                                  **hparams)
            val_preds = g.predict(val["embeddings"].float().to(device)).cpu()  # (G, N)
            scores = [classification_metrics(val["labels"], p, c)[monitor] for p in val_preds]
            best = max(range(len(scores)), key=scores.__getitem__)
            test_pred = g.predict(data["test"]["embeddings"].float().to(device))[best].cpu()
            info = {"lr": float(g.lrs[best]), "val_scores": scores}
            val_pred = val_preds[best]
        else:
            head, info = train_linear(data["train"]["embeddings"], data["train"]["labels"], val["embeddings"],
                                      val["labels"], c, monitor=monitor, seed=seed, device=device, **hparams)
            val_pred = predict(head, val["embeddings"].float(), c)
            test_pred = predict(head, data["test"]["embeddings"].float(), c)
        run = {"seed": seed, **info,
               "val": classification_metrics(val["labels"], val_pred, c),
               "test": classification_metrics(data["test"]["labels"], test_pred, c)}
        per_run.append(run)
    metrics = {"val": aggregate([r["val"] for r in per_run]), "test": aggregate([r["test"] for r in per_run])}
    if "val" not in data:
        metrics.pop("val")  # identical to test
    return {"metrics": metrics, "per_run": per_run, "val_is_test": "val" not in data, "monitor": monitor}


def main(argv=None):
    from eval.common import (add_data_args, embeddings_for, markdown_table, prepare_out, provenance,
                             task_name, write_results)
    from eval.extract import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, val=True)
    p.add_argument("--grid", action="store_true", help="DINOv2 learning-rate grid instead of eva's single AdamW run")
    p.add_argument("--runs", type=int, default=5, help="independent runs (seeds 0..runs-1)")
    p.add_argument("--lr", type=float, default=EVA["lr"], help="eva mode learning rate")
    p.add_argument("--max-steps", type=int, default=EVA["max_steps"])
    p.add_argument("--patience", type=int, default=EVA["patience"], help="eva mode: validations without improvement")
    p.add_argument("--probe-batch-size", type=int, default=EVA["batch_size"])
    p.add_argument("--monitor", choices=("accuracy", "balanced_accuracy", "macro_f1"),
                   help="validation metric for early stopping / lr choice (eva: balanced accuracy for binary tasks, "
                        "accuracy otherwise)")
    args = p.parse_args(argv)
    out = prepare_out(args, "linear_grid" if args.grid else "linear")
    data = embeddings_for(args, {"train": args.train, "val": args.val, "test": args.test}, out.parent / "embeddings")
    if "test" not in data:
        raise SystemExit("--test DATASET is needed")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hparams = dict(batch_size=args.probe_batch_size, max_steps=args.max_steps)
    if not args.grid:
        hparams.update(lr=args.lr, patience=args.patience)
    r = run_probe(data, grid=args.grid, runs=args.runs, monitor=args.monitor, device=device, **hparams)
    head = r["metrics"]["test"]["balanced_accuracy"]
    results = {"protocol": "linear_grid" if args.grid else "linear", "task": task_name(args),
               "classes": data["train"]["classes"], **provenance(data), "config": {**hparams, "runs": args.runs},
               "monitor": r["monitor"], "val_is_test": r["val_is_test"], "metrics": r["metrics"],
               "headline": {"metric": "test/balanced_accuracy", **head}, "per_run": r["per_run"]}
    title = f"linear probe ({results['protocol']}), {results['task']}, {args.runs} runs"
    write_results(out, results, markdown_table(r["metrics"], title))


if __name__ == "__main__":
    main()
