"""Scheduling: a DAG of signed nodes as a sequence of batches. Pure; no torch.

Input, for n nodes in a topological order: ``signatures[i]`` (any hashable; nodes with equal
signatures may run as one call) and ``inputs``, an iterable read once, in order, whose i-th
item holds the nodes i reads (numbered as ``i + offset`` is; numbers below ``offset`` are
nodes that ran already, or constants, and are ignored; duplicates allowed). With
``targets`` (numbers of nodes, 0-based), only the targets and what they need are scheduled
(NOTE [dead code]); otherwise every node.
Output: a list of ``Batch``; every scheduled node is in exactly one, each batch holds one
signature, and every input of a node lies in an earlier batch.

NOTE [schedule memory]: a schedule holds a number for every node at once, and a Python int
above 256 is an object of 32 bytes: for a large run, megabytes on top of its graph, at the
moment memory peaks. So ``numbers`` may give the int objects to use for 0..n-1 (a graph's
own node ids, when they are those numbers), and heights live in a typed array.

NOTE [dead code]: only what a result or a read needs runs. A value computed and never used
must not share a batched call with live values: its parameters would get zero gradients
where eager PyTorch leaves them None. Pending work not needed yet stays pending, to batch
with what comes later.
"""
from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

STRATEGIES = ("agenda", "depth")


@dataclass(frozen=True, slots=True)
class Batch:
    signature: Hashable
    nodes: tuple[int, ...]


def needed(inputs: Sequence[Sequence[int]], offset: int, targets: Iterable[int]) -> bytearray:
    """live[i] = 1 when node i is a target or an input of a live node: one backward sweep."""
    live = bytearray(len(inputs))
    for t in targets:
        live[t] = 1
    for i in range(len(inputs) - 1, -1, -1):
        if live[i]:
            for j in inputs[i]:
                j -= offset
                if j >= 0:
                    live[j] = 1
    return live


def depth_schedule(signatures: Sequence[Hashable], inputs: Iterable[Sequence[int]],
                   offset: int = 0, targets: Iterable[int] | None = None,
                   numbers: Sequence[int] | None = None) -> list[Batch]:
    """TensorFlow Fold: one batch per (depth, signature), shallow depths first, where a
    node's depth is one more than its deepest input's. Inputs always lie at a smaller
    depth, so the order is valid."""
    if targets is not None and not isinstance(inputs, Sequence):
        inputs = list(inputs)       # read twice: backward for liveness, forward here
    live = None if targets is None else needed(inputs, offset, targets)
    depth = [0] * len(signatures)
    groups: dict[tuple[int, Hashable], list[int]] = {}
    for i, sig, ins in zip(numbers or range(len(signatures)), signatures, inputs):
        d = 0
        for j in ins:
            j -= offset
            if j >= 0 and depth[j] >= d:
                d = depth[j] + 1
        depth[i] = d
        if live is None or live[i]:
            groups.setdefault((d, sig), []).append(i)
    # sorted by depth only: ties keep the first-recorded order, so schedules reproduce
    return [Batch(key[1], tuple(members))
            for key, members in sorted(groups.items(), key=lambda kv: kv[0][0])]


def agenda_schedule(signatures: Sequence[Hashable], inputs: Iterable[Sequence[int]],
                    offset: int = 0, targets: Iterable[int] | None = None,
                    numbers: Sequence[int] | None = None) -> list[Batch]:
    """DyNet's agenda, critical path first: among the signatures with ready nodes, run the
    one whose ready nodes include the node with the longest chain of users still below it
    (its height), all its ready nodes at once, then release their users. Ties go to the
    larger group.

    Why not DyNet's "lowest average depth first": a per-node loss is ready as soon as its
    node is, and has the lowest depth, so it would run once per tree level instead of
    once at the end; its height (the loss, then the sum) puts it last, in one batch."""
    n = len(signatures)
    waiting = [0] * n
    # users[j]: None, the one user's number, or a tuple of them: most nodes have one user,
    # and an int costs no list (the graph of a large run has hundreds of thousands)
    users: list = [None] * n
    sources = []
    for i, ins in zip(numbers or range(n), inputs):
        count = 0
        for j in ins:
            j -= offset
            if j >= 0:
                count += 1
                us = users[j]
                users[j] = i if us is None else (us, i) if type(us) is int else us + (i,)
        if count:
            waiting[i] = count
        else:
            sources.append(i)
    live = None
    if targets is not None:
        live = bytearray(n)
        for t in targets:
            live[t] = 1
    height = _heights(users, live)
    ready: dict[Hashable, list[int]] = {}
    top: dict[Hashable, int] = {}
    released = sources if live is None else [i for i in sources if live[i]]
    batches: list[Batch] = []
    while True:
        for u in released:
            sig = signatures[u]
            members = ready.get(sig)
            if members is None:
                ready[sig] = [u]
                top[sig] = height[u]
            else:
                members.append(u)
                if height[u] > top[sig]:
                    top[sig] = height[u]
        if not ready:
            break
        best, best_top, best_size = None, -1, -1
        for sig, members in ready.items():
            t = top[sig]
            if t > best_top or (t == best_top and len(members) > best_size):
                best, best_top, best_size = sig, t, len(members)
        members = ready.pop(best)
        del top[best]
        batches.append(Batch(best, tuple(members)))
        released = []
        for i in members:
            us = users[i]
            for u in () if us is None else (us,) if type(us) is int else us:
                left = waiting[u] - 1
                waiting[u] = left
                if left == 0 and (live is None or live[u]):
                    released.append(u)
    expected = n if live is None else sum(live)
    if sum(len(b.nodes) for b in batches) != expected:
        raise ValueError("agenda_schedule: the graph has a cycle or an input out of range")
    return batches


def _heights(users: list, live) -> array:
    """Each node's longest chain of (live) users below it, in one sweep from the end; with
    ``live`` (the targets marked), also marks every node a live user reads."""
    height = array("i", bytes(4 * len(users)))
    for i in range(len(users) - 1, -1, -1):
        us = users[i]
        if us is None:
            continue
        if type(us) is int:
            if live is None:
                height[i] = height[us] + 1
            elif live[us]:
                height[i] = height[us] + 1
                live[i] = 1
            continue
        h = 0
        for u in us:
            if live is None or live[u]:
                if height[u] >= h:
                    h = height[u] + 1
                if live is not None:
                    live[i] = 1
        height[i] = h
    return height


def schedule(strategy: str, signatures: Sequence[Hashable], inputs: Iterable[Sequence[int]],
             offset: int = 0, targets: Iterable[int] | None = None,
             numbers: Sequence[int] | None = None) -> list[Batch]:
    if strategy == "agenda":
        return agenda_schedule(signatures, inputs, offset, targets, numbers)
    if strategy == "depth":
        return depth_schedule(signatures, inputs, offset, targets, numbers)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
