"""Scheduling: turn a DAG of signed nodes into a sequence of batches. Pure; no torch.

Input, for n nodes numbered 0..n-1 in a topological order: ``signatures[i]`` (any hashable;
nodes with equal signatures may run as one call), ``inputs[i]`` (the numbers of the nodes i
reads, plus ``offset``, or one such number alone (NOTE [one input] in graph.py); duplicates
allowed; numbers below ``offset`` name nodes that already ran and are ignored) and
``depths[i]`` (longest path from a source; read by the depth strategy only, so None will do
for the agenda). With ``targets`` (node numbers, without the offset), only the targets and
what they need are scheduled (NOTE [dead code] in execute.py); otherwise every node. Output:
a list of ``Batch``; every scheduled node appears in exactly one, each batch holds one
signature, and every input of a node lies in an earlier batch. Given ``deaths`` (a list),
``schedule`` also leaves in it, for each batch, the nodes whose last reader is in that batch
(none for a node with no reader, or with one left unscheduled), for the executor to let go
of values (NOTE [freeing] in execute.py); the agenda finds them from the users it finds
anyway. Given ``numbers`` (``numbers[i] == i``, e.g. the graph's own node ids), the batches,
deaths and the scheduler's own lists hold those int objects: counting afresh makes one of 32
bytes per node above 256, at the point where a training step's Python memory peaks. Per-op
SST at B=256, that peak went from 56.7 to 52.9 MB (``python benchmarks/time_split.py
--profile --impl dynbatch-agenda --batch 256 --minibatches 1``, git be8853d and 8fc5c64).
The agenda reads ``inputs`` and ``numbers`` once, in order, so any iterables will do
(execute passes generators over its nodes); the depth strategy reads ``numbers`` so.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

STRATEGIES = ("agenda", "depth")


@dataclass(frozen=True, slots=True)
class Batch:
    signature: Hashable
    nodes: tuple[int, ...]


def _needed(inputs: Sequence[Sequence[int]], offset: int, targets: Iterable[int]) -> bytearray:
    """live[i] = 1 when node i is a target or an input of a live node: one backward sweep."""
    live = bytearray(len(inputs))
    for t in targets:
        live[t] = 1
    for i in range(len(inputs) - 1, -1, -1):
        if live[i]:
            ins = inputs[i]
            for j in (ins,) if type(ins) is int else ins:
                j -= offset
                if j >= 0:
                    live[j] = 1
    return live


def depth_schedule(signatures: Sequence[Hashable], inputs: Sequence[Sequence[int]],
                   depths: Sequence[int], offset: int = 0,
                   targets: Iterable[int] | None = None,
                   numbers: Iterable[int] | None = None) -> list[Batch]:
    """TF Fold: one batch per (depth, signature), shallow depths first. Inputs always sit at
    a smaller depth, so this order is valid without looking at ``inputs``."""
    live = None if targets is None else _needed(inputs, offset, targets)
    groups: dict[tuple[int, Hashable], list[int]] = {}
    for i, key in zip(range(len(depths)) if numbers is None else numbers,
                      zip(depths, signatures)):
        if live is not None and not live[i]:
            continue
        members = groups.get(key)
        if members is None:
            groups[key] = [i]
        else:
            members.append(i)
    # sort by depth only: ties keep first-recorded order, so schedules are reproducible
    order = sorted(groups, key=lambda key: key[0])
    return [Batch(key[1], tuple(groups[key])) for key in order]


def agenda_schedule(signatures: Sequence[Hashable], inputs: Iterable[Sequence[int]],
                    depths: Sequence[int] | None, offset: int = 0,
                    targets: Iterable[int] | None = None,
                    deaths: list | None = None,
                    numbers: Iterable[int] | None = None) -> list[Batch]:
    """DyNet's agenda, critical path first: among the signatures with ready nodes, run the
    one whose ready nodes include the node with the longest path still ahead of it (its
    height: nodes in a chain of users below it), all its ready nodes at once, then release
    their users. Ties go to the larger group. (``depths`` is not used, and may be None:
    heights come from the graph itself, in one backward sweep.)

    Why not DyNet's "lowest average depth first": a per-node loss is ready as soon as its
    node is, and always has the lowest depth, so it ran once per tree level (20-40 small
    batches for SST) instead of once at the end; its height (2: the loss, the sum) puts it
    last, after every cell, in one batch."""
    n = len(signatures)
    waiting = [0] * n
    # users[j]: None, the one user's number, or a tuple of them. Most nodes have one user;
    # an int instead of a one-item list saves 70 bytes a node (a 180,000-node run: 12 MB),
    # and a tuple of two (most of the rest) 24 bytes less than a list, at the step's peak
    users: list = [None] * n
    sources = []            # nodes with no input left to wait for
    # inputs and numbers are read once, in order: any iterables (execute passes generators,
    # not n-long lists, at the Python peak of a training step)
    for i, ins in enumerate(inputs) if numbers is None else zip(numbers, inputs):
        count = 0
        for j in (ins,) if type(ins) is int else ins:
            j -= offset
            if j >= 0:
                count += 1
                us = users[j]
                if us is None:
                    users[j] = i
                elif type(us) is int:
                    users[j] = (us, i)
                else:
                    users[j] = us + (i,)
        if count:
            waiting[i] = count
        else:
            sources.append(i)
    # heights (and, with targets, liveness) in one sweep from the last node back
    height = [0] * n
    live = None
    if targets is not None:
        live = bytearray(n)
        for t in targets:
            live[t] = 1
    # Two sweeps, without and with liveness, so that the common case tests nothing per
    # user; a node with one user (the commonest) is an int in ``users``: no inner loop.
    if live is None:
        for i in range(n - 1, -1, -1):
            us = users[i]
            if us is None:
                continue
            if type(us) is int:
                height[i] = height[us] + 1
            else:
                h = 0
                for u in us:
                    if height[u] >= h:
                        h = height[u] + 1
                height[i] = h
    else:
        for i in range(n - 1, -1, -1):
            us = users[i]
            if us is None:
                continue
            if type(us) is int:
                if live[us]:
                    height[i] = height[us] + 1
                    live[i] = 1
            else:
                h = 0
                for u in us:
                    if live[u]:
                        if height[u] >= h:
                            h = height[u] + 1
                        live[i] = 1
                height[i] = h
    ready: dict[Hashable, list[int]] = {}
    top: dict[Hashable, int] = {}
    # each node's batch, for the deaths (n: not scheduled). A node's height is read only
    # until it is scheduled, so its batch takes the height's place: a list of n fewer.
    batch_of = height
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
        best = None
        best_top = best_size = -1
        for sig, members in ready.items():
            t = top[sig]
            if t > best_top or (t == best_top and len(members) > best_size):
                best, best_top, best_size = sig, t, len(members)
        members = ready.pop(best)
        del top[best]
        b = len(batches)
        batches.append(Batch(best, tuple(members)))
        released = []
        for i in members:
            batch_of[i] = b
            us = users[i]
            if us is None:
                continue
            if type(us) is int:
                left = waiting[us] - 1
                waiting[us] = left
                if left == 0 and (live is None or live[us]):
                    released.append(us)
                continue
            for u in us:
                left = waiting[u] - 1
                waiting[u] = left
                if left == 0 and (live is None or live[u]):
                    released.append(u)
    expected = n if live is None else sum(live)
    if sum(len(b.nodes) for b in batches) != expected:
        raise ValueError("agenda_schedule: the graph has a cycle or an input out of range")
    if live is not None:
        for i in range(n):
            if not live[i]:
                batch_of[i] = n
    if deaths is not None:
        del waiting, released, ready, top     # (the Python peak of a step comes next)
        deaths[:] = _deaths_from_users(users, batch_of, batches)
    return batches


def _deaths_from_users(users, batch_of, batches) -> list[list[int]]:
    """deaths[b]: the nodes whose last reader is in batch b. A node with a reader left
    unscheduled (``batch_of`` says n) or with none has no death. One step per node with
    one reader (the commonest), not one per input entry as counting down uses was. The
    node numbers are the batches' own int objects: fresh ones (above 256) would cost 32
    bytes a node, 4.6 MB for a per-op minibatch of 256 SST trees."""
    deaths: list[list[int]] = [[] for _ in batches]
    never = len(batch_of)
    for j in (j for batch in batches for j in batch.nodes):
        us = users[j]
        if us is None:
            continue
        if type(us) is int:
            last = batch_of[us]
        else:
            last = 0
            for u in us:
                b = batch_of[u]
                if b > last:
                    last = b
        if last < never:
            deaths[last].append(j)
    return deaths


def deaths_of(inputs: Sequence[Sequence[int]], offset: int, batches: Sequence[Batch],
              ) -> list[list[int]]:
    """deaths[b] (as ``_deaths_from_users`` gives) for any schedule, from the inputs."""
    n = len(inputs)
    batch_of = [n] * n
    for b, batch in enumerate(batches):
        for i in batch.nodes:
            batch_of[i] = b
    last = [-1] * n
    for i, ins in enumerate(inputs):
        b = batch_of[i]
        for j in (ins,) if type(ins) is int else ins:
            j -= offset
            if j >= 0 and b > last[j]:
                last[j] = b
    deaths: list[list[int]] = [[] for _ in batches]
    for batch in batches:
        for j in batch.nodes:       # the batches' int objects (see _deaths_from_users)
            b = last[j]
            if 0 <= b < n:
                deaths[b].append(j)
    return deaths


def schedule(strategy: str, signatures: Sequence[Hashable], inputs: Sequence[Sequence[int]],
             depths: Sequence[int], offset: int = 0,
             targets: Iterable[int] | None = None, deaths: list | None = None,
             numbers: Iterable[int] | None = None) -> list[Batch]:
    """The batches of the strategy named; ``deaths`` (a list) is filled, whichever the
    strategy, with the nodes whose last reader runs in each batch."""
    if strategy == "agenda":
        return agenda_schedule(signatures, inputs, depths, offset, targets, deaths, numbers)
    if strategy == "depth":
        batches = depth_schedule(signatures, inputs, depths, offset, targets, numbers)
        if deaths is not None:
            deaths[:] = deaths_of(inputs, offset, batches)
        return batches
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
