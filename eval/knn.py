"""k-nearest-neighbour probe on frozen embeddings, DINOv2's protocol.

    python eval/knn.py --ckpt runs/<run>/checkpoints/last --train crc:/data/crc:train --test crc:/data/crc:val
    python eval/knn.py --embeddings runs/<run>/eval/last/crc/embeddings      # reuse extracted embeddings

Embeddings are L2-normalised; a test sample's k most cosine-similar training samples vote for their
class with weight exp(similarity / 0.07); the class with the largest total wins. Similarities are
computed in (test chunk x train chunk) blocks with a running top-k, so memory stays
O(chunk * (chunk + k)) whatever the number of training embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python eval/knn.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
HEADLINE_K = 20  # the k DINOv2 reports


def knn_topk(train_x, test_x, k: int, test_chunk: int = 512, train_chunk: int = 32768):
    """Cosine similarities and indices of the k nearest training rows: ((M, k), (M, k)), sorted descending."""
    import torch
    import torch.nn.functional as F

    test_x = F.normalize(test_x.float(), dim=1)  # (M, D)
    k = min(k, len(train_x))
    sims, idx = [], []
    for q in test_x.split(test_chunk):
        best_s = torch.full((len(q), 0), float("-inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for start in range(0, len(train_x), train_chunk):
            # train rows are normalised chunk by chunk: no second (N, D) copy; the cost is N*D per test chunk
            s = q @ F.normalize(train_x[start:start + train_chunk].float(), dim=1).T  # (m, c)
            cand_s = torch.cat([best_s, s], dim=1)  # (m, k + c): previous best plus this chunk
            cand_i = torch.cat([best_i, torch.arange(start, start + s.shape[1]).expand(len(q), -1)], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims.append(best_s)
        idx.append(best_i)
    return torch.cat(sims), torch.cat(idx)


def knn_predict(train_x, train_y, test_x, num_classes: int, ks=KS, temperature: float = TEMPERATURE, **chunks) -> dict:
    """{k: (M,) predicted classes} for every k in ks (k larger than the training set is clamped)."""
    import torch

    sims, idx = knn_topk(train_x, test_x, max(ks), **chunks)
    neighbour_labels = train_y.long()[idx]  # (M, kmax)
    weights = (sims / temperature).exp()  # (M, kmax)
    preds = {}
    for k in ks:
        votes = torch.zeros(len(sims), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # (M, C) summed weights per class
        preds[k] = votes.argmax(1)
    return preds


def knn_evaluate(train: dict, test: dict, ks=KS, temperature: float = TEMPERATURE) -> dict:
    """{"k20": {accuracy, balanced_accuracy, macro_f1, confusion_matrix}, ...} on cached-embedding dicts."""
    from eval.metrics import classification_metrics

    if train["classes"] != test["classes"]:
        raise ValueError(f"train classes {train['classes']} differ from test classes {test['classes']}")
    c = len(train["classes"])
    preds = knn_predict(train["embeddings"], train["labels"], test["embeddings"], c, ks, temperature)
    return {f"k{k}": classification_metrics(test["labels"], p, c) for k, p in preds.items()}


def main(argv=None):
    from eval.common import (add_data_args, collapse_warnings, embeddings_folder, embeddings_for, markdown_table,
                             prepare_out, provenance, task_name, write_results)
    from eval.extract import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p, val=False)
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="numbers of neighbours")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="vote weight exp(sim / T)")
    args = p.parse_args(argv)
    out = prepare_out(args, "knn")
    data = embeddings_for(args, {"train": args.train, "test": args.test}, embeddings_folder(args, out))
    if "test" not in data:
        raise SystemExit("--test DATASET is needed")
    warnings = collapse_warnings(data)
    per_k = knn_evaluate(data["train"], data["test"], args.k, args.temperature)
    metrics = {"test": {f"{k}/{m}": {"mean": v, "stdev": 0.0, "values": [v]}
                        for k, r in per_k.items() for m, v in r.items() if m != "confusion_matrix"}}
    head_k = f"k{HEADLINE_K if HEADLINE_K in args.k else args.k[0]}"
    results = {
        "protocol": "knn", "task": task_name(args), "classes": data["train"]["classes"],
        **provenance(data), "config": {"k": args.k, "temperature": args.temperature},
        "metrics": metrics,
        "headline": {"metric": f"test/{head_k}/balanced_accuracy", **metrics["test"][f"{head_k}/balanced_accuracy"]},
        "confusion_matrix": {k: r["confusion_matrix"] for k, r in per_k.items()}, "warnings": warnings,
    }
    write_results(out, results, markdown_table(metrics, f"kNN, {results['task']}"))


if __name__ == "__main__":
    main()
