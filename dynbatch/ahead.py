"""Plans made ahead: a minibatch traced and scheduled without executing anything
(``plan_ahead``), and executed later (``run_plan``), here or in another process once
sent as arrays (wire.py, by db.DataLoader) or pickled (refs.py, ``load_plan``).
"""
from __future__ import annotations

import time

import torch
from torch.utils._pytree import tree_unflatten

from . import execute, plan, profile, refs
from .errors import PlanAheadError, Site
from .results import holds_lazy
from .session import Run


def plan_ahead(fn, examples, args=(), kwargs=None, strategy: str = "agenda",
               leading: tuple = (), stats: profile.Stats | None = None) -> plan.Plan:
    """The plan of ``fn`` over ``examples`` (code for one example, as ``@db.batched``
    runs it: ``fn(*leading, example, *args, **kwargs)``), made without executing
    anything: a Plan that ``run_plan`` executes, here or in another process (refs.py,
    wire.py). ``stats`` gets the trace and schedule times and the node count.

    Code that reads values (NOTE [reads]) or stores lazy values into its arguments
    (``log.append(h)``) cannot be planned ahead: UnsupportedError."""
    run = Run(strategy, examples=len(examples))
    run.planning = True
    t0 = time.perf_counter()
    kwargs = kwargs or {}
    with run:
        outs = run.trace_examples(fn, tuple(leading), list(examples), tuple(args), kwargs)
        if holds_lazy(list(args) + list(kwargs.values())):
            raise PlanAheadError("per-example code stored lazy values into the "
                                   "arguments (log.append(h)); planned ahead, the values "
                                   "would never come back to them: return them instead, "
                                   "or plan in the main process (num_workers=0)")
        run.stats.trace_s = time.perf_counter() - t0 - run.stats.schedule_s
        the_plan = run.final_plan(outs)
        # sites as file, line and function: a code object does not travel to another process
        sites = {s: Site.of(s) for s in set(the_plan.sites)}
        the_plan.sites = [sites[s] for s in the_plan.sites]
        nodes = len(run.graph.nodes)
    run.stats.nodes = nodes
    if stats is not None:
        stats.trace_s, stats.schedule_s = run.stats.trace_s, run.stats.schedule_s
        stats.nodes, stats.examples = nodes, len(examples)
    return the_plan


def run_plan(the_plan: plan.Plan, stats: profile.Stats | None = None) -> list:
    """Execute a plan made by ``plan_ahead``: the results, one per example, as
    ``@db.batched`` returns them."""
    store: list = []
    stats = stats or profile.Stats()
    execute.execute(the_plan, store, stats, _where_unknown)
    cache: dict = {}
    results = []
    with torch._C.DisableTorchFunction():
        for spec, places in the_plan.results:
            values = []
            for place in places:
                if place[0] == "value":
                    values.append(place[1])
                    continue
                _, batch, index, row, grad = place
                src = store[batch][index]
                rows = cache.get(id(src))
                if rows is None:
                    rows = cache[id(src)] = (src, src.unbind(0))
                values.append(rows[1][row] if grad else rows[1][row].detach())
            results.append(tree_unflatten(values, spec))
    return results


def load_plan(data: bytes, args) -> plan.Plan:
    """A plan pickled by ``refs.dumps(plan, args)``, its shared objects found in ``args``
    and its signatures made again (a block's body is traced as a run would)."""
    return refs.loads(data, args, lambda: Run("agenda"))


def _where_unknown(node_id: int, order: bool = False):
    return node_id if order else f"node %{node_id} of a plan made elsewhere"
