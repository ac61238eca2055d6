"""Schedules as pure data: literal graphs with exact expected batches, and random-DAG
properties. No torch here: schedule.py must work (and be testable) without it.

A graph is three parallel lists, one entry per node in recording (topological) order:
``signatures[i]`` (any hashable), ``inputs[i]`` (node numbers + offset) and ``depths[i]``
(longest path from a source).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dynbatch.schedule as schedule_mod
from dynbatch.schedule import STRATEGIES, Batch, agenda_schedule, depth_schedule, schedule


def as_lists(batches):
    return [(b.signature, list(b.nodes)) for b in batches]


def depths_of(inputs, offset=0):
    depths = []
    for ins in inputs:
        local = [j - offset for j in ins if j >= offset]
        depths.append(max((depths[j] + 1 for j in local), default=0))
    return depths


def test_schedule_module_imports_no_torch():
    import dynbatch.schedule as mod
    with open(mod.__file__) as f:
        source = f.read()
    assert "import torch" not in source
    assert "from torch" not in source


def test_batch_is_frozen_data():
    b = Batch("sig", (1, 2))
    assert b == Batch("sig", (1, 2))
    with pytest.raises(Exception):
        b.nodes = (3,)  # type: ignore[misc]


# -- literal graphs ------------------------------------------------------------------------

# Two binary trees: ((l0 l1) ) and (l3 (l4 l5)).
TREES_SIGS = ["leaf", "leaf", "node", "leaf", "leaf", "leaf", "node", "node"]
TREES_INPUTS = [[], [], [0, 1], [], [], [], [4, 5], [3, 6]]
TREES_DEPTHS = [0, 0, 1, 0, 0, 0, 1, 2]


def test_literal_trees_depth():
    got = depth_schedule(TREES_SIGS, TREES_INPUTS, TREES_DEPTHS)
    assert as_lists(got) == [("leaf", [0, 1, 3, 4, 5]), ("node", [2, 6]), ("node", [7])]
    assert all(type(b) is Batch for b in got)


def test_literal_trees_agenda():
    got = agenda_schedule(TREES_SIGS, TREES_INPUTS, TREES_DEPTHS)
    assert as_lists(got) == [("leaf", [0, 1, 3, 4, 5]), ("node", [2, 6]), ("node", [7])]


# Two signatures at the same depth: depth keeps first-recorded order within a depth.
MIXED_SIGS = ["x", "y", "x", "f", "g", "f", "g"]
MIXED_INPUTS = [[], [], [], [0], [1], [2], [3, 5]]
MIXED_DEPTHS = [0, 0, 0, 1, 1, 1, 2]


def test_literal_mixed_depth():
    got = depth_schedule(MIXED_SIGS, MIXED_INPUTS, MIXED_DEPTHS)
    assert as_lists(got) == [("x", [0, 2]), ("y", [1]), ("f", [3, 5]), ("g", [4]),
                             ("g", [6])]


def test_literal_mixed_agenda():
    # Heights (longest path still ahead): x0, x2: 2; y1, f3, f5: 1; g4, g6: 0.
    # Sources: x:[0, 2] (top height 2) beats y:[1] (1). Then f:[3, 5] and y:[1] tie on
    # height 1 -> the larger group, f; that makes 6 ready; y (1) beats g:[6] (0); y
    # releases 4, joining 6 in one g group.
    got = agenda_schedule(MIXED_SIGS, MIXED_INPUTS, MIXED_DEPTHS)
    assert as_lists(got) == [("x", [0, 2]), ("f", [3, 5]), ("y", [1]), ("g", [6, 4])]


# A chain of cells, each with a loss on the side, summed at the end: the lowest-depth rule
# would run the losses once per cell (they are always the shallowest ready nodes); the
# critical path runs every cell first and all the losses in one batch.
LOSS_SIGS = ["cell", "loss", "cell", "loss", "cell", "loss", "sum"]
LOSS_INPUTS = [[], [0], [0], [2], [2], [4], [1, 3, 5]]
LOSS_DEPTHS = [0, 1, 1, 2, 2, 3, 4]


def test_agenda_runs_side_losses_once_after_the_chain():
    got = agenda_schedule(LOSS_SIGS, LOSS_INPUTS, LOSS_DEPTHS)
    assert as_lists(got) == [("cell", [0]), ("cell", [2]), ("cell", [4]),
                             ("loss", [1, 3, 5]), ("sum", [6])]


# Same-signature chains of different lengths across examples: examples 0 and 1 are
# k -> c -> a, example 2 is k -> a. By depth, example 2's `a` (depth 1) and the others'
# `a` (depth 2) land in different batches; the agenda runs the ready group `c` first (it
# has a path ahead, the ready `a` has none), so all three `a` run together.
CHAINS_SIGS = ["k", "c", "a", "k", "c", "a", "k", "a"]
CHAINS_INPUTS = [[], [0], [1], [], [3], [4], [], [6]]
CHAINS_DEPTHS = [0, 1, 2, 0, 1, 2, 0, 1]


def test_agenda_beats_depth_on_chains_of_different_lengths():
    d = depth_schedule(CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS)
    a = agenda_schedule(CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS)
    assert as_lists(d) == [("k", [0, 3, 6]), ("c", [1, 4]), ("a", [7]), ("a", [2, 5])]
    assert as_lists(a) == [("k", [0, 3, 6]), ("c", [1, 4]), ("a", [7, 2, 5])]
    assert len(a) < len(d)


def test_agenda_beats_depth_whatever_the_example_order():
    # The same three examples, the short one recorded first: the result must not hinge on
    # first-recorded order, since the group sizes decide.
    sigs = ["k", "a", "k", "c", "a", "k", "c", "a"]
    inputs = [[], [0], [], [2], [3], [], [5], [6]]
    depths = depths_of(inputs)
    a = agenda_schedule(sigs, inputs, depths)
    assert as_lists(a) == [("k", [0, 2, 5]), ("c", [3, 6]), ("a", [1, 4, 7])]
    assert len(depth_schedule(sigs, inputs, depths)) == 4


def test_agenda_prefers_the_longest_path_ahead():
    # Ready sources a0, b1, a2; a0 feeds a chain of two more nodes, b1 feeds one.
    sigs = ["a", "b", "a", "c", "c", "d"]
    inputs = [[], [], [], [0], [1], [3]]
    # Heights: a0 2, b1 1, a2 0 -> "a" first (both a's); then b1 and c3 tie (height 1,
    # one node each) -> the first seen, b; that releases c4 to join c3.
    got = agenda_schedule(sigs, inputs, depths_of(inputs))
    assert as_lists(got) == [("a", [0, 2]), ("b", [1]), ("c", [3, 4]), ("d", [5])]


def test_agenda_longer_path_beats_larger_group():
    # Three ready "a" with nothing after them; one "b" with a user.
    got = agenda_schedule(["a", "a", "a", "b", "c"], [[], [], [], [], [3]], [0, 0, 0, 0, 1])
    assert as_lists(got) == [("b", [3]), ("a", [0, 1, 2]), ("c", [4])]


def test_agenda_ties_go_to_the_larger_group():
    got = agenda_schedule(["a", "b", "b"], [[], [], []], [1, 1, 1])
    assert as_lists(got) == [("b", [1, 2]), ("a", [0])]


def test_agenda_full_tie_goes_to_first_seen():
    got = agenda_schedule(["a", "b"], [[], []], [0, 0])
    assert as_lists(got) == [("a", [0]), ("b", [1])]
    got = agenda_schedule(["b", "a"], [[], []], [0, 0])
    assert as_lists(got) == [("b", [0]), ("a", [1])]


def test_agenda_waits_for_every_input_and_duplicates():
    # Node 2 reads node 0 twice and node 1 once; it runs only after both.
    sigs = ["x", "y", "z"]
    inputs = [[], [0], [0, 0, 1]]
    got = agenda_schedule(sigs, inputs, depths_of(inputs))
    assert as_lists(got) == [("x", [0]), ("y", [1]), ("z", [2])]


def test_empty_graph():
    for strategy in STRATEGIES:
        assert schedule(strategy, [], [], []) == []


def test_offset_ignores_already_executed_inputs():
    # A second execution of a run: nodes 10..13 pending, 0..9 already executed.
    # Local node 0 reads executed node 3 only; node 1 reads local 0 (=10) and executed 7.
    offset = 10
    sigs = ["f", "g", "f", "g"]
    inputs = [[3], [10, 7], [2], [12, 11]]
    depths = [4, 5, 1, 6]
    d = depth_schedule(sigs, inputs, depths, offset)
    a = agenda_schedule(sigs, inputs, depths, offset)
    assert as_lists(d) == [("f", [2]), ("f", [0]), ("g", [1]), ("g", [3])]
    # agenda: ready f:[0, 2] (avg 2.5) -> run both; then g:[1] (11 done) ; then g:[3].
    assert as_lists(a) == [("f", [0, 2]), ("g", [1]), ("g", [3])]
    for batches in (d, a):
        assert sorted(i for b in batches for i in b.nodes) == [0, 1, 2, 3]
        check_valid(batches, sigs, inputs, offset)


def test_offset_zero_default_equals_explicit():
    for fn in (agenda_schedule, depth_schedule):
        assert fn(TREES_SIGS, TREES_INPUTS, TREES_DEPTHS) == \
            fn(TREES_SIGS, TREES_INPUTS, TREES_DEPTHS, 0)


def test_agenda_rejects_a_cycle():
    with pytest.raises(ValueError):
        agenda_schedule(["a", "b"], [[1], [0]], [0, 0])


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        schedule("breadth", ["a"], [[]], [0])


def test_schedule_dispatches():
    assert schedule("depth", CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS) == \
        depth_schedule(CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS)
    assert schedule("agenda", CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS) == \
        agenda_schedule(CHAINS_SIGS, CHAINS_INPUTS, CHAINS_DEPTHS)


def test_schedule_runs_without_torch():
    # Load schedule.py on its own in a fresh interpreter: it must not pull torch in.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {schedule_mod.__file__!r})\n"
        "m = sys.modules['s'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "b = m.agenda_schedule(['a', 'a'], [[], [0]], [0, 1])\n"
        "assert [x.nodes for x in b] == [(0,), (1,)], b\n"
        "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- properties over random DAGs -----------------------------------------------------------

def check_valid(batches, sigs, inputs, offset=0):
    n = len(sigs)
    position = {}
    for k, b in enumerate(batches):
        assert len(b.nodes) > 0, f"empty batch {k}"
        for i in b.nodes:
            assert 0 <= i < n
            assert i not in position, f"node {i} scheduled twice"
            position[i] = k
            assert sigs[i] == b.signature, f"node {i} ({sigs[i]!r}) in a {b.signature!r} batch"
    assert sorted(position) == list(range(n)), "some node never scheduled"
    for i, ins in enumerate(inputs):
        for j in ins:
            j -= offset
            if j >= 0:
                assert position[j] < position[i], f"node {i} runs before its input {j}"


@st.composite
def dags(draw):
    n = draw(st.integers(0, 40))
    offset = draw(st.sampled_from([0, 0, 5]))
    alphabet = draw(st.integers(1, 4))
    sigs = [draw(st.sampled_from("abcd"[:alphabet])) for _ in range(n)]
    inputs = []
    for i in range(n):
        k = draw(st.integers(0, min(3, i) if i else 0))
        ins = [draw(st.integers(0, i - 1)) + offset for _ in range(k)] if i else []
        if offset and draw(st.booleans()):
            ins.append(draw(st.integers(0, offset - 1)))     # an already-executed input
        inputs.append(ins)
    return sigs, inputs, depths_of(inputs, offset), offset


@settings(max_examples=50, deadline=None)
@given(dags())
def test_depth_schedule_properties(graph):
    sigs, inputs, depths, offset = graph
    batches = depth_schedule(sigs, inputs, depths, offset)
    check_valid(batches, sigs, inputs, offset)
    # one depth per batch, shallow first, one batch per (depth, signature)
    seen = set()
    last = -1
    for b in batches:
        ds = {depths[i] for i in b.nodes}
        assert len(ds) == 1
        d = ds.pop()
        assert d >= last
        last = d
        assert (d, b.signature) not in seen
        seen.add((d, b.signature))
    if sigs:
        assert len(batches) <= (max(depths) + 1) * len(set(sigs))


@settings(max_examples=50, deadline=None)
@given(dags())
def test_agenda_schedule_properties(graph):
    sigs, inputs, depths, offset = graph
    batches = agenda_schedule(sigs, inputs, depths, offset)
    check_valid(batches, sigs, inputs, offset)
    # Replay: each batch is ALL the ready nodes of its signature, and that group has the
    # largest (height of its highest node, size) among the ready groups.
    n = len(sigs)
    height = [0] * n
    for i in reversed(range(n)):
        for j in inputs[i]:
            if j - offset >= 0:
                height[j - offset] = max(height[j - offset], height[i] + 1)
    done: set[int] = set()
    for b in batches:
        ready: dict = {}
        for i in range(len(sigs)):
            if i not in done and all(j - offset < 0 or j - offset in done for j in inputs[i]):
                ready.setdefault(sigs[i], []).append(i)
        assert sorted(b.nodes) == sorted(ready[b.signature])
        key = {s: (max(height[i] for i in m), len(m)) for s, m in ready.items()}
        assert key[b.signature] == max(key.values())
        done.update(b.nodes)
    # Never more batches than nodes, and never fewer than the number of signatures.
    assert len(batches) <= len(sigs)
    assert len(batches) >= len(set(sigs))


@settings(max_examples=50, deadline=None)
@given(dags(), st.data())
def test_targets_schedule_exactly_their_ancestors(graph, data):
    sigs, inputs, depths, offset = graph
    n = len(sigs)
    targets = data.draw(st.lists(st.integers(0, n - 1), max_size=4)) if n else []
    needed = set()
    stack = list(targets)
    while stack:                 # the reference: a plain graph search
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(j - offset for j in inputs[i] if j - offset >= 0)
    for strategy in STRATEGIES:
        batches = schedule(strategy, sigs, inputs, depths, offset, targets)
        got = [i for b in batches for i in b.nodes]
        assert sorted(got) == sorted(needed), strategy
        position = {i: k for k, b in enumerate(batches) for i in b.nodes}
        for i in got:
            for j in inputs[i]:
                if j - offset >= 0:
                    assert position[j - offset] < position[i]
        assert all(sigs[i] == b.signature for b in batches for i in b.nodes)


def test_targets_leave_dead_nodes_out():
    # 0 -> 1 (the target), 0 -> 2 (dead): the dead node is not scheduled.
    got = agenda_schedule(["x", "y", "y"], [[], [0], [0]], [0, 1, 1], 0, [1])
    assert as_lists(got) == [("x", [0]), ("y", [1])]
    got = depth_schedule(["x", "y", "y"], [[], [0], [0]], [0, 1, 1], 0, [1])
    assert as_lists(got) == [("x", [0]), ("y", [1])]


@settings(max_examples=50, deadline=None)
@given(dags(), st.data())
def test_each_node_dies_in_the_batch_of_its_last_reader(graph, data):
    # The executor lets go of a value after the batch named here (NOTE [freeing] in
    # execute.py): a batch too early frees a value a later batch reads; a reader left
    # unscheduled (targets) reads it in a later execution, so the value must not die.
    # The reference looks at every reader of every node, repeats included.
    sigs, inputs, depths, offset = graph
    n = len(sigs)
    targets = data.draw(st.one_of(st.none(), st.lists(st.integers(0, n - 1), max_size=4))) \
        if n else None
    for strategy in STRATEGIES:
        deaths: list = []
        batches = schedule(strategy, sigs, inputs, depths, offset, targets, deaths)
        assert batches == schedule(strategy, sigs, inputs, depths, offset, targets), strategy
        position = {i: b for b, batch in enumerate(batches) for i in batch.nodes}
        expected = [[] for _ in batches]
        for j in range(n):
            readers = [i for i, ins in enumerate(inputs) if j + offset in ins]
            if readers and all(i in position for i in readers):
                expected[max(position[i] for i in readers)].append(j)
        assert [sorted(d) for d in deaths] == expected, strategy
        # given the numbers to count with (execute passes the node ids), the same
        numbered: list = []
        assert schedule(strategy, sigs, inputs, depths, offset, targets, numbered,
                        list(range(n))) == batches, strategy
        assert numbered == deaths, strategy
        # a node's one input may be given as the number alone (NOTE [one input] in
        # graph.py): the same schedule and deaths
        packed = [ins[0] if len(ins) == 1 else tuple(ins) for ins in inputs]
        single: list = []
        assert schedule(strategy, sigs, packed, depths, offset, targets, single) == batches
        assert single == deaths, strategy


def test_given_numbers_the_batches_and_deaths_hold_those_int_objects():
    # execute passes the graph's node ids as ``numbers``: counting afresh makes an int
    # object per node above 256, at the peak of a training step's Python memory. 300
    # chains of 4: node numbers up to 1,199, most of them ints of their own.
    sigs, inputs = [], []
    for c in range(300):
        for k in range(4):
            sigs.append(("op", k))
            inputs.append([len(inputs) - 1] if k else [])
    numbers = [int(str(i + 1000)) - 1000 for i in range(len(sigs))]    # fresh, equal to i
    mine = {id(x) for x in numbers}
    depths = [k for _ in range(300) for k in range(4)]
    for strategy in STRATEGIES:
        deaths: list = []
        batches = schedule(strategy, sigs, inputs, depths, 0, None, deaths, numbers)
        assert batches == schedule(strategy, sigs, inputs, depths), strategy
        held = [i for b in batches for i in b.nodes] + [i for d in deaths for i in d]
        assert len(held) == 1200 + 900, strategy
        assert all(id(i) in mine for i in held if i > 256), strategy


def test_the_agenda_reads_inputs_and_numbers_once_so_generators_do():
    # execute passes generators over its nodes, not n-long lists, at the step's Python peak
    sigs = ["leaf", "leaf", "leaf", "pair", "pair", "top"]
    inputs = [[], [], [], [0, 1], [1, 2], [3, 4]]
    depths = [0, 0, 0, 1, 1, 2]
    for targets in (None, [3]):
        deaths: list = []
        expected_deaths: list = []
        got = agenda_schedule(sigs, (ins for ins in inputs), None, 0, targets, deaths,
                              (i for i in range(len(sigs))))
        assert got == agenda_schedule(sigs, inputs, depths, 0, targets, expected_deaths)
        assert deaths == expected_deaths
    got = depth_schedule(sigs, inputs, depths, 0, None, (i for i in range(len(sigs))))
    assert got == depth_schedule(sigs, inputs, depths)
