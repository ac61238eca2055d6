"""Child-Sum Tree-LSTM over the Python standard library's function ASTs (the demo job).

Task (code2vec-style): from a function's body, predict the first word of its name (`get`,
`set`, `is`, `_`, ...) among the 20 most frequent. The model is written for ONE tree
(dynbatch/models/tree_lstm.py) and batched with one decorator. The data is every function in
the running interpreter's standard library: no download, on any machine.

    python examples/ast_treelstm.py                 # ~2 minutes on 2 CPU cores
    python examples/ast_treelstm.py --seconds 30    # shorter training budget
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynbatch as db  # noqa: E402
from dynbatch.data import pyast  # noqa: E402
from dynbatch.models.tree_lstm import ChildSumTreeLSTM  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None


@dataclass(eq=False, slots=True)
class Tree:
    """The tree protocol the models read: a token id on every node, a label at the root."""
    word_id: int
    children: tuple
    label: int = -1


def index(node: pyast.AstNode, vocab, label: int = -1) -> Tree:
    return Tree(vocab[node.token], tuple(index(c, vocab) for c in node.children), label)


@db.batched
def tree_loss(tree, model):
    return model(tree)


@db.batched
def tree_logits(tree, model):
    return model.logits(tree)


def accuracy(model, trees, batch_size=128) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(trees), batch_size):
            chunk = trees[start:start + batch_size]
            logits = torch.stack(tree_logits(chunk, model))
            correct += sum(int(p) == t.label for p, t in zip(logits.argmax(1), chunk))
    return correct / max(1, len(trees))


def load(max_nodes: int, classes: int, max_files=None):
    t0 = time.perf_counter()
    print("parsing the standard library...", flush=True)
    corpus = pyast.load_functions(max_files=max_files, max_nodes=max_nodes)
    train, dev, test = pyast.split(corpus)
    labels = [label for label, _ in pyast.top_labels(train, classes)]
    label_id = {label: i for i, label in enumerate(labels)}
    vocab = pyast.build_vocab(train, min_count=2)

    def keep(fns):
        return [index(f.tree, vocab, label_id[f.label]) for f in fns if f.label in label_id]
    data = keep(train), keep(dev), keep(test)
    print(f"stdlib: {corpus.files} files ({len(corpus.skipped_files)} unparsable), "
          f"{len(corpus.functions)} functions of <= {max_nodes} nodes "
          f"({corpus.dropped_large} larger left out); top {classes} labels: "
          f"{len(data[0])}/{len(data[1])}/{len(data[2])} train/dev/test; "
          f"vocab {len(vocab)}; {time.perf_counter() - t0:.1f} s")
    return data, labels, vocab


def speed(model, trees, reps: int = 3) -> tuple[float, float]:
    """Trees per second for a training step's forward+backward, eager per tree vs
    dynbatch, interleaved on the same trees and weights; medians."""
    eager, batched = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.stack([model(t) for t in trees]).sum().backward()
        eager.append(len(trees) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        torch.stack(tree_loss(trees, model)).sum().backward()
        batched.append(len(trees) / (time.perf_counter() - t0))
    model.zero_grad()
    return statistics.median(eager), statistics.median(batched)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=75, help="training time budget")
    ap.add_argument("--epochs", type=int, default=0, help="stop after this many (0: no cap)")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N functions")
    ap.add_argument("--max-files", type=int, default=None, help="parse only N stdlib files")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64, help="embedding and hidden size")
    ap.add_argument("--max-nodes", type=int, default=120)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared or small machine more "
                         "threads make small batched ops slower; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (--threads N; 0 keeps torch's default)")
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    (train, dev, test), labels, vocab = load(args.max_nodes, args.classes, args.max_files)
    if args.limit:
        train = train[:args.limit]
    model = ChildSumTreeLSTM(len(vocab), args.dim, args.dim, len(labels))
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)

    counts = [0] * len(labels)
    for t in train:
        counts[t.label] += 1
    majority = max(range(len(labels)), key=counts.__getitem__)
    baseline = sum(t.label == majority for t in test) / len(test)

    eager_tps, batched_tps = speed(model, train[:128])
    print(f"speed, forward+backward on 128 trees: eager per tree {eager_tps:.0f} trees/s, "
          f"dynbatch {batched_tps:.0f} trees/s: {batched_tps / eager_tps:.1f}x  "
          f"[{db.stats()}]")

    deadline = time.perf_counter() + args.seconds
    epoch = 0
    history = []
    while time.perf_counter() < deadline and (not args.epochs or epoch < args.epochs):
        epoch += 1
        random.shuffle(train)
        batches = range(0, len(train), args.batch)
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False) if tqdm else batches
        seen, total, t0 = 0, 0.0, time.perf_counter()
        for start in bar:
            chunk = train[start:start + args.batch]
            optim.zero_grad()
            loss = torch.stack(tree_loss(chunk, model)).mean()
            loss.backward()
            optim.step()
            seen += len(chunk)
            total += loss.item() * len(chunk)
            if tqdm:
                bar.set_postfix(loss=f"{total / seen:.3f}",
                                trees_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if time.perf_counter() >= deadline:
                break
        if tqdm:
            bar.close()
        dev_acc = accuracy(model, dev)
        history.append({"epoch": epoch, "trees": seen, "loss": total / max(1, seen),
                        "trees_per_s": seen / (time.perf_counter() - t0), "dev_acc": dev_acc})
        print(f"epoch {epoch}: {seen} trees, loss {total / max(1, seen):.3f}, "
              f"{seen / (time.perf_counter() - t0):.0f} trees/s, dev acc {dev_acc:.3f}")

    acc = accuracy(model, test)
    print(f"test accuracy {acc:.3f} over {len(test)} functions "
          f"(majority class '{labels[majority]}': {baseline:.3f})")
    print(f"dynbatch was {batched_tps / eager_tps:.1f}x faster than the same model run one "
          "tree at a time (forward+backward)")
    return {"history": history, "test_acc": acc, "majority_baseline": baseline,
            "eager_trees_per_s": eager_tps, "dynbatch_trees_per_s": batched_tps}


if __name__ == "__main__":
    main()
