"""Execution: for each batch, gather the inputs, make one batched call, store the output.

Gather (NOTE [row order]: row i of a batch output belongs to the i-th node of that batch,
and a batch puts its nodes in the order its first input's rows lie in): a zero-copy slice
when the rows lie contiguous and in order in one earlier output, one ``index_select`` when
they lie in one output in any order, and per-source selections joined by one ``cat`` (plus
one reordering ``index_select`` if needed) otherwise; alike columns of one batch whose rows
lie in several outputs are gathered as one (NOTE [joint gathers]).
Outputs stay one tensor per batch; a node's value is (batch outputs, row), let go of as
soon as nothing can read it (NOTE [freeing]). Autograd flows through these ordinary torch
ops: there is no custom backward.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from array import array as _array

import torch

from . import rules, specialize
from .errors import ExecuteError, where
from .graph import Immediate, input_id, input_ids, input_index
from .lazy import LazyTensor
from .schedule import schedule
from .signature import CONST, autograd_mode
from .infer import BULK_STACK
from .fusion import SEGMENT_SUM

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction
DEBUG = os.environ.get("DYNBATCH_DEBUG", "") not in ("", "0")
_warned: set = set()
_torch_tensor = torch.tensor   # the original: torch.tensor is wrapped while a run records


def execute_pending(run, targets=None) -> None:
    """Schedule and run the pending nodes ``targets`` need (all pending nodes when None).

    NOTE [dead code]: only what a result or a read needs runs. A value computed and never
    used must not share a batched call with live values: its parameters would then get
    zero gradients where eager PyTorch leaves them None. Pending work not needed yet stays
    pending, to batch with what comes later."""
    graph = run.graph
    nodes = graph.nodes
    start = graph.first_pending
    t0 = time.perf_counter()
    wanted = None
    if not graph.ragged:
        # every node from first_pending on is pending: schedule them in place, numbered
        # from `start`, and let the scheduler drop what no target needs
        offset = start
        # The whole graph (the commonest case) is not copied, and its node ids are the
        # numbers the scheduler counts with. Numbers, and the agenda's inputs, are read
        # once, in order: generators, not n-long lists, at the Python peak of the step.
        pending = nodes if start == 0 else nodes[start:]
        numbers = (n.id for n in nodes) if start == 0 else None
        inputs = (n.inputs for n in pending) if run.strategy == "agenda" else \
            [n.inputs for n in pending]
        if targets is not None:
            wanted = [t.id - start for t in targets if t.batch is None and t.id >= start]
    else:
        # after a partial execution (a read), pending and executed nodes interleave:
        # number the pending ones afresh; the scheduler still drops what no target needs
        pending = [n for n in nodes[start:] if n.batch is None]
        offset = 0
        numbers = None
        local = {n.id: k for k, n in enumerate(pending)}
        inputs = [[local[j] for j in input_ids(n) if j in local] for n in pending]
        if targets is not None:
            wanted = [local[t.id] for t in targets if t.id in local]
    if not pending or wanted == []:
        return
    # the agenda reads no depths (its heights come from the graph): not built for it
    depths = None if run.strategy == "agenda" else [n.depth for n in pending]
    deaths: list = []       # NOTE [freeing]: each batch's dying nodes, from the scheduler
    batches = schedule(run.strategy, [n.info for n in pending], inputs, depths, offset,
                       wanted, deaths, numbers)
    del inputs, numbers
    t1 = time.perf_counter()
    stats = run.stats
    stats.schedule_s += t1 - t0
    mode = autograd_mode()
    run.signatures_run.update(b.signature for b in batches)
    executed = 0
    # Each batch is dropped once it has run: its tuple of node numbers, 1 MB for a
    # 150,000-node run (and as much in int objects where the numbers are not the ids),
    # is freed as the tensors pile up.
    unheld = _UNHELD - (pending is nodes)       # (see _unheld_count)
    batches.reverse()
    deaths.reverse()
    with _DisableTorchFunction():
        while batches:
            batch = batches.pop()
            dying = deaths.pop()
            executed += len(batch.nodes)
            members = [pending[i] for i in batch.nodes]
            info = batch.signature
            if info.kind is CONST:
                if mode == 2 and not run.inference:   # a read under inference_mode in a
                    with torch.inference_mode(False):  # scope: keep data usable by grad
                        run_batch(members, info)
                else:
                    run_batch(members, info)
            elif info.grad != mode:
                with _in_mode(info.grad):
                    run_batch(members, info)
            else:
                run_batch(members, info)
            if DEBUG:
                print(f"dynbatch: batch {stats.batches:4d} {info!r} x{len(members)}")
            stats.batches += 1
            _release(dying, pending, unheld)
    if not graph.ragged and executed == len(pending):
        graph.first_pending = len(nodes)
    else:
        while start < len(nodes) and nodes[start].batch is not None:
            start += 1
        graph.first_pending = start
        graph.ragged = any(n.batch is not None for n in nodes[start:])
    stats.execute_s += time.perf_counter() - t1


_getrefcount = sys.getrefcount


def _unheld_count() -> int:
    """What getrefcount says, in _release, of a node that no user holds: graph.nodes and
    execute_pending's list of pending nodes hold it, besides the local and getrefcount's
    argument (4 on CPython 3.11; one fewer where the pending list is graph.nodes itself).
    Measured, not assumed: interpreters that borrow references for locals count fewer."""
    probe = object()
    graph_nodes, pending = [probe], [probe]
    del probe
    node = pending[0]
    return _getrefcount(node)


_UNHELD = _unheld_count()


def _release(dying, pending, unheld) -> None:
    """NOTE [freeing]: a node lets go of its batch's outputs (``batch`` becomes FREED)
    once the last pending node that reads it has run and nothing else can read it: no
    lazy tensor of it lives (the user's, a result, a target of this execution), so no node
    recorded later can read it either; the outputs are freed when every node of their
    batch has let go. Per-op code makes dozens of values per tree node that autograd does
    not keep (an add's output, once the next op has read it): they all stayed alive until
    the run ended, and made the peak of a training step. Per-op SST Tree-LSTM, B=256: of
    the 92 MB of batch outputs a run makes it holds 2 MB when it closes, where it held all
    of them; the Python memory peak over the forward is 58 MB, the graph itself (``python
    benchmarks/time_split.py --profile --impl dynbatch-agenda --batch 256 --minibatches
    1``); the step's peak resident Δ went from 131 MB to 99 MB (hand-batched: 54 MB;
    ``python scripts/bench.py``, BENCHMARKS.md).

    When: the scheduler hands over, for each batch, the nodes whose last reader is in it
    (``schedule(..., deaths=[])``; the agenda takes each node's last reader from the
    users it finds anyway, one step per node). Counting down every input entry of every
    member after each batch instead cost 0.5 us an edge. Old and new code alternating
    (``python benchmarks/ab.py dynbatch.execute:execute_pending,_release
    dynbatch.schedule:schedule,agenda_schedule --rev 71add9c``; SST, B=64, median of 40
    minibatches for blocks, 16 per-op): the execute phase went x0.90 blocks and x0.89
    per-op, the schedule x1.13 and x1.18, the forward x0.97 and x1.02. A gain for
    blocks; per-op, what the executor saves the scheduler spends."""
    for j in dying:
        node = pending[j]
        if _getrefcount(node) <= unheld:
            node.batch = FREED


class _Freed:
    """The outputs of a node that let go of them (NOTE [freeing]): nothing can read them,
    so a read is a bug in dynbatch, reported as one rather than answered wrongly."""
    __slots__ = ()

    def __getitem__(self, index):
        raise RuntimeError("dynbatch internal error: a value dropped as unreachable was "
                           "read (NOTE [freeing] in execute.py)")

    def __repr__(self) -> str:
        return "<freed>"


FREED = _Freed()


def _in_mode(mode: int):
    if mode == 2:
        return torch.inference_mode(True)
    if torch.is_inference_mode_enabled():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.set_grad_enabled(bool(mode)))
        return stack
    return torch.set_grad_enabled(bool(mode))


def lazy_tensors(structure, found=None) -> list:
    """Every lazy tensor in a (nested) result: lists, tuples (named too), dicts."""
    if found is None:
        found = []
    if type(structure) is LazyTensor:
        found.append(structure)
    elif isinstance(structure, (list, tuple)):
        for x in structure:
            lazy_tensors(x, found)
    elif type(structure) is dict:
        for x in structure.values():
            lazy_tensors(x, found)
    return found


def run_batch(nodes, info) -> None:
    if info.kind is CONST:
        values = [n.args[0] for n in nodes]
        if info.fn is _torch_tensor:     # Python scalars: one tensor for the whole batch
            dtype, device = info.outputs[0][1], info.outputs[0][2]
            out = (torch.tensor(values, dtype=dtype, device=device),)
        else:
            out = (torch.stack(values) if len(values) > 1 else values[0].unsqueeze(0),)
    else:
        first = nodes[0]
        direct = info.direct
        if direct is not None and type(direct[0]) is str:
            compute = _segment_sum if direct[0] is SEGMENT_SUM else _bulk
            _store(nodes, (compute(nodes, direct),))
            return
        template = first.args
        if template is None:                 # a plain node (NOTE [plain nodes])
            template = first.owner.templates[info]
        args = list(template)
        kwargs = first.kwargs or {}
        if direct is not None and direct[1]:
            kwargs = specialize.apply_edits(args, kwargs, direct[1])
        if kwargs and any(p[0] == "kw" for p in info.paths):
            kwargs = dict(kwargs)
        graph_nodes = first.owner.graph.nodes
        columns = []
        for k, path in enumerate(info.paths):
            if len(path) == 1:
                columns.append(_column(nodes, k, path, graph_nodes) if not info.indexed
                               else _indexed_column(nodes, k, path, graph_nodes))
            elif path[0] == "kw":
                columns.append([n.kwargs[path[1]] for n in nodes])
            else:
                columns.append([n.args[path[0]][path[1]] for n in nodes])
        values, order = gather_columns(columns)
        if order is not None:           # NOTE [row order]: rows follow the first column
            nodes = [nodes[p] for p in order]
        for path, value in zip(info.paths, values):
            if len(path) == 1:
                args[path[0]] = value
            elif path[0] == "kw":
                kwargs[path[1]] = value
            else:
                i, j = path
                if args[i] is template[i]:
                    args[i] = list(args[i])
                args[i][j] = value
        for i, a in enumerate(args):
            if type(a) is list and type(template[i]) is tuple:
                args[i] = tuple(a)
        try:
            if direct is not None:
                out = direct[0](*args, **kwargs)
            else:
                out = info.rule(first.fn, tuple(args), kwargs, info.per_example)
        except rules.FallbackError:
            raise
        except Exception as err:
            out = _recover(nodes, info, err)
        out = (out,) if info.structure is None else tuple(out)
    _store(nodes, out)


def gather_columns(columns) -> tuple[list, list | None]:
    """The batched value of each input column of a batch, and the order of the batch's
    members those values follow: None for the order given, else a list of positions
    (NOTE [row order]; NOTE [joint gathers]).

    NOTE [joint gathers]: a Tree-LSTM cell reads (hl, cl) and (hr, cr), four columns whose
    rows lie in many earlier batches. Gathered one by one, each costs an index_select per
    source batch, a cat and a reordering index_select, and as many backward nodes. Columns
    of the same shape that read the same output (hl and hr: the h of their producers) are
    gathered as one column and split: one set of calls for both. Only when the first of
    them comes from several batches: where each column is a zero-copy slice or a single
    index_select on its own, joining them would add a copy. The memo then reuses the row
    plan of (hl, hr) for (cl, cr): the same nodes, another output."""
    memo = [None, None]
    alike: dict = {}
    for k, column in enumerate(columns):
        head = column[0]
        t = type(head)
        key = (head.tkey, head.index) if t is LazyTensor else \
            (head[0].info.outputs[head[1]], head[1]) if t is tuple else \
            (head.info.outputs[0], 0)            # a plain node's input: its first output
        alike.setdefault(key, []).append(k)
    values = [None] * len(columns)
    order = None
    rest = list(alike.values())
    if len(rest[0]) == 1 or not _from_several_batches(columns[0]):
        # the first column is gathered on its own: the batch may take its rows' order
        values[0], order = _gather(columns[0], memo, True)
        if order is not None:           # (the first column is done: the others follow it)
            columns = [None] + [[column[p] for p in order] for column in columns[1:]]
        rest[0] = rest[0][1:]
    for ks in rest:
        if not ks:
            continue
        if len(ks) > 1 and _from_several_batches(columns[ks[0]]):
            joined = gather([x for k in ks for x in columns[k]], memo)
            for k, part in zip(ks, joined.split(len(columns[ks[0]]))):
                values[k] = part
        else:
            for k in ks:
                values[k] = gather(columns[k], memo)
    return values, order


def _groups_by_batch(nodes) -> dict:
    """First outputs grouped by the batch that computed them, as they come: {id: (batch,
    None, positions, rows)}; no tuple per node (unlike ``_groups_by_source``)."""
    groups: dict = {}
    for pos, node in enumerate(nodes):
        batch = node.batch
        if batch is None:           # an immediate: fill every one of them at once
            fill_immediates(nodes)
            batch = node.batch
        group = groups.get(id(batch))
        if group is None:
            groups[id(batch)] = group = (batch, None, [], [])
        group[2].append(pos)
        group[3].append(node.row)
    return groups


def _plan_in_order(groups):
    """(plan, order) for rows grouped by source, {key: (batch, index, positions, rows)}
    (positions None: the single group, in the order given): the sources one after the
    other, and within each a shuffle of a contiguous range of rows sorted into a slice;
    ``order`` the batch members' positions in that order, or None for the order given.

    NOTE [row order]: the members of a batch may come in any order (row i of its outputs
    belongs to its i-th member, whichever that is), and the agenda releases them in the
    order their inputs finished, which often interleaves their sources: sigmoid(i),
    sigmoid(f), sigmoid(o) of one chunk() come three rows apart. Gathered in that order
    the column needs a cat and a reordering index_select (and its backward an index_add
    into zeros). Ordered by source instead, it needs the cat alone; and rows of one
    source that are a shuffle of a contiguous range become a zero-copy slice. The batch's
    outputs then follow that order, so readers of them often find their rows in order
    too. Grouping the column by source is what gathering it costs anyway: the new order
    costs one permutation of each column."""
    parts = []
    order = []
    moved = False
    for batch, index, positions, rows in groups.values():
        n = len(rows)
        if not _consecutive(rows):
            low = min(rows)
            if max(rows) - low == n - 1:        # perhaps a shuffle of low..low+n-1
                slots = [-1] * n
                for p, r in enumerate(rows) if positions is None else zip(positions, rows):
                    slots[r - low] = p
                if -1 not in slots:             # (else a row repeats)
                    positions = slots
                    moved = True
                    parts.append((_SLICE, batch, index, low, n))
                    order.extend(positions)
                    continue
        parts.append(_plan_rows(batch, index, rows))
        if positions is not None:
            order.extend(positions)
    if len(parts) == 1:
        return parts[0], (positions if moved else None)
    if not moved and order == list(range(len(order))):
        order = None
    return (_MANY, parts, None), order


def _from_several_batches(column) -> bool:
    batch = _source(column[0]).batch
    if batch is None:           # immediates, not filled yet: gathered as values
        return False
    for x in column:
        if _source(x).batch is not batch:
            return True
    return False


def _source(x):
    """The node a column entry reads: a lazy tensor's, a (node, output) pair's (NOTE
    [indexed plain nodes]), or the entry itself (a plain node's input)."""
    t = type(x)
    return x.node if t is LazyTensor else x[0] if t is tuple else x


def _column(nodes, k, path, graph_nodes) -> list:
    """The k-th lazy input (at ``path``, a positional argument) of every node: a lazy
    tensor from the node's args, or for a plain node the first output of node
    ``inputs[k]``, which ``gather`` reads the same way (NOTE [plain nodes])."""
    i = path[0]
    return [graph_nodes[input_id(n, k)] if n.args is None else n.args[i] for n in nodes]


def _indexed_column(nodes, k, path, graph_nodes) -> list:
    """``_column`` where plain nodes may read a later output of an input (NOTE [indexed
    plain nodes] in graph.py): such an entry is a (node, output) pair, which the gathers
    take as they take a lazy tensor of that output."""
    i = path[0]
    column = []
    for n in nodes:
        if n.args is not None:
            column.append(n.args[i])
            continue
        source = graph_nodes[input_id(n, k)]
        index = input_index(n, k)
        column.append((source, index) if index else source)
    return column


def _store(nodes, out) -> None:
    # An executed node's arguments are not needed again (its value is (batch, row)):
    # dropping them frees the argument tuples, and the lazy tensors only they held, while
    # the rest of the run executes, where tensors pile up for the backward pass.
    for node, row in zip(nodes, _row_numbers(len(nodes))):
        node.batch = out
        node.row = row
        if node.args is not None:   # a plain Node has no slot for them (NOTE [lean nodes])
            node.args = None


_ROW_NUMBERS = list(range(1024))


def _row_numbers(count: int) -> list:
    """Row numbers 0..count-1 (or more), one int object each for the whole process.
    ``enumerate`` makes an int object per row above 256, which every node keeps as its
    ``row``: 110,000 of them, 3 MB, for a per-op SST minibatch of 256 trees, made at the
    end of the forward pass where its memory peaks."""
    if count > len(_ROW_NUMBERS):
        _ROW_NUMBERS.extend(range(len(_ROW_NUMBERS), count))
    return _ROW_NUMBERS


def _bulk(nodes, direct) -> Tensor:
    """stack/cat of k per-example members: one gather of k x B rows (member-major),
    then views. See infer._bulk_list."""
    kind, dim = direct
    k = len(nodes[0].args[0])
    column = [n.args[0][j] for j in range(k) for n in nodes]
    rows = gather(column)
    b = len(nodes)
    x = rows.view(k, b, *rows.shape[1:]).transpose(0, 1)      # [B, k, *member]
    if kind == BULK_STACK:
        return x.movedim(1, 1 + dim) if dim else x
    x = x.movedim(1, 1 + dim)                                  # [B, ..., k, m_dim, ...]
    shape = list(x.shape)
    return x.reshape(*shape[:1 + dim], shape[1 + dim] * shape[2 + dim], *shape[3 + dim:])


def _segment_sum(nodes, direct) -> Tensor:
    """A batch of ``stacked_sum`` nodes (NOTE [stacked sums] in fusion.py): every member
    of every node in one gather, then one ``index_add`` into the node's row."""
    rows = gather([x for n in nodes for x in n.args[0]])
    segment = _long_tensor([k for k, n in enumerate(nodes) for _ in n.args[0]],
                           device=rows.device)
    out = rows.new_zeros((len(nodes),) + rows.shape[1:]).index_add(0, segment, rows)
    if direct[1] and out.dim() > 1:        # sum over all dims: each node's row to a scalar
        out = out.sum(tuple(range(1, out.dim())))
    return out


def value_of(lt) -> Tensor:
    node = lt.node
    if node.batch is None:      # an immediate that a batch gathered as values only
        fill_immediates([node])
    return node.batch[lt.index][node.row]


_SLICE, _INDEX, _MANY = 0, 1, 2


def gather(column, memo=None) -> Tensor:
    """Stack the values of executed lazy tensors along a new dim 0. ``memo`` carries the
    last plan within one batch: the columns of a block's (h, c) inputs come from the same
    nodes, so their rows are located once."""
    return _gather(column, memo, False)[0]


def _gather(column, memo, in_order):
    """``gather``, and with ``in_order`` also the order of the batch's members that makes
    the column cheapest (NOTE [row order]): (value, positions), or (value, None) for the
    order given."""
    index = 0
    first = column[0]
    if type(first) is LazyTensor:
        index = first.index
        if type(first.node) is Immediate:
            values = _immediate_values(column)
            if values is not None:        # word ids, labels: one tensor, no bookkeeping
                return _scalar_tensor(values, first.node), None
    # a plain node's input is a Node: its first output; a (node, output) pair another
    # output (NOTE [indexed plain nodes]). None marks a row of another output than the
    # first row's; a comprehension and a C scan for it, not a loop
    if type(first) is tuple:
        index = first[1]
        nodes = [x[0] if type(x) is tuple and x[1] == index else None for x in column]
    else:
        nodes = [(x.node if x.index == index else None) if type(x) is LazyTensor else
                 None if index or type(x) is tuple else x for x in column]
    if None in nodes:
        return _gather_mixed(column, in_order)
    if memo is not None and memo[0] == nodes:   # list ==: identity of the same nodes
        plan, order = memo[1], None
    else:
        plan, order = _plan(nodes, in_order)
        if memo is not None:
            memo[0] = nodes if order is None else [nodes[p] for p in order]
            memo[1] = plan
    return _apply(plan, index), order


def _gather_mixed(column, in_order):
    """Rows of different outputs, e.g. sigmoid(i) and sigmoid(o) of one chunk()."""
    refs = [(lt.node, lt.index) if type(lt) is LazyTensor else lt if type(lt) is tuple
            else (lt, 0) for lt in column]
    fill_immediates([node for node, _ in refs])
    groups = _groups_by_source([(node.batch, index, node.row) for node, index in refs])
    plan, order = _plan_in_order(groups) if in_order else (_plan_groups(groups), None)
    return _apply(plan, None), order


def _plan(nodes, in_order):
    """(plan, order) for the first outputs of ``nodes`` (order: see ``_gather``)."""
    batch = nodes[0].batch
    if batch is None:               # an immediate, first gathered now
        fill_immediates(nodes)
        batch = nodes[0].batch
    rows = []
    for node in nodes:
        if node.batch is not batch:     # a Tree-LSTM's children lie in many batches
            groups = _groups_by_batch(nodes)
            break
        rows.append(node.row)
    else:
        if not in_order:
            return _plan_rows(batch, None, rows), None
        groups = {0: (batch, None, None, rows)}
    return _plan_in_order(groups) if in_order else (_plan_groups(groups), None)


_FILLING = ()


def fill_immediates(nodes) -> None:
    """Give the unfilled immediates among ``nodes`` (NOTE [immediates]) their values: one
    tensor for all of them, row k the k-th. Every unexecuted node met while a batch
    gathers its inputs is an immediate: real inputs ran in earlier batches."""
    fresh = []
    for node in nodes:
        if node.batch is None:
            node.batch = _FILLING     # a node met twice in one column gets one row
            node.row = len(fresh)
            fresh.append(node)
    if not fresh:
        return
    out = (_scalar_tensor([n.args[0] for n in fresh], fresh[0]),)
    for node in fresh:
        node.batch = out


def _immediate_values(column):
    """The Python values of a column made only of immediates, else None. Such a column (a
    batch's word ids or labels) needs no rows recorded: nothing else reads them as rows of
    this tensor, and a second reader builds its own. Immediates filled already count too:
    their value is their Python value (NOTE [shared immediates] in graph.py)."""
    values = []
    for lt in column:
        if type(lt) is not LazyTensor:
            return None
        node = lt.node
        if type(node) is not Immediate:
            return None
        values.append(node.args[0])
    return values


def _scalar_tensor(values, immediate) -> Tensor:
    _, dtype, device = immediate.info.outputs[0]
    make = _long_tensor if dtype is torch.int64 else _torch_tensor
    if torch.is_inference_mode_enabled() and not immediate.owner.inference:
        with torch.inference_mode(False):   # grad-mode batches may read it later
            return make(values, dtype=dtype, device=device)
    return make(values, dtype=dtype, device=device)


def _long_tensor(values, dtype=torch.int64, device=None) -> Tensor:
    """``torch.tensor(values, dtype=torch.int64)`` for a list of Python ints, in a fraction
    of the time: torch.tensor converts the list element by element (75 us for 1,000 ints,
    276 us if it must also infer the dtype), ``array('q')`` in one C loop (22 us). Row
    indices of gathers, word ids and labels are such lists."""
    try:
        flat = _array("q", values)
    except (TypeError, OverflowError):      # not all ints: torch converts, or says why
        return _torch_tensor(values, dtype=dtype, device=device)
    if not flat:
        return _torch_tensor(values, dtype=dtype, device=device)
    out = torch.frombuffer(flat, dtype=torch.int64)     # shares (and keeps) the array
    return out if device is None or device.type == "cpu" else out.to(device)


def _consecutive(rows) -> bool:
    r0 = rows[0]
    return rows[-1] - r0 == len(rows) - 1 and rows == list(range(r0, r0 + len(rows)))


def _plan_rows(batch, index, rows):
    if _consecutive(rows):
        return (_SLICE, batch, index, rows[0], len(rows))
    # index_select, not stack: the rows live in one tensor, so one gather kernel
    return (_INDEX, batch, index, _long_tensor(rows, device=batch[0].device))


def _groups_by_source(sources) -> dict:
    """(batch, index, row) triples grouped by output: {key: (batch, index, positions,
    rows)}, for ``_plan_groups`` or ``_plan_in_order``."""
    groups: dict = {}
    for pos, (batch, index, row) in enumerate(sources):
        key = (id(batch), index)
        group = groups.get(key)
        if group is None:
            groups[key] = group = (batch, index, [], [])
        group[2].append(pos)
        group[3].append(row)
    return groups


def _plan_groups(groups):
    """The plan for rows grouped by source, {key: (batch, index, positions, rows)}: one
    slice or index_select per source, one cat, and one index_select to restore the order
    when the sources interleave."""
    if len(groups) == 1:
        batch, index, _, rows = next(iter(groups.values()))
        return _plan_rows(batch, index, rows)
    parts = []
    order = []
    for batch, index, positions, rows in groups.values():
        parts.append(_plan_rows(batch, index, rows))
        order.extend(positions)
    if order == list(range(len(order))):
        return (_MANY, parts, None)
    inverse = [0] * len(order)
    for k, pos in enumerate(order):
        inverse[pos] = k
    return (_MANY, parts, _long_tensor(inverse, device=parts[0][1][0].device))


def _apply(plan, index) -> Tensor:
    """Run a gather plan; ``index`` picks the output of multi-output sources unless the
    plan names its own (plans for mixed outputs do)."""
    kind = plan[0]
    if kind == _SLICE:
        src = plan[1][index if plan[2] is None else plan[2]]
        r0, n = plan[3], plan[4]
        return src if r0 == 0 and n == src.shape[0] else src[r0:r0 + n]   # a view
    if kind == _INDEX:
        return plan[1][index if plan[2] is None else plan[2]].index_select(0, plan[3])
    joined = torch.cat([_apply(part, index) for part in plan[1]])
    return joined if plan[2] is None else joined.index_select(0, plan[2])


def node_args(node) -> tuple:
    """A pending node's arguments, rebuilt from its signature's template and its inputs
    when it is plain (NOTE [plain nodes])."""
    if node.args is not None:
        return node.args
    owner = node.owner
    args = list(owner.templates[node.info])
    nodes = owner.graph.nodes
    for k, (i,) in enumerate(node.info.paths):
        source = nodes[input_id(node, k)]
        index = input_index(node, k)
        args[i] = LazyTensor(source, index, source.info.outputs[index])
    return tuple(args)


def _per_example(node):
    """Run one node alone on its inputs' values: the eager semantics of the batch."""
    def conv(a):
        if type(a) is LazyTensor:
            return value_of(a)
        if type(a) in (list, tuple):
            return type(a)(conv(x) for x in a)
        return a
    args = tuple(conv(a) for a in node_args(node))
    kwargs = {k: conv(v) for k, v in (node.kwargs or {}).items()}
    fn = node.fn
    from .blocks import _call_body, BlockFunction
    if isinstance(fn, (torch.nn.Module, BlockFunction)):
        return _call_body(fn, args, kwargs)
    return fn(*args, **kwargs)


def _example_order(node) -> int:
    return -1 if node.example is None else node.example


def _recover(nodes, info, err):
    """A batched call failed: find the first example that fails on its own and name it; if
    none does, the rule is at fault, so run per example (correct) and say so loudly.
    "First" is by example index, not by row: a batch's row order is the executor's choice
    (NOTE [row order]), and the example named must not depend on it."""
    by_example = sorted(range(len(nodes)), key=lambda k: _example_order(nodes[k]))
    rows = [None] * len(nodes)
    for k in by_example:
        node = nodes[k]
        try:
            rows[k] = _per_example(node)
        except Exception as own:
            raise ExecuteError(
                f"{info.name} failed for {where(node.example, node.site)}\n"
                f"  (batch of {len(nodes)} nodes, signature {info!r})\n"
                f"  {type(own).__name__}: {own}") from own
    if rules.STRICT:
        raise ExecuteError(f"the batching rule for {info.name} failed on a batch of "
                           f"{len(nodes)} whose examples all run alone "
                           f"(first at {where(nodes[0].example, nodes[0].site)}): "
                           f"{type(err).__name__}: {err}") from err
    if info.name not in _warned:
        _warned.add(info.name)
        warnings.warn(f"dynbatch: the batching rule for {info.name} failed "
                      f"({type(err).__name__}: {err}); its nodes ran one example at a time "
                      "(counted in db.stats().fallbacks)", stacklevel=2)
    rules.counters["fallbacks"] += len(nodes)
    if info.structure is None:
        return torch.stack(rows)
    return [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]


def materialize(structure, cache=None):
    """Replace every lazy tensor in a (nested) result by its real tensor. Rows of one
    batch output come from one ``unbind``: one autograd node instead of one per row."""
    if cache is None:
        cache = {}
    t = type(structure)
    if t is LazyTensor:
        node = structure.node
        if type(node) is Immediate:   # its own tensor (NOTE [shared immediates])
            return _scalar_tensor([node.args[0]], node)[0]
        src = node.batch[structure.index]
        rows = cache.get(id(src))
        if rows is None:
            rows = cache[id(src)] = (src, src.unbind(0))
        return rows[1][node.row]
    if t is list or t is tuple:
        return t(materialize(x, cache) for x in structure)
    if t is dict:
        return {k: materialize(v, cache) for k, v in structure.items()}
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return t(*(materialize(x, cache) for x in structure))
    return structure
