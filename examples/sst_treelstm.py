"""Constituency Tree-LSTM on the Stanford Sentiment Treebank (Tai et al., 2015), batched by dynbatch.

The model (dynbatch/models/tree_lstm.py, `BinaryTreeLSTM`) is written for ONE tree; training
runs it over minibatches of 25 trees with one decorator. Fine-grained (5 classes) or binary
(neutral-root trees dropped, neutral nodes carry no loss); a loss on every labelled node; root
accuracy on dev after every epoch; the best dev model is evaluated on test.

    python examples/sst_treelstm.py --task fine   --threads 1          # 20-minute budget
    python examples/sst_treelstm.py --task binary --threads 1
    python examples/sst_treelstm.py --limit 200 --epochs 1             # smoke test
    python examples/sst_treelstm.py --speed-check 4 --epochs 0         # eager vs dynbatch

Hyperparameters follow the paper: memory dim 150, Adagrad lr 0.05, weight decay 1e-4,
minibatch 25, 300-d embeddings (random init, or --embeddings FILE in GloVe text format),
dropout 0.5 on the classifier input. Data: ../shared/data/sst/{train,dev,test}.txt from the
repository root, or --data DIR, or $DYNBATCH_SST_DIR.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dynbatch as db  # noqa: E402
from benchmarks.handbatched import handbatched_binary_treelstm_loss  # noqa: E402
from dynbatch.data import sst  # noqa: E402
from dynbatch.models.tree_lstm import BinaryTreeLSTM  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    tqdm = None

DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst"


# Blocks: each marked method is recorded as ONE node per call and replayed batched, instead
# of one node per torch op. Python ints in a block's arguments would split batches, which is
# why `leaf` and `node_loss` take 0-d tensors. Dropout inside `node_loss` still draws an
# independent mask per row (checked: the replayed dropout is one batched call).
class CellBlocks(BinaryTreeLSTM):
    """The leaf and the inner cell as blocks."""
    leaf = db.block(BinaryTreeLSTM.leaf)
    node = db.block(BinaryTreeLSTM.node)


class AllBlocks(CellBlocks):
    """The two cells and the per-node loss (dropout, classifier, cross-entropy) as blocks."""
    node_loss = db.block(BinaryTreeLSTM.node_loss)


MODELS = {"none": BinaryTreeLSTM, "cells": CellBlocks, "all": AllBlocks}


@db.batched
def tree_loss(tree, model):
    return model(tree)


@db.batched
def root_logits(tree, model):
    return model.root_logits(tree)


def resolve_data(explicit: str | None) -> Path:
    found = sst.sst_dir(explicit)
    path = found if found is not None else DEFAULT_DATA
    if not (path / "train.txt").exists():
        raise SystemExit(f"SST not found in {path} (pass --data DIR or set {sst.DATA_ENV})")
    return path


def load_embeddings(model: BinaryTreeLSTM, vocab: sst.Vocab, path: str) -> int:
    """Copy the vectors of words found in a GloVe-format text file; the rest stay random."""
    weight = model.embedding.weight
    found = 0
    with open(path, encoding="utf-8", errors="replace") as f, torch.no_grad():
        for line in f:
            # GloVe 840B has words with spaces: the vector is always the last `dim` fields.
            parts = line.rstrip("\n").split(" ")
            word, values = " ".join(parts[:-weight.shape[1]]), parts[-weight.shape[1]:]
            if word in vocab and len(parts) > weight.shape[1]:
                weight[vocab[word]] = torch.tensor([float(v) for v in values])
                found += 1
    return found


def accuracy(model, trees, batch_size: int = 256) -> float:
    """Root accuracy, batched inference."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(trees), batch_size):
            chunk = trees[start:start + batch_size]
            pred = torch.stack(root_logits(chunk, model)).argmax(1).tolist()
            correct += sum(p == t.label for p, t in zip(pred, chunk))
    model.train(was_training)
    return correct / max(1, len(trees))


def speed_check(model, trees, batch: int, minibatches: int) -> dict[str, float]:
    """Training-step trees/s (forward + backward) of eager per tree, of dynbatch with each
    choice of blocks, and of the hand-batched version (benchmarks/handbatched.py), on the
    same weights and trees, interleaved; medians over minibatches."""
    variants = {}
    for name, cls in MODELS.items():
        v = cls.__new__(cls)
        v.__dict__ = model.__dict__  # the same submodules and parameters, another class
        variants[name] = v
    times: dict[str, list[float]] = {"eager": []} | {f"dynbatch[{k}]": [] for k in MODELS}
    for k in range(minibatches):
        chunk = trees[k * batch:(k + 1) * batch]
        t0 = time.perf_counter()
        torch.stack([model(t) for t in chunk]).mean().backward()
        times["eager"].append(len(chunk) / (time.perf_counter() - t0))
        for name, v in variants.items():
            t0 = time.perf_counter()
            torch.stack(tree_loss(chunk, v)).mean().backward()
            times[f"dynbatch[{name}]"].append(len(chunk) / (time.perf_counter() - t0))
            if k == 0:
                print(f"  dynbatch[{name}]: {db.stats()}")
        t0 = time.perf_counter()
        handbatched_binary_treelstm_loss(model, chunk).mean().backward()
        times.setdefault("hand-batched", []).append(len(chunk) / (time.perf_counter() - t0))
    model.zero_grad()
    result = {k: statistics.median(v) for k, v in times.items()}
    for k, v in result.items():
        print(f"  {k:16s} {v:7.1f} trees/s  ({v / result['eager']:.1f}x eager)")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("fine", "binary"), default="fine")
    ap.add_argument("--data", help="directory with {train,dev,test}.txt")
    ap.add_argument("--out", help="checkpoint and results directory (default runs/sst-<task>)")
    ap.add_argument("--embeddings", help="GloVe-format text file; words not in it stay random")
    ap.add_argument("--embed-dim", type=int, default=300)
    ap.add_argument("--hidden-dim", type=int, default=150, help="memory dimension")
    ap.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate")
    ap.add_argument("--emb-lr", type=float, default=None,
                    help="Adagrad learning rate of the embeddings (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=1e-4,
                    help="L2 on all weights except the embeddings")
    ap.add_argument("--dropout", type=float, default=0.5, help="on the classifier input")
    ap.add_argument("--init-range", type=float, default=0.05,
                    help="random embeddings are uniform(-r, r), as in the paper's code")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    ap.add_argument("--time-budget", type=float, default=20.0,
                    help="minutes of training (with per-epoch dev evaluation)")
    ap.add_argument("--limit", type=int, help="use the first N training trees")
    ap.add_argument("--eval-limit", type=int, help="use the first N dev and test trees")
    ap.add_argument("--blocks", choices=tuple(MODELS), default="all",
                    help="which model parts are dynbatch blocks")
    ap.add_argument("--strategy", choices=("agenda", "depth"), default="agenda")
    ap.add_argument("--speed-check", type=int, default=0, metavar="K",
                    help="first time K minibatches: eager vs dynbatch (each --blocks choice)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared or small machine more "
                         "threads make small batched ops slower; 0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="plan each minibatch ahead in N db.DataLoader workers (0: trace "
                         "and schedule in the training step)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (--threads N; 0 keeps torch's default)")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tree_loss.strategy = root_logits.strategy = args.strategy

    data = resolve_data(args.data)
    train = sst.load_split(data, "train", args.task)[:args.limit]
    vocab = sst.build_vocab(train)
    train = [sst.index_tree(t, vocab) for t in train]
    dev = sst.load_split(data, "dev", args.task, vocab)[:args.eval_limit]
    test = sst.load_split(data, "test", args.task, vocab)[:args.eval_limit]
    print(f"SST {args.task}: {len(train)}/{len(dev)}/{len(test)} train/dev/test trees, "
          f"vocab {len(vocab)}, {sum(t.size() for t in train)} training nodes; "
          f"loaded in {time.perf_counter() - start:.1f} s", flush=True)

    model = MODELS[args.blocks](len(vocab), args.embed_dim, args.hidden_dim,
                                sst.NUM_CLASSES[args.task], dropout=args.dropout)
    with torch.no_grad():
        model.embedding.weight.uniform_(-args.init_range, args.init_range)
    if args.embeddings:
        found = load_embeddings(model, vocab, args.embeddings)
        print(f"embeddings: {found}/{len(vocab)} words found in {args.embeddings}")
    emb = [model.embedding.weight]
    rest = [p for p in model.parameters() if p is not model.embedding.weight]
    optim = torch.optim.Adagrad([
        {"params": rest, "weight_decay": args.weight_decay},
        # No decay on the embeddings: Adagrad would scale the decay of a word seen rarely
        # up to full-size steps and wipe its vector out between its occurrences.
        {"params": emb, "weight_decay": 0.0,
         "lr": args.lr if args.emb_lr is None else args.emb_lr},
    ], lr=args.lr)

    speeds = None
    if args.speed_check:
        print(f"speed check, training step (forward+backward), minibatch {args.batch}:")
        speeds = speed_check(model, train, args.batch, args.speed_check)

    out = Path(args.out) if args.out else REPO / "runs" / f"sst-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "model.pt"
    results: dict = {"args": vars(args), "epochs": [], "speed_check": speeds,
                     "sizes": {"train": len(train), "dev": len(dev), "test": len(test),
                               "vocab": len(vocab)}}
    loader = None
    if args.workers:        # plans made ahead; the loader shuffles (never the list in place)
        loader = db.DataLoader(train, tree_loss, model, batch_size=args.batch, shuffle=True,
                               num_workers=args.workers, persistent_workers=True,
                               generator=torch.Generator().manual_seed(args.seed))
    best_dev, best_epoch = -1.0, 0
    t_train = time.perf_counter()
    deadline = t_train + 60 * args.time_budget
    epoch = 0
    while epoch < args.epochs and time.perf_counter() < deadline:
        epoch += 1
        model.train()
        if loader is None:
            random.shuffle(train)
        batches = range(0, len(train), args.batch)
        chunks = iter(loader) if loader is not None else \
            (train[i:i + args.batch] for i in batches)
        bar = None
        if tqdm is not None and not args.no_progress:
            bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                       mininterval=1.0 if sys.stderr.isatty() else 30.0)
        seen, total, t0, train_s = 0, 0.0, time.perf_counter(), 0.0
        for start_i in (bar if bar is not None else batches):
            ts = time.perf_counter()        # (the wait for a plan made ahead included)
            chunk = next(chunks)
            optim.zero_grad()
            # Mean over trees of each tree's summed node losses (the paper's code).
            loss = torch.stack(tree_loss(chunk, model)).mean()
            loss.backward()
            optim.step()
            train_s += time.perf_counter() - ts
            seen += len(chunk)
            total += loss.item() * len(chunk)
            if bar is not None:
                bar.set_postfix(loss=f"{total / seen:.2f}", trees_s=f"{seen / train_s:.0f}",
                                refresh=False)
            elif (start_i // args.batch) % 50 == 49:
                print(f"  epoch {epoch}: {seen}/{len(train)} trees, loss {total / seen:.2f}, "
                      f"{seen / train_s:.0f} trees/s", flush=True)
            if time.perf_counter() >= deadline:
                break
        if bar is not None:
            bar.close()
        epoch_s = time.perf_counter() - t0
        dev_acc = accuracy(model, dev)
        row = {"epoch": epoch, "trees": seen, "loss": total / max(1, seen), "dev_acc": dev_acc,
               "trees_per_s": seen / max(train_s, 1e-9), "epoch_s": epoch_s,
               "elapsed_s": time.perf_counter() - t_train}
        results["epochs"].append(row)
        better = dev_acc > best_dev
        if better:
            best_dev, best_epoch = dev_acc, epoch
            torch.save({"model": model.state_dict(), "vocab": list(vocab.words),
                        "args": vars(args), "epoch": epoch, "dev_acc": dev_acc}, ckpt)
        print(f"epoch {epoch}: {seen} trees, loss {row['loss']:.3f}, "
              f"{row['trees_per_s']:.1f} trees/s (training step), dev root acc {dev_acc:.4f}"
              f"{' *best' if better else ''}  [{row['elapsed_s'] / 60:.1f} min]", flush=True)

    if best_epoch:   # else (no epoch ran) test the initial weights
        model.load_state_dict(torch.load(ckpt)["model"])
    test_acc = accuracy(model, test)
    results.update(best_epoch=best_epoch, best_dev_acc=best_dev, test_acc=test_acc,
                   train_wall_s=time.perf_counter() - t_train,
                   wall_s=time.perf_counter() - start, checkpoint=str(ckpt))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'results.json'}; checkpoint: {ckpt}")
    print(f"SST {args.task}: test root accuracy {100 * test_acc:.2f}% "
          f"(best dev {100 * max(best_dev, 0):.2f}% at epoch {best_epoch} of "
          f"{len(results['epochs'])}, {results['wall_s'] / 60:.1f} min)", flush=True)
    return results


if __name__ == "__main__":
    main()
