"""A run: one ``@db.batched`` call or ``db.autobatch`` scope, in one thread.

Lifecycle: record every example (each in its own greenlet, so that one that reads a value
waits for the others: NOTE [reads]); schedule, plan and execute what the results need;
turn lazy results into real tensors; close. Closing always restores what the run changed
(this thread's current tracer and torch-function mode, the patched torch functions and
``nn.Module.__call__``), and a failed run leaves ``stats()`` as it was.

NOTE [reads]: reading a value (``int(x)``, ``x.item()``, a data-dependent op) in
per-example code needs the pending work it depends on executed. The example is suspended
until every other example has run to a read or to its end; then everything pending that
anything needs executes, batched, and the suspended examples resume. Greenlets, not
threads: a switch is cheap, and torch's thread-local state (grad mode, the torch-function
mode stack) stays one thread's; each example keeps its own grad mode, autocast and default
dtype across a suspension.
"""
from __future__ import annotations

import functools
import gc
import sys
import time

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

try:
    import greenlet
except ImportError:     # without it reads still give exact values, but run unbatched
    greenlet = None

from . import blocks, execute, intercept, plan, profile, schedule, trace
from .errors import (DynbatchError, MixedRunError, PlanAheadError, UnsupportedError,
                     user_site, warn_at, where)
from .graph import Constant, Node
from .infer import warm_up
from .lazy import LazyTensor, current
from .results import materialized, update_captures
from .state import restore, snapshot
from .template import SCALARS

_getrefcount = sys.getrefcount


def _held_baseline() -> int:
    """What getrefcount says, in ``Run.held``, of a node no lazy tensor holds: the graph's
    list and a slice of it. Measured, not assumed."""
    probe = object()
    nodes = [probe]
    del probe
    return list(map(_getrefcount, nodes[0:]))[0]


_BASELINE = _held_baseline()


class Run(trace.Tracer):
    """The run recording in this thread: its graph (trace.Tracer), the store of batch
    outputs, its counters. ``with run:`` makes it current."""

    def __init__(self, strategy: str, scope: bool = False, examples: int = 0):
        super().__init__()
        self.strategy = strategy
        self.scope = scope
        self.store: list = []           # batch outputs (tuples), by store number
        self.members: list = []         # node ids of each store entry, in row order
        self.stats = profile.Stats(strategy=strategy, examples=examples)
        self.main = None                # the greenlet that schedules suspended examples
        self.wanted: list = []          # nodes the suspended examples wait to read
        self.signatures_run: set = set()
        self.inference = torch.is_inference_mode_enabled()
        self.failed = False
        self.planning = False           # plan_ahead: nothing executes, nothing reads
        self._mode = None
        self._gc = False

    @property
    def rounds(self) -> int:
        """Times the examples were suspended at reads and resumed (NOTE [reads])."""
        return self.stats.rounds

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self):
        if current.tracer is not None:
            raise DynbatchError("a dynbatch run is already recording in this thread")
        warm_up()
        self.hooked = blocks.global_hooks()
        intercept.patch_hot_functions()
        blocks.install()
        self._mode = intercept.mode()
        self._mode.__enter__()
        current.tracer = self
        self._gc = gc.isenabled()
        gc.disable()    # a run makes many small acyclic objects: reference counting frees them
        return self

    def __exit__(self, kind, err, tb):
        current.tracer = None
        try:
            self._mode.__exit__(kind, err, tb)
        finally:
            blocks.uninstall()
            intercept.unpatch_hot_functions()
            if self._gc:
                gc.enable()
            self.failed = self.failed or kind is not None
            self.close()
        return False

    def close(self) -> None:
        self.closed = True
        stats = self.stats
        stats.nodes = len(self.graph.nodes)
        stats.signatures = len(self.signatures_run)
        # Nodes and constants point at their run: the graph's lists of them make a cycle
        # that reference counting alone would not free. Lazy tensors still held (a result
        # the user kept) read their values from the store and the graph's placement.
        self.graph.nodes = []
        self.graph.constants = []
        self.signatures = self.immediates = self.viewed = self.signatures_run = None
        self.wanted = []
        if not self.failed:
            _empty_free_lists(stats)
            profile.publish(stats)

    # -- execution ------------------------------------------------------------------------
    def held(self) -> set[int]:
        """Ids of the pending nodes that a lazy tensor holds (a result, a value kept)."""
        graph = self.graph
        graph.placed()
        start, batch_of = graph.first_pending, graph.batch_of
        # reference counts in one C loop: the slice's list holds each node once more
        counts = list(map(_getrefcount, graph.nodes[start:]))
        base = _BASELINE
        return {start + k for k, c in enumerate(counts)
                if c > base and batch_of[start + k] is None}

    def execute(self, wanted=(), final: bool = False) -> None:
        """Schedule, plan and run what the pending nodes held by lazy tensors, and
        ``wanted``, need (NOTE [dead code] in schedule.py). ``final``: nothing will be
        recorded after it."""
        with torch._C.DisableTorchFunction():   # dynbatch's own torch calls: not recorded
            self._execute(wanted, final)

    def _execute(self, wanted, final, plan_only=False):
        t0 = time.perf_counter()
        graph = self.graph
        # A read in @batched code runs only what the reads need: values computed for
        # later might turn out to be needed only through non-differentiable calls, and
        # must not be batched with values needed through differentiable ones before that
        # is known (NOTE [detached rows] in plan.py). In a scope the user's own loop comes
        # back for the other values held: they run now too, batched.
        held = self.held()        # (and graph.placed())
        batch_of = graph.batch_of
        held.update(n.id for n in wanted if batch_of[n.id] is None)
        targets = {n.id for n in wanted if batch_of[n.id] is None} \
            if wanted and not self.scope else held
        if not targets:
            return
        nodes = graph.nodes
        start = graph.first_pending
        numbers = None
        if batch_of.count(None) == len(nodes) - start:     # every node from start pending
            pending = nodes if start == 0 else nodes[start:]
            inputs, offset = (n.inputs for n in pending), start
            local = [i - start for i in targets]
            if start == 0:      # NOTE [schedule memory] in schedule.py
                numbers = [n.id for n in pending]
        else:       # after a read, executed nodes interleave: number the pending afresh
            pending = [n for n in nodes[start:] if batch_of[n.id] is None]
            number = {n.id: k for k, n in enumerate(pending)}
            inputs = (tuple(number[i] for i in n.inputs if i in number) for n in pending)
            offset = 0
            local = [number[i] for i in targets]
        # a node runs with its signature's family where it has one (NOTE [ragged groups])
        batches = schedule.schedule(self.strategy, [n.sig.family or n.sig for n in pending],
                                    inputs, offset, local, numbers)
        del inputs, numbers
        earlier = tuple(k for k, entry in enumerate(self.store) if entry is not None)
        the_plan = plan.build(graph, pending, batches, len(self.store), targets, held,
                              self._kept, self.members, final, earlier)
        del pending, batches
        t1 = time.perf_counter()
        self.stats.schedule_s += t1 - t0
        self.signatures_run.update(step.sig for step in the_plan.steps)
        if plan_only:
            return the_plan
        execute.execute(the_plan, self.store, self.stats, self.where_of)
        while graph.first_pending < len(nodes) and batch_of[graph.first_pending] is not None:
            graph.first_pending += 1
        self.stats.execute_s += time.perf_counter() - t1

    def _kept(self, node_id: int) -> bool:
        return _getrefcount(self.graph.nodes[node_id]) > _BASELINE - 1

    def where_of(self, node_id: int, order: bool = False):
        example = self.graph.example_of(node_id)
        if order:
            return -1 if example is None else example
        return where(example, self.graph.nodes[node_id].site)

    # -- values ---------------------------------------------------------------------------
    def value_of(self, lazy: LazyTensor) -> torch.Tensor:
        node = lazy.node
        if isinstance(node, Constant):
            return node.as_tensor()
        graph = self.graph
        if not graph.computed(node.id):
            self.force([lazy])
        batch = graph.batch_of[node.id] if graph.computed(node.id) else None
        outputs = self.store[batch] if batch is not None else None
        if outputs is None:
            raise MixedRunError("this lazy tensor's run ended before it was computed (the "
                                "run failed); recompute it in a new run")
        with torch._C.DisableTorchFunction():
            value = outputs[lazy.index][graph.row_of[node.id]]
            return value if lazy.meta.requires_grad else value.detach()

    def force(self, lazies) -> None:
        """Execute what the given lazy tensors need: in @batched code, after every other
        example has reached a read too (NOTE [reads])."""
        graph = self.graph
        pending = [lt.node for lt in lazies
                   if type(lt.node) is Node and not graph.computed(lt.node.id)]
        if not pending:
            return
        if self.closed:
            raise MixedRunError("this lazy tensor's run ended before it was computed (the "
                                "run failed); recompute it in a new run")
        if self.planning:
            raise PlanAheadError("per-example code that reads a value (int(x), x.item(), "
                                 "a data-dependent op) cannot be planned ahead, where "
                                 f"nothing executes ({where(self.example, user_site(2))}); "
                                 "plan it in the main process: db.DataLoader(..., "
                                 "num_workers=0)")
        if self.main is not None and greenlet.getcurrent() is not self.main:
            if torch.is_inference_mode_enabled() != self.inference:
                self.unsupported("reading a value inside torch.inference_mode() in "
                                 "per-example code (use torch.no_grad() there)")
            saved = snapshot()
            self.wanted.extend(pending)
            self.main.switch()
            restore(saved)
        elif self.main is None and not self.scope and self.stats.examples > 1:
            _warn_serial_reads()
        if any(not graph.computed(n.id) for n in pending):
            if self.main is None:       # a read in a scope or one example: runs here
                self.stats.reads.append(self.stats.batches)
            self.execute(pending)

    def read(self, fn, args, kwargs):
        """A call that reads values (``x.item()``, a data-dependent op): run eagerly on the
        values of its lazy inputs; tensors it makes are per-example constants."""
        lazies = [x for x in tree_flatten((args, kwargs))[0] if type(x) is LazyTensor]
        self.force(lazies)
        values = tree_map_only(LazyTensor, lambda lt: lt.value, (args, kwargs))
        with torch._C.DisableTorchFunction():
            out = fn(*values[0], **values[1])
        return tree_map_only(torch.Tensor, self.constant, out)

    # -- recording the examples -----------------------------------------------------------
    def trace_examples(self, fn, leading, examples, args, kwargs) -> list:
        """Run the per-example code of every example, each in its own greenlet (NOTE
        [reads])."""
        outs = [None] * len(examples)
        graph = self.graph

        def trace_one(i, example):
            try:
                outs[i] = fn(*leading, self.wrap_example(example), *args, **kwargs)
            except DynbatchError:
                raise
            except Exception as err:
                err.add_note(f"dynbatch: raised by the per-example code for examples[{i}]")
                raise

        if greenlet is None or len(examples) == 1:
            for i, example in enumerate(examples):
                self.example = i
                graph.begin_example(i)
                trace_one(i, example)
            return outs
        self.main = greenlet.getcurrent()
        caller = snapshot()
        tasks = [(i, greenlet.greenlet(functools.partial(trace_one, i, x), self.main))
                 for i, x in enumerate(examples)]
        try:
            active = tasks
            while active:
                suspended = []
                for i, task in active:
                    self.example = i
                    graph.begin_example(i)
                    if not task:            # a fresh example starts in the caller's state
                        restore(caller)
                    task.switch()
                    if not task.dead:
                        suspended.append((i, task))
                if suspended:
                    self.stats.rounds += 1
                    self.stats.reads.append(self.stats.batches)
                    restore(caller)
                    wanted, self.wanted = self.wanted, []
                    self.execute(wanted)
                active = suspended
        finally:
            self.main = None
            for _, task in tasks:       # after a failure: unwind the others' frames now
                if not task.dead:
                    task.throw(greenlet.GreenletExit)
            restore(caller)
        return outs

    def wrap_example(self, example):
        """Tensors that are the example or sit in its lists, tuples and dicts (any
        container torch's pytree knows) are per-example constants."""
        if isinstance(example, torch.Tensor):
            return self.constant(example)
        if type(example) not in _CONTAINERS and not isinstance(example, (tuple, dict)):
            return example          # an nltk Tree (a list subclass), a dataclass: as it is
        if _plain(example):         # lists of word ids: nothing to wrap, no pytree walk
            return example
        return tree_map_only(torch.Tensor, self.constant, example)

    def finish(self, results) -> list:
        """Execute what is still pending and needed; the results with real tensors."""
        self.execute(final=True)
        cache: dict = {}
        return [materialized(r, cache) for r in results]

    def final_plan(self, results) -> plan.Plan:
        """The plan of everything the results need, not executed, with where each result's
        values will lie (``Plan.results``)."""
        with torch._C.DisableTorchFunction():
            the_plan = self._execute((), True, plan_only=True) or plan.Plan()
        graph = self.graph
        layouts = []
        for result in results:
            leaves, spec = tree_flatten(result)
            places = []
            for x in leaves:
                if type(x) is not LazyTensor:
                    places.append(("value", x))
                elif isinstance(x.node, Constant):
                    places.append(("value", x.node.as_tensor()))
                else:
                    i = x.node.id
                    places.append(("row", graph.batch_of[i], x.index, graph.row_of[i],
                                   x.meta.requires_grad))
            layouts.append((spec, places))
        the_plan.results = layouts
        return the_plan


def run_examples(fn, examples: list, leading: tuple, args: tuple, kwargs: dict,
                 strategy: str) -> list:
    """``fn(*leading, example, *args, **kwargs)`` for every example, batched, in this
    process: trace, schedule, execute (what ``@db.batched`` does)."""
    run = Run(strategy, examples=len(examples))
    t0 = time.perf_counter()
    with run:
        outs = run.trace_examples(fn, leading, examples, args, kwargs)
        run.stats.trace_s = time.perf_counter() - t0 - run.stats.schedule_s \
            - run.stats.execute_s
        cache: dict = {}
        result = run.finish(outs)
        update_captures(list(args) + list(kwargs.values()) + list(examples), cache)
        outs = None
    return result


_CONTAINERS = (list, tuple, dict)
_SCALARS = SCALARS + (str, type(None))


def _plain(example, depth: int = 0) -> bool:
    """Whether ``example`` is plain lists and tuples (nested at most twice) of Python
    scalars: then it holds no tensor."""
    for x in example:
        t = type(x)
        if t in _SCALARS:
            continue
        if (t is list or t is tuple) and depth < 2 and _plain(x, depth + 1):
            continue
        return False
    return type(example) is list or type(example) is tuple


_warned_serial_reads = [False]


def _warn_serial_reads() -> None:
    """Without greenlet (a declared dependency, so a broken install) a read cannot wait
    for the other examples: values stay exact, but every read runs one example's pending
    work on its own. Said once rather than being silently slow."""
    if not _warned_serial_reads[0]:
        _warned_serial_reads[0] = True
        warn_at("dynbatch: greenlet is not installed, so a value read in per-example code "
                "runs that example's work unbatched; pip install greenlet", user_site(2))


# NOTE [free lists at close]: a run's nodes and plans are small objects in Python's 1 MiB
# arenas, and an arena goes back to the system only once every object in it is freed.
# When the graph dies at close, many of its tuples, lists and dicts do not go back: they
# refill the interpreter's free lists, kept for reuse, and those few thousand objects
# spread over the run's arenas keep most of them resident through the backward pass. A
# collection of the oldest generation empties the free lists (the gc module documents
# it); with every object frozen first it has nothing to scan. So a large run, once its
# graph is freed, freezes, collects and unfreezes. A process that froze objects itself
# (gc.get_freeze_count()) is left alone: unfreezing would undo that.
_FREE_LISTS_MIN_NODES = 16_384      # smaller runs leave too little behind to be worth it


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


__all__ = ["Run", "UnsupportedError"]
