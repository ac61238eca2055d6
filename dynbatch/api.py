"""The public front door: ``batched``, ``autobatch``, ``force``, ``block``, ``stats``.

A run: trace every example (its index known to every node, for error messages), schedule
and execute what is pending, turn lazy results into real tensors. ``finally`` always leaves
the global state as it was: no current run, no torch-function mode, ``nn.Module.__call__``
unpatched, and ``stats()`` unchanged when the run failed.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import time
from collections.abc import Sequence

import torch

try:
    import greenlet
except ImportError:  # without it, reads still give exact values but run unbatched
    greenlet = None

from . import profile, rules, trace
from .blocks import block
from .errors import DynbatchError
from .execute import execute_pending, lazy_tensors, materialize
from .lazy import LazyTensor
from .schedule import STRATEGIES

__all__ = ["batched", "autobatch", "force", "block", "stats"]


def stats() -> profile.Stats:
    """Counters and timings of the last finished run (see ``profile.Stats``)."""
    return profile.last()


def force(x):
    """The real value of a lazy tensor (or of every lazy tensor in a list/tuple/dict),
    executing pending work, batched, first. Plain values pass through. A structure is
    forced in one go: one suspension of the example, not one per tensor."""
    if type(x) is LazyTensor:
        return x.value
    lazies = lazy_tensors(x)
    if len(lazies) > 1:
        trace.force_all(lazies)
    return _force_structure(x)


def _force_structure(x):
    if type(x) is LazyTensor:
        return x.value
    if type(x) in (list, tuple):
        return type(x)(_force_structure(v) for v in x)
    if type(x) is dict:
        return {k: _force_structure(v) for k, v in x.items()}
    return x


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


class _Batched:
    """The callable ``@db.batched`` returns; a descriptor, so it works on methods."""

    def __init__(self, fn, strategy: str):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.strategy = strategy
        params = list(inspect.signature(fn).parameters)
        self._method = bool(params) and params[0] == "self"

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return functools.partial(self._call_method, instance)

    def _call_method(self, instance, batch, *args, **kwargs):
        return run_batched(self.fn, batch, (instance,), args, kwargs, self.strategy)

    def __call__(self, *args, **kwargs):
        if self._method:
            if len(args) < 2:
                raise TypeError(f"{self.fn.__qualname__}: expected (self, batch, ...)")
            return run_batched(self.fn, args[1], (args[0],), args[2:], kwargs, self.strategy)
        if not args:
            raise TypeError(f"{self.fn.__qualname__}: the first argument must be the "
                            "minibatch (a sequence of examples)")
        return run_batched(self.fn, args[0], (), args[1:], kwargs, self.strategy)


def batched(fn=None, *, strategy: str = "agenda"):
    """Run code written for ONE example on a whole minibatch, batched.

    The first argument (after ``self`` on a method) is the minibatch, a sequence; the
    result is a list with one entry per example, holding real tensors connected to
    autograd in the structure the per-example code returned::

        @db.batched
        def loss(tree, model):
            return model.tree_loss(tree)

        losses = loss(trees, model)          # [tensor(...), tensor(...), ...]
        torch.stack(losses).sum().backward()
    """
    _check_strategy(strategy)
    if fn is None:
        return lambda f: _Batched(f, strategy)
    return _Batched(fn, strategy)


def _as_examples(batch):
    if isinstance(batch, torch.Tensor):
        return list(batch.unbind(0)) if batch.dim() > 0 else _not_a_sequence(batch)
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        _not_a_sequence(batch)
    return batch


def _not_a_sequence(batch):
    raise TypeError(f"the minibatch must be a sequence of examples (a list or tuple), got "
                    f"{type(batch).__name__}; to run one example, pass [example]")


def run_batched(fn, batch, leading, args, kwargs, strategy):
    examples = _as_examples(batch)
    outer = trace.current_run()
    if outer is not None:  # nested inside another run: that run batches everything
        return [fn(*leading, x, *args, **kwargs) for x in examples]
    if len(examples) == 0:
        return []
    run = trace.Run(strategy)
    run.stats = profile.Stats(strategy=strategy, examples=len(examples))
    counters = dict(rules.counters)
    gc_was_enabled = _pause_gc()
    t0 = time.perf_counter()
    try:
        with trace.recording(run):
            outs = _trace_examples(run, fn, leading, examples, args, kwargs)
            run.stats.trace_s = time.perf_counter() - t0 - run.stats.schedule_s \
                - run.stats.execute_s
            execute_pending(run, [lt.node for lt in lazy_tensors(outs)])
        # one cache for every example: their results are rows of the same batch outputs,
        # each unbound once (one autograd node) rather than once per example
        rows: dict = {}
        result = [materialize(o, rows) for o in outs]
        # the outputs' nodes reach the whole graph through their inputs: dropped here, the
        # graph dies in _close, before the free lists are emptied (NOTE [free lists at
        # close])
        outs = rows = None
    except BaseException:
        run.failed = True
        raise
    finally:
        _close(run, counters)
        if gc_was_enabled:
            gc.enable()
    return result


def _trace_examples(run, fn, leading, examples, args, kwargs) -> list:
    """Run the per-example code of every example. Each runs in its own greenlet: when one
    reads a value (``x.item()``, ``bool(x)``...), it is suspended until every other example
    has run to its own read or its end; then everything pending executes, batched, and
    the suspended ones resume (NOTE [reads]). A greenlet switch costs about 1 us here,
    a thread hand-off about 30 us, and torch's thread-local state (grad mode, the
    torch-function mode stack) stays one thread's."""
    outs = [None] * len(examples)

    def trace_one(i, example):
        try:
            outs[i] = fn(*leading, trace.wrap_example(run, example), *args, **kwargs)
        except DynbatchError:
            raise
        except Exception as err:
            err.add_note(f"dynbatch: raised by the per-example code for examples[{i}]")
            raise

    if greenlet is None or len(examples) == 1:
        for i, example in enumerate(examples):
            run.example = i
            trace_one(i, example)
        return outs
    run.main = greenlet.getcurrent()
    grad = torch.is_grad_enabled()
    tasks = [(i, greenlet.greenlet(functools.partial(trace_one, i, x), run.main))
             for i, x in enumerate(examples)]
    try:
        active = tasks
        while active:
            suspended = []
            for i, task in active:
                run.example = i
                # A fresh example starts in the caller's grad mode even if the one before
                # it was suspended inside no_grad; a resumed one restores its own (force).
                _set_grad(grad)
                task.switch()
                if not task.dead:
                    suspended.append((i, task))
            if suspended:
                run.rounds += 1
                wanted, run.wanted = run.wanted, []
                execute_pending(run, wanted)
            active = suspended
    finally:
        run.main = None
        for _, task in tasks:      # after a failure: unwind the others' frames now
            if not task.dead:
                task.throw(greenlet.GreenletExit)
        _set_grad(grad)            # unwinding no_grad blocks out of order may have left it
    return outs


def _set_grad(mode: bool) -> None:
    if torch.is_grad_enabled() != mode:
        with torch._C.DisableTorchFunction():
            torch._C._set_grad_enabled(mode)


def _pause_gc() -> bool:
    """A run allocates tens of thousands of small acyclic objects (nodes, keys, lazy
    tensors); the cyclic collector would rescan them over and over (measured: trace time
    x2-x4 on a Tree-LSTM minibatch). Reference counting frees them all the same."""
    enabled = gc.isenabled()
    gc.disable()
    return enabled


def _close(run, counters) -> None:
    run.closed = True
    stats = run.stats
    stats.nodes = len(run.graph.nodes)
    stats.signatures = len(run.signatures_run)
    stats.fallbacks = rules.counters["fallbacks"] - counters["fallbacks"]
    stats.vmap_batches = rules.counters["vmap"] - counters["vmap"]
    stats.rounds = run.rounds
    run.graph = None          # the nodes point at the run; dropping the graph frees them
    run.local_signatures = None
    run.templates = None
    run.block_sites = None
    run.op_sites = None
    # The shared immediates point at the run too: a cycle the garbage collector would
    # free only at its next full pass (the collector is off while a run traces). Those
    # objects (one per distinct word id and label, and their lazy tensors), made all
    # through the trace, would live on through the backward pass in the memory the graph
    # leaves (Python keeps a 1 MB arena while one object in it lives).
    run.int_immediates = None
    run.signatures_run = None
    if not run.failed:
        _empty_free_lists(stats)
        profile.publish(stats)


# NOTE [free lists at close]
# A run's nodes, keys and plans are small objects in Python's 1 MiB arenas, and an arena
# goes back to the system only once every object in it is freed. When the graph dies at
# close, many of its tuples, lists and dicts do not go back: they refill the interpreter's
# free lists (2,000 tuples of each length, 80 lists, 80 dicts), kept for reuse. Those few
# thousand objects are spread over the run's arenas and keep most of them resident through
# the backward pass, whose gradients then set the step's peak on top. A collection of the
# oldest generation empties the free lists (the gc module documents it); with every object
# frozen first it has nothing to scan, and costs under a millisecond
# (``Stats.free_lists_s``; SST per-op, 0.2-0.3 ms at B=64, 0.5-0.6 at B=256: python
# benchmarks/time_split.py --batch 256 --minibatches 4 --rounds 3) instead of a pass over
# every object the process tracks. So a large run, once its graph is freed, freezes,
# collects and unfreezes. SST per-op, B=256 after eight B=64 steps, MB over the base (python
# benchmarks/memory_phases.py --warm 64 --steps 4): resident when the forward returns +56.2
# -> +46.1; the step's peak +67.3 -> +61.0, now the forward's own; the next three steps'
# peaks +55.5..56.7 -> +50.2..51.0. Unfreezing puts every object in the oldest generation,
# so cycles made just before the run wait for the next full collection. A process that froze
# objects itself (gc.get_freeze_count()) is left alone: unfreezing would undo that.
_FREE_LISTS_MIN_NODES = 16_384     # smaller runs leave too little behind to be worth it


def _empty_free_lists(stats) -> None:
    if stats.nodes < _FREE_LISTS_MIN_NODES or gc.get_freeze_count():
        return
    t0 = time.perf_counter()
    gc.freeze()
    try:
        gc.collect()
    finally:
        gc.unfreeze()
    stats.free_lists_s = time.perf_counter() - t0


@contextlib.contextmanager
def autobatch(strategy: str = "agenda"):
    """Scope form: every torch call on per-example data inside is recorded; leaving the
    scope executes everything pending, batched. Inside, ``db.force(y)``, ``y.item()``,
    ``bool(y)`` give values at once; afterwards ``y.value`` is the real tensor::

        with db.autobatch() as run:
            ys = [model(x) for x in xs]      # LazyTensors
        outs = [y.value for y in ys]
    """
    _check_strategy(strategy)
    outer = trace.current_run()
    if outer is not None:
        yield outer
        return
    run = trace.Run(strategy)
    run.scope = True
    run.stats = profile.Stats(strategy=strategy)
    counters = dict(rules.counters)
    gc_was_enabled = _pause_gc()
    t0 = time.perf_counter()
    try:
        with trace.recording(run):
            yield run
            run.stats.trace_s = time.perf_counter() - t0 - run.stats.schedule_s \
                - run.stats.execute_s
            execute_pending(run)
    except BaseException:
        run.failed = True
        raise
    finally:
        _close(run, counters)
        if gc_was_enabled:
            gc.enable()
