"""Where a dynbatch training step goes, phase by phase, next to the hand-batched step on the
same data.

    python benchmarks/time_split.py                          # SST128 blocks form, B=64
    python benchmarks/time_split.py --impl dynbatch-agenda --batch 16 --rounds 3
    python benchmarks/time_split.py --task ast --impl dynbatch-agenda   # needs no data
    python benchmarks/time_split.py --profile        # ATen time of one step; Python memory

Both implementations run interleaved in one process, 1 thread, on the same minibatches
and weights. Reported in wall milliseconds per minibatch (``time.perf_counter``, the
clock of the engine's own timings, so that the parts add up): the forward and the
backward of each; for dynbatch the forward split into the engine's phases. Each figure is
its minimum over the rounds (on a shared machine the figure least moved by other work),
averaged over the minibatches; so the parts add up to a little less than the forward.

How the forward is split, from the outside (the engine is not written for this tool):
- trace / schedule / execute: the run's own timings (``db.stats()``: ``trace_s``,
  ``schedule_s``, ``execute_s``); the rest of the forward is the run's set-up, turning
  its results into tensors, and its close.
- within them, while a run of this tool records, the engine's pipeline functions named
  in ``HOOKS`` are wrapped (wherever dynbatch's modules bind them, restored after):
  scheduling and planning within ``schedule_s``; gathering the inputs of every batched
  call, and the call itself (up to the next step's gather: it includes checking, storing
  and freeing outputs, all small) within ``execute_s``, also by signature. A function
  that is not there (the engine was rearranged) is named in the report, and its phase
  is left unsplit: the engine's own timings still add up.
For the full comparison use scripts/bench.py; this is the instrument for one change;
benchmarks/where.py gives shares of the whole step (optimizer included) by sampling.
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dynbatch as db  # noqa: E402
from benchmarks import tasks as T  # noqa: E402

# The pipeline functions wrapped to split the engine's timings: phase -> "module:function".
# The gather's wrapper reads its first argument's ``sig.name`` and ``nodes`` (the step),
# when it has them, to name signatures and count rows.
HOOKS = {
    "schedule": "dynbatch.schedule:schedule",       # the batches, from the pending nodes
    "plan": "dynbatch.plan:build",                  # their gathers, placing the nodes
    "execute": "dynbatch.execute:execute",          # runs a plan, step by step
    "gather": "dynbatch.gather:gather_inputs",      # one step's batched inputs
}
clock = time.perf_counter


class Patches:
    """Wraps functions of the engine for as long as it is entered; every binding of each
    function in a loaded ``dynbatch`` module is replaced (``from .x import f`` included),
    and put back on exit. A function not found is listed in ``missing``."""

    def __init__(self) -> None:
        self.undo: list = []
        self.missing: list[str] = []

    def wrap(self, spec: str, make) -> bool:
        module_name, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            fn = None
        if not callable(fn):
            self.missing.append(spec)
            return False
        wrapper = functools.wraps(fn)(make(fn))
        for module in [m for k, m in list(sys.modules.items())
                       if m is not None and (k == "dynbatch" or k.startswith("dynbatch."))]:
            for key, value in list(vars(module).items()):
                if value is fn:
                    setattr(module, key, wrapper)
                    self.undo.append((module, key, fn))
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for module, key, fn in reversed(self.undo):
            setattr(module, key, fn)
        self.undo.clear()
        return False


def _step_name(step) -> str:
    sig = getattr(step, "sig", None)
    return str(getattr(sig, "name", None) or sig or type(step).__name__)


class Split:
    """Timings of the wrapped functions over one forward (``reset`` before each)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t: collections.defaultdict = collections.defaultdict(float)
        self.by_sig: dict = {}      # signature name -> [calls, rows, gather s, call s]
        self.open: list = []        # per execute call in progress: (record, gather end)

    def _close_step(self, now: float) -> None:
        if self.open and self.open[-1] is not None:
            record, since = self.open[-1]
            record[3] += now - since
            self.t["calls"] += now - since
            self.open[-1] = None

    def timed(self, phase: str):
        def make(fn):
            def wrapper(*args, **kwargs):
                t0 = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.t[phase] += clock() - t0
            return wrapper
        return make

    def execute(self, fn):
        def wrapper(*args, **kwargs):
            self.open.append(None)
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = clock()
                self._close_step(t1)
                self.open.pop()
                self.t["execute"] += t1 - t0
        return wrapper

    def gather(self, fn):
        def wrapper(step, *args, **kwargs):
            t0 = clock()
            self._close_step(t0)            # the previous step's call ended here
            out = fn(step, *args, **kwargs)
            t1 = clock()
            name = _step_name(step)
            record = self.by_sig.get(name)
            if record is None:
                record = self.by_sig[name] = [0, 0, 0.0, 0.0]
            record[0] += 1
            record[1] += len(getattr(step, "nodes", ()) or ())
            record[2] += t1 - t0
            self.t["gather"] += t1 - t0
            if self.open:
                self.open[-1] = (record, t1)
            return out
        return wrapper

    def patches(self) -> Patches:
        p = Patches()
        p.wrap(HOOKS["schedule"], self.timed("schedule"))
        p.wrap(HOOKS["plan"], self.timed("plan"))
        p.wrap(HOOKS["execute"], self.execute)
        p.wrap(HOOKS["gather"], self.gather)
        return p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sst128", choices=("sst128", "sst300", "ast", "tagger"))
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
    if not impls[args.impl].uses_dynbatch:
        sys.exit(f"{args.impl} does not use dynbatch: name a dynbatch-* implementation")
    models = {name: impl.prepare(model) for name, impl in impls.items()}
    batches = T.minibatches(task.examples, args.batch, args.minibatches)
    if args.profile:
        return profile_step(impls, models, batches[0])

    for name, impl in impls.items():            # warm-up: first calls, block tracing
        impl.losses(models[name], batches[0]).sum().backward()
    split = Split()
    # records[name][minibatch] -> one dict of figures per round
    records = {name: [[] for _ in batches] for name in impls}
    with split.patches() as patches:
        for r in range(args.rounds):
            for k, batch in enumerate(batches):
                order = list(impls) if (r + k) % 2 == 0 else list(reversed(impls))
                for name in order:
                    split.reset()
                    t0 = clock()
                    loss = impls[name].losses(models[name], batch).sum()
                    t1 = clock()
                    loss.backward()
                    t2 = clock()
                    rec = {"forward": t1 - t0, "backward": t2 - t1}
                    if name != "hand":
                        rec.update(_engine_figures(db.stats(), split, rec["forward"]))
                    records[name][k].append(rec)
                    del loss
    report(args, impls, records, patches.missing)


def _engine_figures(s, split: Split, forward: float) -> dict:
    t = split.t
    return {"trace": s.trace_s, "schedule_s": s.schedule_s, "execute_s": s.execute_s,
            "rest": forward - s.trace_s - s.schedule_s - s.execute_s,
            "free_lists": s.free_lists_s, "schedule": t["schedule"], "plan": t["plan"],
            "schedule_rest": s.schedule_s - t["schedule"] - t["plan"],
            "gather": t["gather"], "calls": t["calls"],
            "execute_rest": s.execute_s - t["gather"] - t["calls"],
            "nodes": s.nodes, "batches": s.batches, "reads": s.rounds,
            "fallbacks": s.fallbacks,
            "by_sig": {k: list(v) for k, v in split.by_sig.items()}}


def _best(per_batch: list[list[dict]], key: str) -> float:
    """The minimum over the rounds, averaged over the minibatches."""
    return statistics.fmean(min(r[key] for r in rounds) for rounds in per_batch)


def report(args, impls, records, missing) -> None:
    ms = 1e3
    print(f"{args.task}, B={args.batch}, {args.minibatches} minibatches x {args.rounds} "
          f"rounds, 1 thread; wall ms per minibatch, each figure its minimum over the "
          f"rounds, averaged over the minibatches")
    for name in impls:
        print(f"  {name:26s} forward {_best(records[name], 'forward') * ms:7.1f}   "
              f"backward {_best(records[name], 'backward') * ms:7.1f}")
    name = args.impl
    recs = records[name]
    first = [rounds[0] for rounds in recs]
    nodes = statistics.fmean(r["nodes"] for r in first)
    batches = statistics.fmean(r["batches"] for r in first)
    reads = statistics.fmean(r["reads"] for r in first)
    fallbacks = sum(r["fallbacks"] for r in first)
    free = [r["free_lists"] for rounds in recs for r in rounds]
    not_split = set(missing)

    def has(*phases):
        return not any(HOOKS[p] in not_split for p in phases)

    trace = _best(recs, "trace")
    rows = [("trace", trace, f"model code and recording; "
                             f"{trace / nodes * 1e6 if nodes else 0:.2f} us per node")]
    if has("schedule", "plan"):
        rows += [("schedule", _best(recs, "schedule"), "the batches"),
                 ("plan", _best(recs, "plan"), "their gathers; placing the nodes"),
                 ("schedule, rest", _best(recs, "schedule_rest"),
                  "finding the pending and held nodes")]
    else:
        rows.append(("schedule + plan", _best(recs, "schedule_s"), "not split"))
    if has("execute", "gather"):
        rows += [("gather", _best(recs, "gather"),
                  f"the inputs of {batches:.0f} batched calls"),
                 ("batched calls", _best(recs, "calls"),
                  "the calls; checking, storing, freeing outputs"),
                 ("execute, rest", _best(recs, "execute_rest"), "")]
    else:
        rows.append(("execute", _best(recs, "execute_s"), "not split"))
    rows.append(("set-up, results, close", _best(recs, "rest"),
                 "forward - trace - schedule - execute; emptying the free lists at close "
                 f"{min(free) * ms:.1f}-{max(free) * ms:.1f}"))
    print(f"  {name} forward: {nodes:.0f} nodes in {batches:.0f} batches, "
          f"{reads:.0f} rounds of reads, {fallbacks} nodes run per example")
    for label, seconds, note in rows:
        print(f"    {label:24s} {seconds * ms:7.1f}   {note}")
    if missing:
        print(f"  not found, so not split: {', '.join(missing)}")
    if not has("gather"):
        return
    # by signature: per minibatch, the minimum over the rounds of each figure
    totals: dict = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for rounds in recs:
        for sig in rounds[0]["by_sig"]:
            per_round = [r["by_sig"].get(sig, [0, 0, 0.0, 0.0]) for r in rounds]
            t = totals[sig]
            t[0] += per_round[0][0]
            t[1] += per_round[0][1]
            t[2] += min(x[2] for x in per_round)
            t[3] += min(x[3] for x in per_round)
    n = len(recs)
    print("  batched calls by signature, per minibatch: calls, rows, ms gathering the "
          "inputs / ms in the calls")
    for sig, (calls, rows_, g, c) in sorted(totals.items(), key=lambda kv: -kv[1][3]):
        print(f"    {sig[:40]:40s} {calls / n:5.0f} {rows_ / n:6.0f}   "
              f"{g / n * ms:6.2f} / {c / n * ms:6.2f}")


def profile_step(impls, models, batch) -> None:
    """Is the gap in the batched torch work or around it? ATen self time of one training
    step (forward and backward) under torch.profiler, per implementation; the peak of
    Python memory over the forward (tracemalloc) and the tensors saved for backward; and
    for dynbatch the Python memory allocated while tracing, per recorded node (at the
    run's first scheduling), and the batch outputs the run made against those its store
    still holds when it closes (the engine frees those that nothing reads any more)."""
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
            per_node = memory.get("per_node")
            print(f"  {'':26s} tracing allocates "
                  f"{per_node if per_node is not None else 'n/a'} bytes of Python memory "
                  f"per node; batch outputs made {memory['made'] / MB:.1f} MB, still held "
                  f"when the run closes {memory['held'] / MB:.1f} MB")
            if memory["missing"]:
                print(f"  {'':26s} not found, so not measured: {', '.join(memory['missing'])}")


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


def _nbytes(entry) -> dict:
    """{id: bytes} of the tensors of one store entry (a batch's outputs)."""
    items = entry if isinstance(entry, (tuple, list)) else (entry,)
    return {id(t): t.nbytes for t in items if isinstance(t, torch.Tensor)}


def _recording_nodes(fallback) -> int:
    """Nodes recorded so far by this thread's run; ``len(fallback)`` (the pending nodes
    handed to the scheduler) where the run cannot be found."""
    try:
        from dynbatch.lazy import current
        return len(current.tracer.graph.nodes)
    except (ImportError, AttributeError, TypeError):
        return len(fallback)


def python_memory(impl, model, batch, dynbatch: bool) -> dict:
    """The tracemalloc peak over one forward; for dynbatch also ``per_node`` (Python
    memory allocated by the time of the first scheduling, per recorded node), ``made``
    (bytes of every batch output; each store entry is seen as the next step gathers, or
    as the plan's execution ends) and ``held`` (bytes its stores still hold once the
    forward has returned)."""
    import tracemalloc
    out: dict = {"made": 0, "held": 0, "missing": []}
    stores: dict = {}       # id(store) -> [store, entries seen]
    made: dict = {}

    def see(store) -> None:
        seen = stores.setdefault(id(store), [store, 0])
        for entry in store[seen[1]:]:
            if entry is not None:
                made.update(_nbytes(entry))
        seen[1] = len(store)

    def on_schedule(fn):
        def wrapper(*args, **kwargs):
            if "per_node" not in out:
                nodes = _recording_nodes(args[1] if len(args) > 1 else ())
                out["per_node"] = round(tracemalloc.get_traced_memory()[0] / max(nodes, 1))
            return fn(*args, **kwargs)
        return wrapper

    def on_gather(fn):
        def wrapper(step, store, *args, **kwargs):
            see(store)
            return fn(step, store, *args, **kwargs)
        return wrapper

    def on_execute(fn):
        def wrapper(plan, store, *args, **kwargs):
            try:
                return fn(plan, store, *args, **kwargs)
            finally:
                see(store)
        return wrapper

    with Patches() as patches:
        if dynbatch:
            patches.wrap(HOOKS["schedule"], on_schedule)
            patches.wrap(HOOKS["gather"], on_gather)
            patches.wrap(HOOKS["execute"], on_execute)
        tracemalloc.start()
        try:
            impl.losses(model, batch)
            out["peak"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        out["missing"] = patches.missing
    held: dict = {}
    for store, _ in stores.values():
        for entry in store:
            if entry is not None:
                held.update(_nbytes(entry))
    stores.clear()
    out["made"], out["held"] = sum(made.values()), sum(held.values())
    return out


if __name__ == "__main__":
    main()
