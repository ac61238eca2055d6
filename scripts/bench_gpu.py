"""Binary Tree-LSTM on one GPU (or CPU): unbatched eager, hand-batched, dynbatch per-op and
with blocks, interleaved on the same random SST-sized trees and weights; medians.

    python scripts/bench_gpu.py --device cuda --sizes 64,256 --out results.json

Random trees (5-50 leaves, SST's range) stand in for SST, which a GPU box may not have.
Reports trees/s for a training step (forward + backward) and for inference.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dynbatch as db  # noqa: E402
from benchmarks.handbatched import handbatched_binary_treelstm_loss  # noqa: E402
from dynbatch.models.tree_lstm import BinaryTreeLSTM  # noqa: E402


class Tree:
    __slots__ = ("label", "word_id", "children")

    def __init__(self, label, word_id=None, children=()):
        self.label, self.word_id, self.children = label, word_id, children


def random_tree(rng, leaves, vocab):
    if leaves == 1:
        return Tree(rng.randrange(5), rng.randrange(vocab))
    k = rng.randint(1, leaves - 1)
    return Tree(rng.randrange(5), None, (random_tree(rng, k, vocab),
                                         random_tree(rng, leaves - k, vocab)))


class Blocked(BinaryTreeLSTM):
    leaf = db.block(BinaryTreeLSTM.leaf)
    node = db.block(BinaryTreeLSTM.node)
    node_loss = db.block(BinaryTreeLSTM.node_loss)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eager-trees", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = random.Random(0)
    torch.manual_seed(0)
    vocab = 5000
    trees = [random_tree(rng, rng.randint(5, 50), vocab) for _ in range(1024)]
    plain = BinaryTreeLSTM(vocab, args.dim, args.dim, 5).to(device)
    blocked = Blocked(vocab, args.dim, args.dim, 5).to(device)
    blocked.load_state_dict(plain.state_dict())
    loss_fn = db.batched(lambda t, m: m(t))

    def impls(batch):
        return {
            "eager": lambda: torch.stack([plain(t) for t in batch[:args.eager_trees]]),
            "hand": lambda: handbatched_binary_treelstm_loss(plain, batch),
            "dynbatch": lambda: torch.stack(loss_fn(batch, plain)),
            "dynbatch-blocks": lambda: torch.stack(loss_fn(batch, blocked)),
        }

    # The models make per-example tensors with torch.tensor(word_id): on a GPU they need the
    # default device set, for every implementation alike.
    context = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
    with context:
        first = trees[:8]
        ref = handbatched_binary_treelstm_loss(plain, first)
        for name, f in impls(first).items():
            diff = (f() - ref[:len(f())]).abs().max().item()
            print(f"agreement {name:16s} max |loss diff| {diff:.2e}")
        results = []
        for size in [int(s) for s in args.sizes.split(",")]:
            batch = trees[:size]
            for mode in ("train", "infer"):
                times = {name: [] for name in impls(batch)}
                for _ in range(args.rounds + 1):          # the first round warms up
                    for name, f in impls(batch).items():
                        n = min(size, args.eager_trees) if name == "eager" else size
                        sync()
                        t0 = time.perf_counter()
                        if mode == "train":
                            f().sum().backward()
                        else:
                            with torch.no_grad():
                                f()
                        sync()
                        times[name].append(n / (time.perf_counter() - t0))
                row = {name: statistics.median(v[1:]) for name, v in times.items()}
                results.append({"size": size, "mode": mode, "trees_per_s": row})
                ratios = "  ".join(f"{k} {v:8.1f}/s ({v / row['hand']:.2f}x hand)"
                                   for k, v in row.items())
                print(f"B={size:4d} {mode:5s} {ratios}", flush=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dim": args.dim, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
