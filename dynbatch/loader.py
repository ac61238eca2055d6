"""``db.DataLoader``: minibatches whose plans are made ahead, in DataLoader workers.

A worker traces and schedules its minibatch (ahead.plan_ahead), computes the gathers,
and sends the plan as a few arrays (wire.py); ``fn(batch, *args)`` in the main process then
only unpacks it, gathers, makes the batched calls and assembles the results, against the
live parameters (named by path: refs.py). TensorFlow Fold built its loom inputs in a
process pool for the same reason: the Python of tracing stays off the critical path.

NOTE [plan validity]: a plan holds what the per-example code did with the arguments as
they were when it was traced. So each minibatch is asked for with the main process's
state (grad mode, autocast, default dtype, and every module's ``training`` and other plain
attributes: refs.binding), which the worker takes on before tracing; at execution the
state must still be the same, or the minibatch is traced again here (with a warning: the
state changed between asking and running). The arguments' structure (module and parameter
paths, shapes, dtypes, devices) must be the one planned for, or it is an error: the plan
would name parameters that are not there.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Sequence

import torch.utils.data as tud
from torch import nn

from . import ahead, plan, profile, refs, session, wire
from .errors import ExecuteError, PlanAheadError, PlanError, user_site, warn_at
from .state import entered, state_now


class _Request(list):
    """A minibatch's dataset indices, with the main process's state when it was asked
    for (NOTE [plan validity])."""

    def __init__(self, indices, state, modules):
        super().__init__(indices)
        self.state, self.modules = state, modules


class _Requests:
    """A batch sampler whose index lists carry the state (``_Request``)."""

    def __init__(self, batches, call_args):
        self.batches, self.call_args = batches, call_args

    def __iter__(self):
        for indices in self.batches:
            yield _Request(indices, state_now(), refs.binding(self.call_args)[2])

    def __len__(self) -> int:
        return len(self.batches)


class _Examples(tud.Dataset):
    """The examples as a map-style dataset whose minibatch fetch hands the request on:
    the planner (the collate function) reads the examples itself."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __getitems__(self, request):
        return request


class _Planned:
    """What travels from a worker: the indices, the packed plan (None: the code reads
    values, so it runs in the main process), the examples when the main process cannot
    look them up itself, else the ``id`` of each example planned (a forked worker's
    objects keep their ids: the main process checks that it finds the same ones)."""

    __slots__ = ("indices", "packed", "examples", "ids")

    def __init__(self, indices, packed, examples, ship):
        self.indices, self.packed = indices, packed
        self.examples = examples if ship else None
        self.ids = None if ship else [id(x) for x in examples]

    def pin_memory(self):
        if self.packed is not None:
            self.packed.pin_memory()
        return self


class _Planner:
    """The collate function: plans one minibatch, in a worker or in the main process."""

    def __init__(self, examples, fn, leading, args, strategy, ship):
        self.examples, self.fn, self.leading, self.args = examples, fn, leading, args
        self.strategy, self.ship = strategy, ship
        self.call_args = leading + args
        self.live = False           # the code reads values: run it in the main process
        self._keys = None

    def __call__(self, request: _Request) -> _Planned:
        examples = [self.examples[i] for i in request]
        worker = tud.get_worker_info() is not None
        if self.live:
            return _Planned(list(request), None, examples, self.ship)
        if worker:
            plan.CONSTANTS_ON_HOST[0] = True     # NOTE [host constants]
            refs.set_module_state(self.call_args, request.modules)
        t0 = time.perf_counter()
        stats = profile.Stats()
        try:
            with entered(request.state):
                made = ahead.plan_ahead(self.fn, examples, self.args, {}, self.strategy,
                                          self.leading, stats)
        except PlanAheadError:
            if worker:
                raise
            self.live = True
            return _Planned(list(request), None, examples, self.ship)
        except Exception as err:
            if worker and "CUDA" in str(err):
                err.add_note("dynbatch: a DataLoader worker forked from a process that "
                             "uses CUDA cannot use CUDA: create per-example tensors on the "
                             "CPU (torch.tensor(scalar, device=...) is fine), or plan in "
                             "the main process (num_workers=0)")
            err.add_note(f"dynbatch: while planning ahead the minibatch of dataset indices "
                         f"{_short(request)} (examples[i] is the i-th of them)"
                         + (f", in DataLoader worker {tud.get_worker_info().id}" if worker
                            else ""))
            raise
        structure, ids, _ = refs.binding(self.call_args)
        if self._keys is None or self._keys[0] != ids:
            self._keys = (ids, refs.SignatureKeys(self.call_args))
        t1 = time.perf_counter()
        packed = wire.pack(made, self._keys[1], stats.nodes)
        packed.meta = {"structure": structure, "state": (request.state, request.modules),
                       "trace_s": stats.trace_s, "schedule_s": stats.schedule_s,
                       "sites": made.sites,
                       "pack_s": time.perf_counter() - t1, "plan_s": time.perf_counter() - t0}
        return _Planned(list(request), packed, examples, self.ship)


def _short(indices) -> str:
    return str(list(indices)) if len(indices) <= 8 else \
        f"[{', '.join(map(str, indices[:8]))}, ... ({len(indices)} in all)]"


class DataLoader:
    """Minibatches of ``examples`` for ``fn``, a ``@db.batched`` function or method
    (``model.forward``; a module whose forward is one), each planned ahead: traced and
    scheduled in DataLoader workers (``num_workers``), so that ``fn(batch, *args)`` in the
    main process only executes the plan::

        loader = db.DataLoader(trees, model.forward, batch_size=64, shuffle=True,
                               num_workers=2)
        for batch in loader:            # a sequence of the minibatch's examples
            loss = torch.stack(model(batch)).sum()   # the plan made ahead runs here

    ``fn(batch, *args)`` returns exactly what ``fn(list(batch), *args)`` returns, with the
    parameters as they are when it runs. ``*args`` are the arguments ``fn`` takes after
    the minibatch; other keyword arguments (``sampler``, ``drop_last``,
    ``persistent_workers``, ``pin_memory``, ``generator``, ...) pass on to
    ``torch.utils.data.DataLoader``. ``num_workers=0`` plans in the main process.

    Code that reads values mid-run (``int(x)``, ``x.item()``) cannot be planned ahead:
    with workers it is an error (PlanAheadError); with ``num_workers=0`` it runs as
    ``@db.batched`` runs it. NOTE [plan validity] says when a plan is made again.
    Fork-started workers (the Linux default) see the model as it was when they started;
    make the model, and move it to its device, before iterating.
    """

    def __init__(self, examples, fn, *args, batch_size: int | None = 1, shuffle=False,
                 sampler=None, batch_sampler=None, drop_last: bool = False,
                 generator=None, **kwargs):
        parts = _batched_parts(fn)
        self.fn, self.leading, self.strategy = parts
        self.args = tuple(args)
        self.call_args = self.leading + self.args
        self.examples = examples
        if isinstance(examples, tud.IterableDataset):
            raise TypeError("db.DataLoader needs examples it can index (a list or a "
                            "map-style Dataset), not an IterableDataset")
        dataset = _Examples(examples)
        if batch_sampler is not None and (batch_size != 1 or shuffle or sampler is not None
                                          or drop_last):
            raise ValueError("batch_sampler excludes batch_size, shuffle, sampler and "
                             "drop_last (as in torch.utils.data.DataLoader)")
        if batch_sampler is None:
            if batch_size is None:
                raise ValueError("db.DataLoader makes minibatches: batch_size must be set")
            if sampler is None:
                sampler = tud.RandomSampler(dataset, generator=generator) if shuffle else \
                    tud.SequentialSampler(dataset)
            elif shuffle:
                raise ValueError("sampler and shuffle=True exclude each other")
            batch_sampler = tud.BatchSampler(sampler, batch_size, drop_last)
        self.batch_sampler = batch_sampler
        self.planner = _Planner(examples, self.fn, self.leading, self.args, self.strategy,
                                ship=not isinstance(examples, (list, tuple)))
        self.loader = tud.DataLoader(dataset, batch_sampler=_Requests(batch_sampler,
                                                                      self.call_args),
                                     collate_fn=self.planner, generator=generator,
                                     **kwargs)
        context = self.loader.multiprocessing_context
        if self.loader.num_workers and (context or mp).get_start_method() != "fork":
            self.planner.ship = True    # a spawned worker's examples are copies
        self._signatures = None     # (ids of the arguments' objects, refs.Signatures)
        self._warned = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for planned in self.loader:
            yield PlannedBatch(planned, self)

    def signatures(self, ids: tuple) -> refs.Signatures:
        """The signature table for the arguments as they are (``ids``: refs.binding):
        made again when an argument's object is another one."""
        if self._signatures is None or self._signatures[0] != ids:
            self._signatures = (ids, refs.Signatures(self.call_args,
                                                     lambda: session.Run("agenda")))
        return self._signatures[1]

    def warn_replanned(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warn_at(f"dynbatch: {what} changed between asking the DataLoader for a "
                    "minibatch and running it, so it was planned again in the main process "
                    "(NOTE [plan validity] in dynbatch/loader.py); set such state before "
                    "iterating (for inference: with torch.no_grad(): for batch in loader)",
                    user_site())


def _batched_parts(fn) -> tuple:
    parts = getattr(fn, "__dynbatch_batched__", None)
    if parts is None and isinstance(fn, nn.Module):
        parts = getattr(fn.forward, "__dynbatch_batched__", None)
    if parts is None:
        raise TypeError(f"db.DataLoader plans calls of a @db.batched function or a bound "
                        f"@db.batched method (model.forward), got {fn!r}")
    return parts


class PlannedBatch(Sequence):
    """A minibatch from ``db.DataLoader``: a sequence of its examples, with its plan.
    ``indices``: the examples' dataset indices."""

    def __init__(self, planned: _Planned, loader: DataLoader):
        self.indices = planned.indices
        self.examples = planned.examples
        if self.examples is None:
            self.examples = [loader.examples[i] for i in planned.indices]
            if planned.ids != [id(x) for x in self.examples]:
                raise PlanError("the examples changed after the db.DataLoader was made: "
                                f"dataset indices {_short(planned.indices)} are other "
                                "objects here than in the worker that planned them; "
                                "shuffle with shuffle=True rather than in place, or make "
                                "the loader again")
        self._packed, self._loader = planned.packed, loader

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)

    def __repr__(self) -> str:
        kind = "planned" if self._packed is not None else "run in the main process"
        return f"<PlannedBatch of {len(self)} examples, {kind}>"

    def run(self, fn, leading, args, kwargs, strategy) -> list:
        """``fn(*leading, example, *args, **kwargs)`` for every example: the plan made
        ahead, executed, or the examples run here (see NOTE [plan validity])."""
        loader = self._loader
        call_args = tuple(leading) + tuple(args)
        if fn is not loader.fn or strategy != loader.strategy or kwargs or \
                len(call_args) != len(loader.call_args) or \
                any(a is not b for a, b in zip(call_args, loader.call_args)):
            raise PlanError(f"this minibatch was planned by a db.DataLoader for "
                            f"{_name(loader.fn)} with {_described(loader.call_args)}, but "
                            f"is run by {_name(fn)} with {_described(call_args)}"
                            f"{' and keyword arguments' if kwargs else ''}; call it as "
                            "planned, or make a DataLoader for this call")
        packed = self._packed
        if packed is None:
            return session.run_examples(fn, list(self.examples), tuple(leading), tuple(args),
                                        {}, strategy)
        t0 = time.perf_counter()
        structure, ids, modules = refs.binding(call_args)
        meta = packed.meta
        if structure != meta["structure"]:
            raise PlanError("the arguments' structure changed after this minibatch was "
                            f"planned ({_first_difference(meta['structure'], structure)}); "
                            "make the DataLoader again after changing the model (or "
                            "moving it to another device)")
        state = (state_now(), modules)
        if state != meta["state"]:
            loader.warn_replanned(_what_changed(meta["state"], state))
            return session.run_examples(fn, list(self.examples), tuple(leading), tuple(args),
                                        {}, strategy)
        table = loader.signatures(ids)
        the_plan = wire.unpack(packed, [table(k) for k in packed.signatures],
                               _device_of(structure))
        the_plan.sites = meta.get("sites") or []
        stats = profile.Stats(strategy=strategy, examples=len(self.examples),
                              nodes=packed.nodes, trace_s=meta["trace_s"],
                              schedule_s=meta["schedule_s"])
        stats.extra["unpack_s"] = time.perf_counter() - t0
        stats.extra["ahead"] = True
        t1 = time.perf_counter()
        try:
            results = ahead.run_plan(the_plan, stats)
        except ExecuteError:    # traced again here, so the message names example and line
            return session.run_examples(fn, list(self.examples), tuple(leading), tuple(args),
                                        {}, strategy)
        stats.execute_s = time.perf_counter() - t1
        profile.publish(stats)
        return results


def _name(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _described(args) -> str:
    return "arguments (" + ", ".join(type(a).__name__ for a in args) + ")" if args else \
        "no arguments"


def _first_difference(old: tuple, new: tuple) -> str:
    for a, b in zip(old, new):
        if a != b:
            return f"planned for {_entry(a)}, now {_entry(b)}"
    return f"{len(old)} named objects planned for, {len(new)} now"


def _entry(e: tuple) -> str:
    if len(e) == 6:
        return f"argument {e[0]} {e[1] + '.' if e[1] else ''}{e[2]}: {tuple(e[3])} " \
               f"{e[4]} on {e[5]}"
    return "argument " + " ".join(map(str, e))


def _what_changed(old, new) -> str:
    (old_torch, old_modules), (new_torch, new_modules) = old, new
    if old_torch != new_torch:
        return f"the torch state (grad mode, autocast, default dtype: {old_torch} -> " \
               f"{new_torch})"
    for a, b in zip(old_modules, new_modules):
        if a != b:
            changed = sorted(k for k in dict(a).keys() | dict(b).keys()
                             if dict(a).get(k) != dict(b).get(k))
            return f"a module's {', '.join(changed)}"
    return "the modules"


def _device_of(structure: tuple):
    """The device of the arguments' parameters and buffers when it is not the CPU: where
    the plan's index tensor goes, in one copy."""
    for e in structure:
        if len(e) == 6 and e[5].type != "cpu":
            return e[5]
    return None


__all__ = ["DataLoader", "PlannedBatch"]
