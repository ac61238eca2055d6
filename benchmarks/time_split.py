"""Where a dynbatch training step goes, next to the hand-batched step on the same data.

    python benchmarks/time_split.py                          # SST128 blocks form, B=64
    python benchmarks/time_split.py --impl dynbatch-agenda --batch 16 --rounds 3
    python benchmarks/time_split.py --profile        # ATen time of one step; Python memory

Both implementations run interleaved in one process, 1 thread, on the same minibatches
and weights. Figures are the minimum CPU time (``time.process_time``) over all minibatches
and rounds: on a shared machine the minimum is the figure least moved by other work. For
dynbatch: trace / schedule / execute of the forward (``db.stats()``), the backward, and
the execute phase per batch signature, split into gathering the inputs and the call.
For the full comparison use scripts/bench.py; this is the instrument for one change.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402
from dynbatch import execute  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst128", choices=("sst128", "sst300", "ast"))
    ap.add_argument("--impl", default="dynbatch-blocks-agenda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--minibatches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sst-dir", default=None,
                    help="default: $DYNBATCH_SST_DIR, else ../shared/data/sst")
    ap.add_argument("--profile", action="store_true",
                    help="instead: torch.profiler's ATen self time of one training step of "
                         "each implementation, its Python memory peak, and for dynbatch "
                         "the bytes tracing allocates per node and the batch outputs made "
                         "and still held when the run closes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = T.load_task_or_exit(args.task, limit=args.batch * args.minibatches,
                           sst_dir=T.sst_dir(args.sst_dir))
    model = T.make_model(task)
    impls = {name: T.torch_impl(args.task, name) for name in ("hand", args.impl)}
    if impls[args.impl] is None:
        sys.exit(f"{args.impl} has no form for {args.task}")
    models = {name: impl.prepare(model) for name, impl in impls.items()}
    batches = T.minibatches(task.examples, args.batch, args.minibatches)
    if args.profile:
        return profile_step(impls, models, batches[0])

    per_signature = collections.defaultdict(lambda: [float("inf"), float("inf")])
    current = collections.defaultdict(lambda: [0.0, 0.0])
    run_batch, gather = execute.run_batch, execute.gather
    active = [None]

    def timed_run_batch(nodes, info):
        active[0] = info.name
        t = time.process_time()
        run_batch(nodes, info)
        current[info.name][1] += time.process_time() - t

    def timed_gather(column, memo=None):
        t = time.process_time()
        out = gather(column, memo)
        current[active[0]][0] += time.process_time() - t
        return out

    forward = {name: [] for name in impls}
    backward = {name: [] for name in impls}
    split = []
    execute.run_batch, execute.gather = timed_run_batch, timed_gather
    try:
        for _ in range(args.rounds):
            for batch in batches:
                for name, impl in impls.items():
                    current.clear()
                    t0 = time.process_time()
                    loss = impl.losses(models[name], batch).sum()
                    t1 = time.process_time()
                    loss.backward()
                    t2 = time.process_time()
                    forward[name].append(t1 - t0)
                    backward[name].append(t2 - t1)
                    if name != "hand":
                        s = db.stats()
                        split.append((s.trace_s, s.schedule_s, s.execute_s, s.free_lists_s))
                        for sig, (g, total) in current.items():
                            best = per_signature[sig]
                            best[0], best[1] = min(best[0], g), min(best[1], total)
    finally:
        execute.run_batch, execute.gather = run_batch, gather

    ms = 1e3
    print(f"{args.task}, B={args.batch}, {args.minibatches} minibatches x {args.rounds} "
          f"rounds, 1 thread; minimum CPU ms per minibatch")
    for name in impls:
        print(f"  {name:26s} forward {min(forward[name]) * ms:7.1f}   "
              f"backward {min(backward[name]) * ms:7.1f}")
    trace_s, schedule_s, execute_s = (min(x[i] for x in split) for i in range(3))
    free_lists = sorted(x[3] for x in split)
    last = db.stats()
    print(f"  {args.impl} forward: trace {trace_s * ms:.1f}, schedule {schedule_s * ms:.1f}, "
          f"execute {execute_s * ms:.1f} ({last.nodes} nodes in {last.batches} batches); "
          f"emptying the free lists at close (NOTE [free lists at close]) "
          f"{free_lists[0] * ms:.1f}-{free_lists[-1] * ms:.1f}")
    print("  execute by signature, gathering the inputs / the whole batch (timing each call "
          "adds a little)")
    for sig, (g, total) in sorted(per_signature.items(), key=lambda kv: -kv[1][1]):
        print(f"    {sig:40s} {g * ms:6.1f} / {total * ms:6.1f}")


def profile_step(impls, models, batch) -> None:
    """Is the gap in the batched torch work or around it? ATen self time of one training
    step (forward and backward) under torch.profiler, per implementation; the peak of
    Python memory over the forward (tracemalloc) and the tensors saved for backward; and
    for dynbatch the Python memory allocated while tracing, per recorded node, and the
    batch outputs the run made against those still held when it closes (NOTE [freeing]
    in dynbatch/execute.py: before it, a run held every one it made)."""
    from torch.profiler import ProfilerActivity, profile
    for name, impl in impls.items():
        impl.losses(models[name], batch).sum().backward()        # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            impl.losses(models[name], batch).sum().backward()
        events = prof.key_averages()
        aten = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
        print(f"  {name:26s} ATen self time {aten / 1e3:7.1f} ms in "
              f"{sum(e.count for e in events if e.key.startswith('aten::'))} ATen calls")
        memory = python_memory(impl, models[name], batch, name != "hand")
        print(f"  {'':26s} Python memory peak over the forward {memory['peak'] / MB:.1f} MB; "
              f"tensors saved for backward "
              f"{saved_for_backward(impl, models[name], batch) / MB:.1f} MB")
        if name != "hand":
            print(f"  {'':26s} tracing allocates {memory['per_node']} bytes of Python memory "
                  f"per node; batch outputs made {memory['made'] / MB:.1f} MB, still held "
                  f"when the run closes {memory['held'] / MB:.1f} MB")


MB = 2 ** 20


def saved_for_backward(impl, model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward,
    the parameters left out: what both implementations must hold at the end of it, next
    to dynbatch's graph (a view of a batch output counts as the whole output)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        impl.losses(model, batch)
    return sum(n for ptr, n in storages.items() if ptr not in params)


def python_memory(impl, model, batch, dynbatch: bool) -> dict:
    import tracemalloc
    from dynbatch import api
    out = {}
    execute_pending, store, close = api.execute_pending, execute._store, api._close
    outputs = []

    def at_first_execution(run, targets=None):
        if "per_node" not in out:
            out["per_node"] = round(tracemalloc.get_traced_memory()[0] / len(run.graph.nodes))
        return execute_pending(run, targets)

    def keep_track(nodes, batch_outputs):
        outputs.extend(t.nbytes for t in batch_outputs)
        store(nodes, batch_outputs)

    def at_close(run, counters):
        held = {id(t): t.nbytes for n in run.graph.nodes if type(n.batch) is tuple
                for t in n.batch}
        out["held"] = sum(held.values())
        close(run, counters)

    if dynbatch:
        api.execute_pending, execute._store, api._close = at_first_execution, keep_track, at_close
    tracemalloc.start()
    try:
        impl.losses(model, batch)
        out["peak"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        api.execute_pending, execute._store, api._close = execute_pending, store, close
    out["made"] = sum(outputs)
    return out


if __name__ == "__main__":
    main()
