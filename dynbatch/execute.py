"""Execution of a plan: for each step, gather its inputs from the store, make one batched
call, append its outputs to the store, drop what nothing reads any more. Autograd flows
through these ordinary torch calls: there is no custom backward.

A batched call that fails is run again one example at a time: the first example that
fails on its own is named (``ExecuteError``, at the user's line); if none does, vmap could
not batch the call (it runs one example at a time from then on, counted and warned at the
user's line) or a rule is at fault (said loudly; an error in strict mode).
"""
from __future__ import annotations

import os
import time
import warnings

import torch

from .errors import DynbatchError, ExecuteError, FallbackError, warn_at
from .gather import gather_inputs
from .rules import fallback
from .state import entered, state_now

DEBUG = os.environ.get("DYNBATCH_DEBUG", "") not in ("", "0")
_warned: set = set()


def execute(plan, store: list, stats, where_of) -> None:
    """Run ``plan``; ``store`` gets one entry (the tuple of outputs) per step.
    ``where_of(node id)`` names a node's example and line for messages."""
    now = state_now()
    clock = time.perf_counter
    with torch._C.DisableTorchFunction():
        sites = plan.sites if len(plan.sites) == len(plan.steps) else None
        t0 = clock()
        steps = plan.steps
        k = 0
        while k < len(steps):
            step = steps[k]
            sig = step.sig
            if step.joint:
                group = steps[k:k + step.joint]
                looped = _joint(group, store, where_of)
                stats.fallbacks += looped
                stats.batches += 1
                t1 = clock()
                stats.count(sig, sum(len(s.nodes) for s in group), t1 - t0, looped > 0,
                            sites[k] if sites is not None else None, ragged=True)
                t0 = t1
                if DEBUG:
                    print(f"dynbatch: batch {stats.batches:4d} {sig!r} and {len(group) - 1} "
                          f"more lengths x{sum(len(s.nodes) for s in group)} (ragged)")
                k += len(group)
                continue
            k += 1
            if sig.how == "loop" and fallback.STRICT:
                raise FallbackError(f"dynbatch would run {sig.name} one example at a time "
                                    f"(first at {where_of(step.nodes[0])}); strict mode "
                                    "forbids it")
            values = gather_inputs(step, store)
            recovered = False
            try:
                if sig.how == "vmap":
                    out = _vmapped(sig, values)
                elif sig.state == now:
                    out = sig.batched(values)
                else:
                    with entered(sig.state):
                        out = sig.batched(values)
                _check(sig, out, len(step.nodes))
            except FallbackError:
                raise
            except Exception as err:
                with entered(sig.state):
                    out = _recover(step, values, err, where_of)
                recovered = True
                _check(sig, out, len(step.nodes))
            per_example = recovered or sig.how == "loop"
            if per_example:
                stats.fallbacks += len(step.nodes)
            store.append(out)
            for number in step.frees:
                store[number] = None
            stats.batches += 1
            stats.vmap_batches += sig.how == "vmap"
            t1 = clock()
            stats.count(sig, len(step.nodes), t1 - t0, per_example,
                        sites[k - 1] if sites is not None else None)
            t0 = t1
            if DEBUG:
                print(f"dynbatch: batch {stats.batches:4d} {sig!r} x{len(step.nodes)} "
                      f"({sig.how})")


def _joint(group: list, store: list, where_of) -> int:
    """Steps of one family run as one call (NOTE [ragged groups] in rules/ragged.py): each
    step's inputs gathered, one ``Ragged.run``, each step's outputs stored. A joint call
    that fails or gives other shapes than each step's own call would runs step by step
    (said once, as a fault of the rule). Returns how many nodes ran one example at a
    time."""
    looped = 0
    parts = [gather_inputs(step, store) for step in group]
    sigs = [step.sig for step in group]
    try:
        with entered(sigs[0].state):
            outs = sigs[0].ragged.run(sigs, parts)
        for sig, out, step in zip(sigs, outs, group):
            _check(sig, out, len(step.nodes))
    except FallbackError:
        raise
    except Exception as err:
        if fallback.STRICT:
            raise FallbackError(f"the joint call of {sigs[0].name} over sequences of "
                                f"several lengths failed ({type(err).__name__}: {err}), "
                                f"first at {where_of(group[0].nodes[0])}") from err
        if (sigs[0].name, "ragged") not in _warned:
            _warned.add((sigs[0].name, "ragged"))
            warn_at(f"dynbatch: the joint call of {sigs[0].name} over sequences of "
                    f"several lengths failed ({type(err).__name__}: {err}); each length "
                    "ran as a batch of its own. Please report it", sigs[0].site)
        outs = []
        for sig, values, step in zip(sigs, parts, group):
            try:
                with entered(sig.state):
                    out = sig.batched(values)
                _check(sig, out, len(step.nodes))
            except Exception as own:
                with entered(sig.state):
                    out = _recover(step, values, own, where_of)
                looped += len(step.nodes)
            outs.append(out)
    store.extend(outs)
    for step in group:
        for number in step.frees:
            store[number] = None
    return looped


def _vmapped(sig, values):
    """A vmap batch, its warnings (vmap's "performance drop" for ops it loops over)
    attributed to the user's line that recorded the call."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with entered(sig.state):
            out = sig.batched(values)
    for w in caught:
        key = (sig.name, str(w.message))
        if key not in _warned:
            _warned.add(key)
            warn_at(f"{w.message}", sig.site, w.category)
    return out


class Mismatch(DynbatchError):
    """A batched call gave other shapes or dtypes than one example's call does."""


def _check(sig, out, n: int) -> None:
    """Every batched call gives what inference said, for each example: a batched call
    that does not (vmap under autocast, a wrong rule) is run again one example at a time
    (``_recover``), never passed on as a silently different value."""
    if len(out) != len(sig.outputs):
        raise Mismatch(f"{sig.name} gave {len(out)} outputs, expected {len(sig.outputs)}")
    for t, meta in zip(out, sig.outputs):
        if t.dtype != meta.dtype or t.shape[0] != n or t.shape[1:] != meta.shape:
            raise Mismatch(f"the batched {sig.name} ({sig.how}) gave {t.dtype} "
                           f"{tuple(t.shape)} for {n} examples of {meta.dtype} "
                           f"{tuple(meta.shape)}")


def _recover(step, values, err, where_of):
    """The batched call failed: run it one example at a time, naming the first example that
    fails on its own (by example index, not by row: the row order is the planner's)."""
    sig = step.sig
    n = len(step.nodes)
    rows = [None] * n
    for row in sorted(range(n), key=lambda r: where_of(step.nodes[r], order=True)):
        try:
            rows[row] = sig.flat(_one(step, values, row))
        except Exception as own:
            raise ExecuteError(f"{sig.name} failed for {where_of(step.nodes[row])}\n"
                               f"  (batch of {n} nodes, signature {sig!r})\n"
                               f"  {type(own).__name__}: {own}") from own
    if fallback.STRICT:
        raise FallbackError(f"dynbatch would run {sig.name} one example at a time "
                            f"({type(err).__name__}: {err}), first at "
                            f"{where_of(step.nodes[0])}; strict mode forbids it") from err
    if sig.how == "vmap":       # vmap has no batching rule for it: run it per example
        sig.how = "loop"
        target, fill = sig.target, sig.fill
        sig.batched = lambda vals: sig.flat(fallback.loop_call(target, fill, vals,
                                                               vals[0].shape[0]))
        message = (f"dynbatch ran {sig.name} one example at a time; no batching rule "
                   f"applies ({type(err).__name__}: {err})")
    else:
        message = (f"dynbatch: the batched call of {sig.name} ({sig.how}) failed "
                   f"({type(err).__name__}: {err}); its nodes ran one example at a time. "
                   "Please report it")
    if (sig.name, sig.how) not in _warned:
        _warned.add((sig.name, sig.how))
        warn_at(message, sig.site)
    return tuple(torch.stack([r[j] for r in rows]) for j in range(len(rows[0])))


def _one(step, values, row):
    sig = step.sig
    if sig.fused is not None:
        return sig.fused.per_example(values, row)
    return sig.per_example([v[row] for v in values])
