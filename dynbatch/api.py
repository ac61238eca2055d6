"""The public front door: ``batched``, ``autobatch``, ``force``, ``block``, ``stats``,
and ``DataLoader`` (loader.py).

``batched`` and ``autobatch`` share one run lifecycle (session.Run): a run is made, made
current in this thread for as long as it records, executed, and closed whatever happens.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Sequence

import torch
from torch.utils._pytree import tree_flatten

from . import profile
from .blocks import block
from .errors import Site, user_site
from .lazy import LazyTensor, current
from .results import materialized
from .schedule import STRATEGIES
from .loader import DataLoader, PlannedBatch
from .session import Run, run_examples

__all__ = ["batched", "autobatch", "force", "block", "stats", "DataLoader"]


def _opaque(fn, recursive: bool = True):
    """``fn`` behind a wall for torch.compile. NOTE [opaque to torch.compile]: dynamo must
    not trace dynbatch. A run is Python over per-example objects (greenlets, frames, a
    graph as long as the minibatch) that dynamo would guard on and compile again for every
    minibatch. Disabled, an entry point is one graph break in the user's compiled code and
    runs as plain Python, with everything it calls (the disable is recursive), the user's
    per-example code included: that code works on lazy tensors, which no compiler sees.
    Lazy tensors that leave a run (LazyTensor's own methods) are not behind the wall."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)   # torch >= 2.1
    return fn if disable is None else disable(fn, recursive=recursive)


try:    # what torch.compiler.disable calls: private, so only where torch has it
    from torch._C._dynamo.eval_frame import set_eval_frame as _set_eval_frame
except ImportError:
    _set_eval_frame = None


def _swap_evaluator(evaluator):
    """Make ``evaluator`` this thread's frame evaluator (dynamo's hook; None: frames run as
    plain Python); the one it replaces."""
    return None if _set_eval_frame is None else _set_eval_frame(evaluator)


def stats() -> profile.Stats:
    """Counters and timings of the last finished run of this thread (``profile.Stats``)."""
    return profile.last()


@_opaque
def force(x):
    """The real value of a lazy tensor, or of every lazy tensor in a structure (any
    container torch's pytree knows), executing pending work, batched, first. Plain values
    pass through. A structure is forced in one go: one suspension of the example."""
    lazies = [v for v in tree_flatten(x)[0] if type(v) is LazyTensor]
    if not lazies:
        return x
    runs = {id(lt.node.owner): lt.node.owner for lt in lazies}
    for run in runs.values():
        if not run.closed:
            run.force(lazies if len(runs) == 1 else
                      [lt for lt in lazies if lt.node.owner is run])
    return materialized(x, {}) if type(x) is not LazyTensor else x.value


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

    def __get__(self, instance, *owner):
        # ``*owner``: where torch.compile(model) meets ``model.forward``, dynamo compiles
        # this frame on its own and guards on each named argument; a named owner (the
        # model's class) by identity, one more compiled entry per class until its
        # recompile limit. An unnamed owner is not guarded.
        if instance is None:
            return self
        return _BoundBatched(self, instance)

    @property
    def __dynbatch_batched__(self) -> tuple:
        """(code for one example, leading arguments, strategy): what db.DataLoader plans."""
        return (self.fn, (), self.strategy) if not self._method else None

    @_opaque
    def __call__(self, *args, **kwargs):
        if self._method:
            if len(args) < 2:
                raise TypeError(f"{self.fn.__qualname__}: expected (self, batch, ...)")
            return run_batched(self.fn, args[1], (args[0],), args[2:], kwargs, self.strategy)
        if not args:
            raise TypeError(f"{self.fn.__qualname__}: the first argument must be the "
                            "minibatch (a sequence of examples)")
        return run_batched(self.fn, args[0], (), args[1:], kwargs, self.strategy)


class _BoundBatched:
    """A ``@db.batched`` method of an instance (``model.forward``)."""

    __slots__ = ("batched", "instance")

    def __init__(self, batched: _Batched, instance):
        self.batched, self.instance = batched, instance

    @_opaque
    def __call__(self, batch, *args, **kwargs):
        b = self.batched
        return run_batched(b.fn, batch, (self.instance,), args, kwargs, b.strategy)

    @property
    def __dynbatch_batched__(self) -> tuple:
        return self.batched.fn, (self.instance,), self.batched.strategy

    def __repr__(self) -> str:
        return f"<batched method {self.batched.fn.__qualname__} of {self.instance!r}>"


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
        if batch.dim() == 0:
            _not_a_sequence(batch)
        return list(batch.unbind(0))
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        _not_a_sequence(batch)
    if isinstance(batch, (list, tuple)) and type(batch) not in (list, tuple):
        # an example that is itself a sequence (nltk.Tree subclasses list): as a minibatch
        # its children would run as examples, silently; a batch is a plain list or tuple
        base = "list" if isinstance(batch, list) else "tuple"
        raise TypeError(f"the minibatch is a {_type_name(batch)}, a subclass of {base}: "
                        f"that looks like one example; pass a list of examples ([example] "
                        f"to run one){_called()}")
    return batch


def _type_name(x) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _not_a_sequence(batch):
    raise TypeError(f"the minibatch must be a sequence of examples (a list or tuple), got "
                    f"{type(batch).__name__}; to run one example, pass [example]{_called()}")


def _called() -> str:
    site = Site.of(user_site())
    return "" if site is None else f"\n  called at {site}"


@_opaque
def run_batched(fn, batch, leading, args, kwargs, strategy):
    if type(batch) is PlannedBatch:     # from db.DataLoader: its plan was made ahead
        return batch.run(fn, leading, args, kwargs, strategy)
    examples = _as_examples(batch)
    if current.tracer is not None:  # inside another run's per-example code: it batches all
        return [fn(*leading, x, *args, **kwargs) for x in examples]
    if len(examples) == 0:
        return []
    return run_examples(fn, list(examples), leading, args, kwargs, strategy)


def autobatch(strategy: str = "agenda") -> _Scope:
    """Scope form: every torch call on per-example data inside is recorded; leaving the
    scope executes everything still needed, batched. Inside, ``db.force(y)``,
    ``y.item()``, ``bool(y)`` give values at once; afterwards ``y.value`` is the real
    tensor::

        with db.autobatch() as run:
            ys = [model(x) for x in xs]      # LazyTensors
        outs = [y.value for y in ys]
    """
    _check_strategy(strategy)
    return _Scope(_scope(strategy))


class _Scope:
    """What ``db.autobatch()`` returns: the scope's run, with torch.compile paused in this
    thread from entering the scope to leaving it. NOTE [opaque to torch.compile], for a
    scope: its body is the user's code recording on lazy tensors, so no frame may be
    compiled until the scope closes, and a disabled function cannot cover a ``with`` body.
    So entering swaps the thread's frame evaluator for None, as torch.compiler.disable
    does around a call, and leaving puts it back. Both methods are disabled without
    recursion: dynamo does not trace their own frames, and the evaluator they swap is the
    one the user's code runs under."""

    __slots__ = ("_cm", "_evaluator")

    def __init__(self, cm):
        self._cm = cm

    def __enter__(self):
        self._evaluator = _swap_evaluator(None)
        try:
            return self._cm.__enter__()
        except BaseException:
            _swap_evaluator(self._evaluator)
            raise

    def __exit__(self, kind, err, tb):
        try:
            return self._cm.__exit__(kind, err, tb)
        finally:
            _swap_evaluator(self._evaluator)

    __enter__ = _opaque(__enter__, recursive=False)
    __exit__ = _opaque(__exit__, recursive=False)


@contextlib.contextmanager
def _scope(strategy: str):
    if current.tracer is not None:
        yield current.tracer
        return
    run = Run(strategy, scope=True)
    t0 = time.perf_counter()
    with run:
        yield run
        run.stats.trace_s = time.perf_counter() - t0 - run.stats.schedule_s \
            - run.stats.execute_s
        run.execute(final=True)
