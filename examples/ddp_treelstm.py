"""Data-parallel training with dynbatch: DistributedDataParallel over a batched Tree-LSTM.

The Child-Sum Tree-LSTM of examples/ast_treelstm.py (same data: the functions of Python's
standard library, labelled by the first word of their name), trained by several processes:

    torchrun --nproc_per_node 2 examples/ddp_treelstm.py                # @db.batched per shard
    torchrun --nproc_per_node 2 examples/ddp_treelstm.py --loader       # db.DataLoader with a
                                                                        # DistributedSampler

Each rank (a process, backend gloo on the CPU) holds a replica of the model wrapped in
``torch.nn.parallel.DistributedDataParallel``, takes its shard of every global minibatch
(``--batch`` trees in all, ``--batch / world_size`` per rank), runs the per-tree loss on
its shard as one dynbatch run, averages it, and calls ``backward``; DDP averages the
gradients over the ranks, so every replica takes the step of the mean loss over the
global minibatch.

How DDP and dynbatch fit (tests/test_ddp.py checks each point):

- The module DDP wraps has a ``@db.batched`` forward: ``model(trees)`` takes a minibatch
  and returns one loss per tree (``BatchedTreeLSTM``). DDP's forward calls
  ``module(*inputs)``. With ``device_ids=None`` (the CPU) it hands the inputs over
  untouched. With ``device_ids=[i]`` (one GPU per rank) it moves them with
  ``torch.distributed.utils._recursive_to``, which rebuilds lists and tuples around the
  same elements and passes any other object as it is: a list of trees arrives as a new
  list of the same trees, and a ``PlannedBatch`` from ``db.DataLoader`` (a Sequence, not
  a list) arrives as itself, with its plan. So ``ddp(batch)`` is the whole story; no
  wrapper object, ``no_sync`` or hook is needed.
- dynbatch's batched calls take the parameters themselves (shared tensors are passed
  unchanged), so backward reaches each parameter's gradient accumulator once, where
  DDP's reducer hooks in. Every parameter gets a gradient at every step here (every
  function's tree has children, so the forget-gate weights are used as well): no
  ``find_unused_parameters``. A model whose batches may leave a parameter unused would
  need it, as in eager PyTorch.
- ``db.DataLoader`` is given the inner module (``model``, the same object as
  ``ddp.module``), not the DDP wrapper: it plans calls of a ``@db.batched`` forward, and
  DDP's own forward is not one. Plans name parameters by their path from the module,
  which DDP leaves as it is, and run against the live parameters after each step.
- The DistributedSampler (``shuffle=True``, ``drop_last=True``) gives rank r the
  positions r, r + W, r + 2W, ... of each epoch's permutation; with ``batch_size =
  --batch / W`` the ranks' minibatches at step s are together the permutation's s-th
  run of ``--batch`` trees, the same global minibatch the plain path (``shard``) takes.
  ``set_epoch`` reshuffles each epoch, the same way on every rank.
- The DataLoader's workers are forked after ``init_process_group``; they only trace and
  plan, and never take part in a collective.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dynbatch as db  # noqa: E402
from dynbatch.models.tree_lstm import ChildSumTreeLSTM  # noqa: E402
import ast_treelstm  # noqa: E402  (the data: stdlib function ASTs, indexed)


class BatchedTreeLSTM(ChildSumTreeLSTM):
    """ChildSumTreeLSTM whose forward takes a minibatch: ``model(trees)`` is a list of
    per-tree losses (the per-tree code is ChildSumTreeLSTM.forward, unchanged)."""

    forward = db.batched(ChildSumTreeLSTM.forward)


def shard(global_batch: list, rank: int, world: int) -> list:
    """This rank's part of a global minibatch: positions rank, rank + world, ... (the
    DistributedSampler's split, so both paths give a rank the same trees)."""
    return global_batch[rank::world]


def global_batches(trees: list, batch: int, epoch: int, seed: int):
    """The global minibatches of one epoch, the same on every rank: the permutation a
    DistributedSampler draws (``randperm`` seeded with seed + epoch), cut into runs of
    ``batch``; a last incomplete one is dropped, so every rank's shard has the same size.
    So this path and ``--loader`` give each rank the same trees at each step."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(len(trees), generator=g).tolist()
    for start in range(0, len(order) - batch + 1, batch):
        yield [trees[i] for i in order[start:start + batch]]


def make_loader(trees: list, model, batch: int, rank: int, world: int, workers: int,
                seed: int) -> db.DataLoader:
    """A db.DataLoader of this rank's shards: ``batch // world`` trees per minibatch,
    planned ahead in ``workers`` processes (0: here)."""
    sampler = DistributedSampler(trees, num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    return db.DataLoader(trees, model, batch_size=batch // world, sampler=sampler,
                         drop_last=True, num_workers=workers,
                         persistent_workers=workers > 0)


def shards(args, trees, model, rank, world):
    """This rank's minibatches, ``args.steps`` of them, over as many epochs as needed."""
    loader = make_loader(trees, model, args.batch, rank, world, args.workers, args.seed) \
        if args.loader else None
    step, epoch = 0, 0
    while True:
        if loader is not None:
            loader.batch_sampler.sampler.set_epoch(epoch)
            batches = loader
        else:
            batches = (shard(b, rank, world)
                       for b in global_batches(trees, args.batch, epoch, args.seed))
        for batch in batches:
            yield batch
            step += 1
            if step == args.steps:
                return
        epoch += 1


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="global minibatch (all ranks)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--loader", action="store_true",
                    help="db.DataLoader + DistributedSampler (else @db.batched per shard)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    ap.add_argument("--dim", type=int, default=64, help="embedding and hidden size")
    ap.add_argument("--max-files", type=int, default=300, help="stdlib files to parse")
    ap.add_argument("--max-nodes", type=int, default=60)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun: torchrun --nproc_per_node 2 "
                         "examples/ddp_treelstm.py")
    dist.init_process_group("gloo")
    try:
        return train(args, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def train(args, rank: int, world: int) -> dict:
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} ranks")
    torch.set_num_threads(args.threads)
    # Every rank parses the same files into the same vocabulary (the split and the
    # vocabulary are deterministic); only rank 0 says so.
    quiet = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
    with quiet:
        (train_trees, _, _), labels, vocab = ast_treelstm.load(
            args.max_nodes, args.classes, args.max_files)
    if len(train_trees) < args.batch:
        raise SystemExit(f"{len(train_trees)} training trees, fewer than one global "
                         f"minibatch of --batch {args.batch}: parse more --max-files")
    torch.manual_seed(args.seed)    # DDP broadcasts rank 0's weights in any case
    model = BatchedTreeLSTM(len(vocab), args.dim, args.dim, len(labels))
    ddp = DistributedDataParallel(model)
    optim = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    how = f"db.DataLoader ({args.workers} worker(s) each)" if args.loader else "@db.batched"
    print(f"rank {rank}/{world}: {torch.get_num_threads()} torch thread(s), {how}, "
          f"{args.batch // world} trees per step of a global {args.batch}", flush=True)

    losses, sizes, times = [], [], []
    batches = shards(args, train_trees, model, rank, world)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)     # the wait for the loader's plan counts in the step
        if batch is None:
            break
        optim.zero_grad()
        loss = torch.stack(ddp(batch)).mean()
        loss.backward()                 # DDP averages the gradients over the ranks here
        optim.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        sizes.append(len(batch))
        s = db.stats()
        print(f"rank {rank} step {len(losses)}: loss {losses[-1]:.4f}, {len(batch)} trees "
              f"in {times[-1] * 1e3:.0f} ms, {len(batch) / times[-1]:.0f} trees/s "
              f"({s.nodes} nodes in {s.batches} batched calls)", flush=True)

    # Steady state: the first step infers each signature and starts the loader's
    # workers, and the next 2 per worker (prefetch_factor) were planned during it.
    skip = 1 + (2 * args.workers if args.loader else 0)
    window = slice(skip, None) if len(times) > skip else slice(None)
    rate = sum(sizes[window]) / sum(times[window])
    every = [None] * world
    dist.all_gather_object(every, (losses, rate))
    mean_loss = [statistics.fmean(r[0][i] for r in every) for i in range(len(losses))]
    total = sum(r[1] for r in every)
    if rank == 0:
        print(f"summary: {world} ranks x {args.threads} thread(s), {how}, {len(losses)} "
              f"steps of {args.batch} trees: mean loss {mean_loss[0]:.4f} -> "
              f"{mean_loss[-1]:.4f}; {total:.0f} trees/s in all over steps "
              f"{(window.start or 0) + 1}-{len(times)} (per rank: "
              f"{', '.join('%.0f' % r[1] for r in every)})", flush=True)
    return {"loss": mean_loss, "trees_per_s": total, "ranks": every}


if __name__ == "__main__":
    main()
