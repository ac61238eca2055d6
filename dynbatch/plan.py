"""The Plan: a schedule made executable, as plain data.

A plan is a list of ``Step``s, each one batched call: its signature, the nodes it computes
(in row order), how to gather each input (specs: slices and index tensors into earlier
batches' outputs, constant values; gather.py runs them), and which store entries nothing
reads any more once it has run. Building a plan also places every scheduled node in the
graph (``Graph.batch_of``, ``Graph.row_of``). Executing a plan (execute.py) needs no
tracer state, only the store.

NOTE [row order]: a batch's members may come in any order (row i of its outputs belongs to
its i-th member). Grouped by where their first input's rows lie, and within a source in
row order when the rows are a shuffle of a contiguous range, the first column needs no
reordering and often no copy (a slice); the batch's own outputs then follow that order,
so their readers often find their rows in order too.

NOTE [detached rows]: a value that no target needs through differentiable calls must
pass no gradient. Batched with values that do, it would: the backward of a batched call
hands its rows zero gradients, and a parameter that eager code leaves with ``grad is
None`` would get zeros (which AdamW then moves). So the rows of a gather that all come
from such values are detached.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .graph import Node
from .schedule import Batch

# -- gather specs: how one input of a batch is gathered (gather.py runs them) -------------

class Slice(NamedTuple):
    """Rows ``start:stop`` of output ``output`` of store entry ``entry``: a view, no copy."""
    entry: int
    output: int
    start: int
    stop: int
    detach: bool            # NOTE [detached rows]


class Index(NamedTuple):
    """Rows ``rows`` (an int64 tensor) of an output of a store entry: one index_select."""
    entry: int
    output: int
    rows: torch.Tensor
    detach: bool


class Values(NamedTuple):
    """Per-example constants made into one tensor when the plan was made; ``device``:
    where it goes when it runs, when it was made on the host (NOTE [host constants])."""
    tensor: torch.Tensor
    device: torch.device | None = None


# NOTE [host constants]: a DataLoader worker forked from a process that uses CUDA cannot
# use CUDA itself. A plan made there makes its constants (word ids, labels) on the host
# and records their device; the main process moves them there when the plan runs.
CONSTANTS_ON_HOST = [False]


class Stacked(NamedTuple):
    """Per-example constant tensors, stacked when the step runs."""
    tensors: tuple


class Joined(NamedTuple):
    """Parts joined by one cat, then put in row order by one index_select when ``order``
    is a tensor."""
    parts: tuple
    order: torch.Tensor | None


@dataclass(slots=True)
class Step:
    """One batched call. ``gathers``: (spec, inputs) pairs: the spec's value is the batched
    value of input k for the one k in ``inputs``, or for several alike inputs gathered as
    one, their values one after the other (split in equal parts). ``extra``: values the
    signature's batched call takes after its inputs (fused patterns). ``frees``: store
    entries to drop once the step has run. ``joint``: k > 1 when this step and the k - 1
    after it run as one call (NOTE [ragged groups] in rules/ragged.py), else 0."""
    sig: object
    nodes: tuple[int, ...]
    gathers: list = field(default_factory=list)
    extra: tuple = ()
    frees: tuple[int, ...] = ()
    joint: int = 0


@dataclass(slots=True)
class Plan:
    """``steps`` in order; ``first``: the store number of the first step's output;
    ``results``: where each example's results lie once it has run, for a plan made ahead
    (ahead.plan_ahead): (pytree spec, [("row", store number, output, row,
    requires_grad) or ("value", value) per leaf]); ``sites``: per step, the user's line
    that recorded its first node (a raw site here, an ``errors.Site`` in a plan from a
    worker), for ``db.stats()``'s rows."""
    steps: list[Step] = field(default_factory=list)
    first: int = 0
    results: list | None = None
    sites: list = field(default_factory=list)


def index_tensor(values: list[int]) -> torch.Tensor:
    """A CPU int64 tensor of Python ints, through one C loop (``array``) rather than
    torch.tensor's element by element conversion; other values as torch.tensor makes
    them (and fails as it does)."""
    try:
        flat = array("q", values)
    except (TypeError, OverflowError):
        return torch.tensor(values, dtype=torch.int64)
    if not flat:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(flat, dtype=torch.int64)


def build(graph, pending: list[Node], batches: list[Batch], first: int, targets: set,
          held: set, kept, store_members: list, final: bool = False,
          earlier: tuple = ()) -> Plan:
    """Place the scheduled nodes and plan their gathers. ``pending[i]`` is the node the
    schedule numbers i; ``first``: the store number of the first batch; ``targets``: ids of
    the nodes a result or a read needs now; ``held``: of the pending nodes a lazy tensor
    holds; ``kept(id)``: whether one holds an earlier node; ``store_members``: the node ids
    of every store entry (extended here), for freeing; ``final``: no node will be
    recorded after this plan; ``earlier``: the numbers of earlier plans' store entries
    that still hold values (kept for a lazy tensor then, perhaps dropped since)."""
    batches, joints = _split_families(pending, batches)
    live = _grad_live(pending, batches, held)
    last_read: dict[int, int] = {}      # store number -> the last step that reads it
    plan = Plan(first=first)
    graph.placed()
    batch_of, row_of = graph.batch_of, graph.row_of
    with _outside_inference():
        for s, batch in enumerate(batches):
            members = [pending[i] for i in batch.nodes]
            sig = batch.signature
            step = Step(sig, (), joint=joints[s] if joints else 0)
            if sig.fused is not None:      # NOTE [stacked sums] in rules/fused.py
                ids, outs, segments = sig.fused.members(members)
                columns = [Column.of(ids, outs, graph)]
                step.gathers.append((gather_spec(columns[0], sig.inputs[0], graph, live), (0,)))
                step.extra = (index_tensor(segments), len(members))
            else:
                members, first_column = _in_row_order(members, graph)
                columns = _columns(members, graph, first_column)
                _plan_gathers(step, sig, columns, graph, live)
            number = first + s
            ids = [n.id for n in members]
            for i, row in zip(ids, _rows(len(ids))):
                batch_of[i] = number
                row_of[i] = row
            step.nodes = tuple(ids)
            plan.sites.append(members[0].site)
            store_members.append(step.nodes)
            for column in columns:
                for entry in set(column.batches):
                    last_read[entry] = s
            plan.steps.append(step)
    last_read.pop(None, None)
    protected = set() if final else {batch_of[i] for i in _read_later(pending, batches)}
    _plan_frees(plan, last_read, batch_of, held, protected, kept, store_members, earlier)
    return plan


def _split_families(pending, batches):
    """NOTE [ragged groups] in rules/ragged.py: a batch the schedule made of a family (its
    signature is the family's token, not its nodes') becomes one batch per signature, in
    the order met, the first marked with how many run jointly. (batches, joints or None)."""
    if all(b.signature is pending[b.nodes[0]].sig for b in batches):
        return batches, None
    out, joints = [], []
    for b in batches:
        if b.signature is pending[b.nodes[0]].sig:
            out.append(b)
            joints.append(0)
            continue
        groups: dict = {}
        for i in b.nodes:
            groups.setdefault(pending[i].sig, []).append(i)
        k = len(groups) if len(groups) > 1 else 0
        for sig, nodes in groups.items():
            out.append(Batch(sig, tuple(nodes)))
            joints.append(k)
            k = 0
    return out, joints


def _read_later(pending, batches) -> set[int]:
    """Ids of the nodes that pending nodes left out of this plan read: their values must
    outlive it."""
    if sum(len(b.nodes) for b in batches) == len(pending):
        return set()
    scheduled = {i for b in batches for i in b.nodes}
    return {i for k, n in enumerate(pending) if k not in scheduled for i in n.inputs if i >= 0}


_ROWS = list(range(4096))


def _rows(n: int) -> list[int]:
    """Row numbers 0..n-1 (or more) as shared int objects: one per row number for the
    whole process, not one per node (a node keeps its row while the run lasts)."""
    if n > len(_ROWS):
        _ROWS.extend(range(len(_ROWS), 2 * n))
    return _ROWS


class _outside_inference:
    """Tensors a plan makes (indices, constants) may be read by grad-mode batches: made
    outside inference mode even when the plan is built inside it."""

    def __enter__(self):
        self.mode = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        if self.mode is not None:
            self.mode.__enter__()

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)


class Column:
    """Where one input of every member of a batch comes from: the node (or constant) ids,
    their store entries (None for a constant) and rows, and which output (``outs``; None
    when it is ``out`` for all)."""

    __slots__ = ("ids", "batches", "rows", "outs", "out")

    def __init__(self, ids, batches, rows, outs, out=0):
        self.ids, self.batches, self.rows, self.outs, self.out = ids, batches, rows, outs, out

    @staticmethod
    def of(ids: list, outs, graph) -> Column:
        batch_of, row_of = graph.batch_of, graph.row_of
        if min(ids) >= 0:
            batches = [batch_of[i] for i in ids]
            rows = [row_of[i] for i in ids]
        else:
            batches = [batch_of[i] if i >= 0 else None for i in ids]
            rows = [row_of[i] if i >= 0 else None for i in ids]
        out = 0
        if outs is not None and outs.count(outs[0]) == len(outs):
            out, outs = outs[0], None
        return Column(ids, batches, rows, outs, out)

    def several(self) -> bool:
        """Whether its rows lie in more than one store entry."""
        b0 = self.batches[0]
        return b0 is not None and self.batches.count(b0) != len(self.batches)


def _columns(members, graph, first: Column | None = None) -> list[Column]:
    """Per input k, a Column of where the members' k-th inputs come from (``first``: the
    first one, made already)."""
    indexed = any(n.outs for n in members)
    columns = []
    for k in range(len(members[0].inputs)):
        if k == 0 and first is not None:
            columns.append(first)
            continue
        ids = [n.inputs[k] for n in members]
        outs = [n.outs[k] if n.outs else 0 for n in members] if indexed else None
        columns.append(Column.of(ids, outs, graph))
    return columns


def _in_row_order(members, graph):
    """NOTE [row order]: members sorted by the store entry, output and row of their first
    input (constants first); and that input's Column, in the new order (None when the
    members have no input)."""
    if not members[0].inputs:
        return members, None
    outs = [n.outs[0] if n.outs else 0 for n in members] if any(n.outs for n in members) \
        else None
    first = Column.of([n.inputs[0] for n in members], outs, graph)
    batches, rows = first.batches, first.rows
    if batches[0] is None and batches.count(None) == len(batches):
        return members, first                   # constants: gathered as values, any order
    if first.outs is None and batches.count(batches[0]) == len(batches) and \
            _consecutive(rows):
        return members, first                   # already a slice
    out = first.out
    keys = [-1 if b is None else (((b << 12) + (o if first.outs else out)) << 28) + r
            for b, r, o in zip(batches, rows, first.outs or batches)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    if order == list(range(len(order))):
        return members, first
    return [members[p] for p in order], Column(
        [first.ids[p] for p in order], [batches[p] for p in order], [rows[p] for p in order],
        None if first.outs is None else [first.outs[p] for p in order], out)


def _consecutive(rows) -> bool:
    r0 = rows[0]
    return r0 is not None and rows[-1] - r0 == len(rows) - 1 and \
        rows == list(range(r0, r0 + len(rows)))


def _plan_gathers(step: Step, sig, columns, graph, live) -> None:
    """One gather per column; alike columns whose rows come from several store entries
    (a cell's left and right h) gathered as one and split: one set of copies for both.
    A column that reads the same nodes as one planned already, at another output (a cell's
    c beside its h), reuses that plan."""
    alike: dict = {}
    for k, column in enumerate(columns):
        key = (sig.inputs[k], column.out if column.outs is None else -1, column.several())
        alike.setdefault(key, []).append(k)
    planned: list = []       # (ids, spec) of the one-output gathers so far
    for (meta, _, several), ks in alike.items():
        for group in ([ks] if several and len(ks) > 1 else [[k] for k in ks]):
            column = columns[group[0]] if len(group) == 1 else \
                _joined([columns[k] for k in group])
            spec = None
            if column.outs is None:
                for ids, other in planned:
                    if ids == column.ids:       # the same nodes, another output
                        spec = _at_output(other, column.out)
                        break
            if spec is None:
                spec = gather_spec(column, meta, graph, live)
                if column.outs is None:
                    planned.append((column.ids, spec))
            step.gathers.append((spec, tuple(group)))


def _joined(columns) -> Column:
    outs = None
    if any(c.outs is not None for c in columns) or len({c.out for c in columns}) > 1:
        outs = [o for c in columns for o in (c.outs or [c.out] * len(c.ids))]
    return Column([i for c in columns for i in c.ids], [b for c in columns for b in c.batches],
                  [r for c in columns for r in c.rows], outs, columns[0].out)


def _at_output(spec, out):
    """A gather spec of node outputs, reading another output of the same nodes."""
    if type(spec) is Slice or type(spec) is Index:
        return spec._replace(output=out)
    if type(spec) is Joined:
        return Joined(tuple(_at_output(p, out) for p in spec.parts), spec.order)
    return spec


def gather_spec(column: Column, meta, graph, live) -> tuple:
    """How to gather one column: a slice or an index_select of one store entry, a tensor
    of constants, or parts of those joined by one cat (and reordered by one index_select
    where the parts interleave)."""
    batches, outs = column.batches, column.outs
    b0 = batches[0]
    if outs is None and b0 is not None and batches.count(b0) == len(batches):
        return _part(b0, column.out, column.ids, column.rows, meta, graph, live)
    groups: dict = {}
    keys = batches if outs is None else list(zip(batches, outs))
    for pos, key in enumerate(keys):
        group = groups.get(key)
        if group is None:
            groups[key] = [pos]
        else:
            group.append(pos)
    ids, rows = column.ids, column.rows
    parts = []
    order = []
    for key, positions in groups.items():
        batch, out = (key, column.out) if outs is None else key
        order.extend(positions)
        parts.append(_part(batch, out, [ids[p] for p in positions],
                           [rows[p] for p in positions], meta, graph, live))
    if len(parts) == 1:
        return parts[0]
    if order == list(range(len(order))):
        return Joined(tuple(parts), None)
    inverse = [0] * len(order)
    for k, pos in enumerate(order):
        inverse[pos] = k
    return Joined(tuple(parts), index_tensor(inverse))


def _part(batch, out, ids, rows, meta, graph, live) -> tuple:
    if batch is None:
        return _constants_spec([graph.constants[~i] for i in ids], meta)
    detach = live is not None and not any(live.get(i, False) for i in ids)
    if _consecutive(rows):
        return Slice(batch, out, rows[0], rows[-1] + 1, detach)
    return Index(batch, out, index_tensor(rows), detach)


def _constants_spec(constants, meta) -> tuple:
    values = [c.value for c in constants]
    if isinstance(values[0], torch.Tensor):
        return Stacked(tuple(values))
    if meta.dtype is torch.int64 and meta.device.type == "cpu":
        return Values(index_tensor(values))
    if CONSTANTS_ON_HOST[0] and meta.device.type != "cpu":
        return Values(torch.tensor(values, dtype=meta.dtype), meta.device)
    return Values(torch.tensor(values, dtype=meta.dtype, device=meta.device))


def _grad_live(pending, batches, held) -> dict | None:
    """NOTE [detached rows]: {id: whether a held node (a result, a value a read or the user
    holds and may use later) needs its value through differentiable calls}, for the
    scheduled nodes and what they read. None when no scheduled call both reads a value
    that requires grad and makes none: then every scheduled node, being needed by a held
    one, is needed through differentiable calls."""
    if not any(b.signature.cuts_grad for b in batches):
        return None
    live: dict[int, bool] = {}
    scheduled = sorted((pending[i] for b in batches for i in b.nodes), key=lambda n: n.id)
    for node in reversed(scheduled):
        mine = live.get(node.id, False) or node.id in held
        live[node.id] = mine
        if mine and node.sig.differentiable:
            for i in node.inputs:
                live[i] = True
    return live


def _plan_frees(plan: Plan, last_read: dict, batch_of, held: set, protected: set, kept,
                store_members: list, earlier) -> None:
    """After each step, the store entries that no later step of this plan reads, that no
    pending node left out of the plan reads (``protected``), and in which no node is held
    by a lazy tensor (or wanted by a read). An earlier plan's entry that nothing holds any
    more goes after the first step (a value a read kept, since dropped)."""
    keep = {batch_of[i] for i in held} | protected
    last = {number: s for number, s in last_read.items()
            if number >= plan.first or not any(kept(i) for i in store_members[number])}
    for number in earlier:
        if number not in last_read and not any(kept(i) for i in store_members[number]):
            last[number] = 0
    for s in range(len(plan.steps)):
        last.setdefault(plan.first + s, s)
    frees: dict[int, list] = {}
    for number, s in last.items():
        if number not in keep:
            frees.setdefault(s, []).append(number)
    for s, numbers in frees.items():
        plan.steps[s].frees = tuple(numbers)
