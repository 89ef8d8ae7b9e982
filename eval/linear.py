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
import contextlib
import copy
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/linear.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVA = dict(lr=3e-4, weight_decay=0.01, batch_size=256, max_steps=12_500, patience=400)  # AdamW's default decay
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@contextlib.contextmanager
def cpu_threads_for(n: int, dim: int, device: str = "cpu"):
    """One CPU thread while probing small embedding sets. A probe step on a few thousand numbers is a few
    microseconds of arithmetic, and several threads synchronising on every op cost 50x that on a busy machine
    (9 x 192 embeddings, 13-head grid, 2 shared cores: 24 ms a step with 2 threads, 0.47 ms with 1)."""
    import torch

    small = torch.device(device).type == "cpu" and n * dim <= 2**22  # up to ~4M numbers (16 MB of fp32)
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True)


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
                 monitor: str = "balanced_accuracy", seed: int = 0, device: str = "cpu", progress: bool = False):
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
    bar = _bar(max_steps, f"linear probe (seed {seed})", progress)
    for step, idx, epoch_end in _batches(len(train_x), batch_size, max_steps, generator):
        bar.update()
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
    bar.close()
    head.load_state_dict(best_state)
    return head.cpu(), {"best_step": best_step, "steps": step, "best_val": best}


class LinearGrid:
    """G linear heads in one (D + 1, G * C) matrix (the last row holds the biases), each head with its own
    learning rate (DINOv2's grid).

    Summing the heads' losses gives every head exactly its own gradient, and SGD with momentum is applied per
    head with its own lr, so this trains G independent probes for the price of one matmul. The gradient is
    written out (no autograd): d loss / d logits = (softmax - one_hot) / B, per head; a step is 7 tensor ops.
    """

    def __init__(self, dim: int, num_classes: int, lrs, momentum: float = 0.9, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        G, C = len(lrs), num_classes
        self.num_classes, self.momentum = C, momentum
        self.lrs = torch.tensor(lrs, dtype=torch.float32)  # (G,)
        self.column_lrs = self.lrs.repeat_interleave(C)  # (G*C,): each head's lr on its C columns
        weight = torch.randn(G, dim, C, generator=g) * 0.01  # DINOv2: std 0.01, bias 0
        self.params = torch.cat([weight.permute(1, 0, 2).reshape(dim, G * C), torch.zeros(1, G * C)])  # (D+1, G*C)
        self.buffer = torch.zeros_like(self.params)  # momentum

    @classmethod
    def stack(cls, grids: list["LinearGrid"]) -> "LinearGrid":
        """One grid holding the heads of several (e.g. one per seed), trained together on the same batches."""
        import torch

        out = copy.copy(grids[0])
        out.lrs, out.column_lrs = torch.cat([g.lrs for g in grids]), torch.cat([g.column_lrs for g in grids])
        out.params, out.buffer = torch.cat([g.params for g in grids], 1), torch.cat([g.buffer for g in grids], 1)
        return out

    def to(self, device) -> "LinearGrid":
        for name in ("lrs", "column_lrs", "params", "buffer"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def weight(self):  # (G, D, C)
        D = self.params.shape[0] - 1
        return self.params[:-1].view(D, len(self.lrs), self.num_classes).transpose(0, 1)

    @property
    def bias(self):  # (G, C)
        return self.params[-1].view(len(self.lrs), self.num_classes)

    def logits(self, x):
        G, C = len(self.lrs), self.num_classes
        return (x @ self.params[:-1] + self.params[-1]).view(len(x), G, C).transpose(0, 1)  # (G, B, C)

    def step(self, x1, y, lr_scale: float) -> None:
        """x1: (B, D+1) embeddings with a column of ones appended (it carries the biases); y: (B,) classes."""
        import torch

        B, G, C = len(x1), len(self.lrs), self.num_classes
        d_logits = (x1 @ self.params).view(B, G, C).softmax(-1)  # (B, G, C)
        d_logits[torch.arange(B, device=x1.device), :, y] -= 1  # softmax - one_hot
        # torch.optim.SGD's momentum on the batch-mean gradient
        self.buffer.mul_(self.momentum).add_(x1.T @ d_logits.view(B, G * C), alpha=1 / B)
        self.params.addcmul_(self.buffer, self.column_lrs, value=-lr_scale)


    def predict(self, x):
        import torch

        with torch.no_grad():
            return self.logits(x).argmax(-1)  # (G, N)


def train_linear_grid(train_x, train_y, num_classes: int, *, lrs=DINOV2_LRS, batch_size: int = 256,
                      max_steps: int = 12_500, seed: int = 0, device: str = "cpu", progress: bool = False,
                      seeds=None) -> LinearGrid:
    """The grid trained with SGD and a cosine lr. `seeds`: several seeds' heads in one grid (they then share
    the batch order, which changes nothing when the whole set is one batch); `seed` orders the batches."""
    import torch

    train_x, train_y = train_x.float().to(device), train_y.long().to(device)
    train_x1 = torch.cat([train_x, train_x.new_ones(len(train_x), 1)], 1)  # (N, D+1)
    grid = LinearGrid.stack([LinearGrid(train_x.shape[1], num_classes, lrs, seed=s) for s in (seeds or [seed])])
    grid.to(device)
    generator = torch.Generator().manual_seed(seed)
    bar = _bar(max_steps, f"linear grid, {len(grid.lrs)} heads (seed {seed})", progress)
    with torch.no_grad():
        for step, idx, _ in _batches(len(train_x), batch_size, max_steps, generator):
            scale = 0.5 * (1 + math.cos(math.pi * (step - 1) / max_steps))  # cosine, as the lr of step `step`
            idx = idx.to(device)
            grid.step(train_x1[idx], train_y[idx], scale)
            bar.update()
    bar.close()
    return grid


# ---------------------------------------------------------------------------------------------


def run_probe(data: dict, *, grid: bool = False, runs: int = 5, monitor: str | None = None, device: str = "cpu",
              progress: bool = False, **hparams) -> dict:
    """Train `runs` probes (seeds 0..runs-1) and evaluate them. data: {"train", "val"?, "test"} embedding dicts.
    Returns {"metrics": {split: {metric: {mean, stdev, values}}}, "per_run": [...], "val_is_test": bool}."""
    from eval.metrics import aggregate

    classes = data["train"]["classes"]
    for split, d in data.items():
        if d["classes"] != classes:
            raise ValueError(f"{split} classes {d['classes']} differ from train classes {classes}")
    c = len(classes)
    val = data.get("val", data["test"])
    monitor = monitor or ("balanced_accuracy" if c == 2 else "accuracy")  # eva's monitored metric
    per_run = []
    n, dim = data["train"]["embeddings"].shape
    with cpu_threads_for(n, dim, device):
        if grid and n <= hparams.get("batch_size", EVA["batch_size"]):
            # every step sees the whole set, whatever the seed: train all seeds' heads as one grid
            stacked = train_linear_grid(data["train"]["embeddings"], data["train"]["labels"], c, seeds=range(runs),
                                        device=device, progress=progress, **hparams)
            per_run = [_probe_run(data, val, c, _seed_slice(stacked, s, runs), monitor, s, device, progress, hparams)
                       for s in range(runs)]
        else:
            per_run = [_probe_run(data, val, c, grid, monitor, s, device, progress, hparams) for s in range(runs)]
    metrics = {"val": aggregate([r["val"] for r in per_run]), "test": aggregate([r["test"] for r in per_run])}
    if "val" not in data:
        metrics.pop("val")  # identical to test
    return {"metrics": metrics, "per_run": per_run, "val_is_test": "val" not in data, "monitor": monitor}


def _seed_slice(grid: LinearGrid, seed: int, runs: int) -> LinearGrid:
    """The heads of one seed in a grid stacked over `runs` seeds."""
    G = len(grid.lrs) // runs
    out = copy.copy(grid)
    out.lrs = grid.lrs[seed * G:(seed + 1) * G]
    out.params = grid.params[:, seed * G * grid.num_classes:(seed + 1) * G * grid.num_classes]
    return out


def _probe_run(data, val, c, grid, monitor, seed, device, progress, hparams) -> dict:
    """One seed of run_probe: train (or take the trained LinearGrid), choose on `val`, evaluate on val and test."""
    from eval.metrics import classification_metrics

    if grid:
        g = grid if isinstance(grid, LinearGrid) else train_linear_grid(
            data["train"]["embeddings"], data["train"]["labels"], c, seed=seed, device=device, progress=progress,
            **hparams)
        val_preds = g.predict(val["embeddings"].float().to(device)).cpu()  # (G, N)
        scores = [classification_metrics(val["labels"], p, c)[monitor] for p in val_preds]
        best = max(range(len(scores)), key=scores.__getitem__)
        test_pred = g.predict(data["test"]["embeddings"].float().to(device))[best].cpu()
        info = {"lr": float(g.lrs[best]), "val_scores": scores}
        val_pred = val_preds[best]
    else:
        head, info = train_linear(data["train"]["embeddings"], data["train"]["labels"], val["embeddings"],
                                  val["labels"], c, monitor=monitor, seed=seed, device=device, progress=progress,
                                  **hparams)
        val_pred = predict(head, val["embeddings"].float(), c)
        test_pred = predict(head, data["test"]["embeddings"].float(), c)
    return {"seed": seed, **info,
            "val": classification_metrics(val["labels"], val_pred, c),
            "test": classification_metrics(data["test"]["labels"], test_pred, c)}


def main(argv=None):
    from eval.common import (add_data_args, collapse_warnings, embeddings_folder, embeddings_for, markdown_table,
                             prepare_out, provenance, task_name, write_results)
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
    data = embeddings_for(args, {"train": args.train, "val": args.val, "test": args.test}, embeddings_folder(args, out))
    if "test" not in data:
        raise SystemExit("--test DATASET is needed")
    warnings = collapse_warnings(data)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hparams = dict(batch_size=args.probe_batch_size, max_steps=args.max_steps)
    if not args.grid:
        hparams.update(lr=args.lr, patience=args.patience)
    r = run_probe(data, grid=args.grid, runs=args.runs, monitor=args.monitor, device=device, progress=True, **hparams)
    head = r["metrics"]["test"]["balanced_accuracy"]
    results = {"protocol": "linear_grid" if args.grid else "linear", "task": task_name(args),
               "classes": data["train"]["classes"], **provenance(data), "config": {**hparams, "runs": args.runs},
               "monitor": r["monitor"], "val_is_test": r["val_is_test"], "metrics": r["metrics"],
               "headline": {"metric": "test/balanced_accuracy", **head}, "per_run": r["per_run"],
               "warnings": warnings}
    title = f"linear probe ({results['protocol']}), {results['task']}, {args.runs} runs"
    write_results(out, results, markdown_table(r["metrics"], title))


if __name__ == "__main__":
    main()
