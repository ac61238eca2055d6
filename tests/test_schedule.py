"""Schedules as pure data (dynbatch/schedule.py): literal graphs with exact expected
batches, and properties over random DAGs. No torch here: schedule.py must work (and be
testable) without it, which the first tests check.

Tested: every scheduled node in exactly one batch, one signature per batch, every input in
an earlier batch; with targets, exactly the targets and what they need (``needed`` too);
the depth strategy (one batch per (depth, signature), shallow first, at most
(max depth + 1) x signatures batches, depths computed from ``inputs``); the agenda (each
batch is all the ready nodes of the signature with the highest ready node, ties to the
larger group, then the first seen: per-node losses run once, at the end); determinism,
even across hash seeds; cycles rejected (agenda); numbers below ``offset`` (nodes run already, and
constants: negative ids) ignored; duplicate inputs.

A graph is two parallel lists, one entry per node in recording (topological) order:
``signatures[i]`` (any hashable) and ``inputs[i]`` (a tuple of node numbers + offset).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dynbatch.schedule as schedule_mod
from dynbatch.schedule import STRATEGIES, Batch, agenda_schedule, depth_schedule, needed, schedule


def as_lists(batches):
    return [(b.signature, list(b.nodes)) for b in batches]


def depths_of(inputs, offset=0):
    """The reference: longest path from a source, among the nodes numbered >= offset."""
    depths = []
    for ins in inputs:
        local = [j - offset for j in ins if j >= offset]
        depths.append(max((depths[j] + 1 for j in local), default=0))
    return depths


def ancestors(inputs, offset, targets):
    """The reference for ``targets``: the targets and what they need, by graph search."""
    found = set()
    stack = list(targets)
    while stack:
        i = stack.pop()
        if i not in found:
            found.add(i)
            stack.extend(j - offset for j in inputs[i] if j - offset >= 0)
    return found


def check_valid(batches, sigs, inputs, offset=0, scheduled=None):
    """Every node of ``scheduled`` (default: all) in exactly one non-empty batch, of its
    own signature, after every batch holding one of its inputs."""
    n = len(sigs)
    position = {}
    for k, b in enumerate(batches):
        assert type(b) is Batch
        assert type(b.nodes) is tuple
        assert len(b.nodes) > 0, f"empty batch {k}"
        for i in b.nodes:
            assert 0 <= i < n
            assert i not in position, f"node {i} scheduled twice"
            position[i] = k
            assert sigs[i] == b.signature, f"node {i} ({sigs[i]!r}) in a {b.signature!r} batch"
    expected = sorted(range(n) if scheduled is None else scheduled)
    assert sorted(position) == expected, "scheduled nodes differ from those expected"
    for i in position:
        for j in inputs[i]:
            j -= offset
            if j >= 0:
                assert position[j] < position[i], f"node {i} runs before its input {j}"


# -- no torch ------------------------------------------------------------------------------

def _imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_schedule_module_and_these_tests_import_no_torch():
    # schedule.py itself: no torch, and no relative import (dynbatch/__init__ pulls torch in)
    names = _imported_modules(schedule_mod.__file__)
    assert "dataclasses" in names                     # (the parse found the imports)
    assert not [m for m in names if m.split(".")[0] == "torch" or m.startswith(".")], names
    names = _imported_modules(__file__)
    assert "dynbatch.schedule" in names
    assert not [m for m in names if m.split(".")[0] == "torch"], names


# A graph where every choice is a tie: 12 signatures of 2 sources each, then a node of
# each signature reading both. Any choice made by iterating a set of signatures (hash
# order) instead of first-seen order would show up as a difference across hash seeds.
TIES_SIGS = [f"s{k}" for k in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6) for _ in range(2)]
TIES_SIGS += TIES_SIGS[::2]
TIES_INPUTS = [()] * 24 + [(2 * k, 2 * k + 1) for k in range(12)]

_STANDALONE = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location('s', {path!r})
m = sys.modules['s'] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
b = m.agenda_schedule(['a', 'a'], [(), (0,)])
assert [x.nodes for x in b] == [(0,), (1,)], b
b = m.depth_schedule(['a', 'a'], [(), (0,)])
assert [x.nodes for x in b] == [(0,), (1,)], b
assert list(m.needed([(), (0,), ()], 0, [1])) == [1, 1, 0]
assert 'torch' not in sys.modules
sigs, inputs = {sigs!r}, {inputs!r}
print(repr([[(b.signature, b.nodes) for b in m.schedule(s, sigs, inputs)]
            for s in m.STRATEGIES]))
"""


def test_schedule_runs_without_torch_and_the_same_under_any_hash_seed():
    # Load schedule.py on its own in fresh interpreters: it must not pull torch in, and it
    # must give the same schedules whatever the hash seed (strings hash differently).
    code = _STANDALONE.format(path=schedule_mod.__file__, sigs=TIES_SIGS, inputs=TIES_INPUTS)
    outs = []
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                              capture_output=True, text=True)
        outs.append(done.stdout)
    here = repr([[(b.signature, b.nodes) for b in schedule(s, TIES_SIGS, TIES_INPUTS)]
                 for s in STRATEGIES])
    assert outs == [here + "\n"] * 3
    # and what that order is: first seen (recording order), both strategies
    order = [f"s{k}" for k in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)]
    for strategy in STRATEGIES:
        got = schedule(strategy, TIES_SIGS, TIES_INPUTS)
        assert [b.signature for b in got] == order * 2, strategy
        assert [b.nodes for b in got[:12]] == [(2 * k, 2 * k + 1) for k in range(12)]
        assert [b.nodes for b in got[12:]] == [(24 + k,) for k in range(12)]


def test_batch_is_frozen_data():
    b = Batch("sig", (1, 2))
    assert b == Batch("sig", (1, 2))
    assert b != Batch("sig", (2, 1))
    with pytest.raises(Exception):
        b.nodes = (3,)  # type: ignore[misc]


# -- literal graphs ------------------------------------------------------------------------

# Two binary trees: (l0 l1) and (l3 (l4 l5)).
TREES_SIGS = ["leaf", "leaf", "node", "leaf", "leaf", "leaf", "node", "node"]
TREES_INPUTS = [(), (), (0, 1), (), (), (), (4, 5), (3, 6)]


def test_literal_trees_depth():
    got = depth_schedule(TREES_SIGS, TREES_INPUTS)
    assert as_lists(got) == [("leaf", [0, 1, 3, 4, 5]), ("node", [2, 6]), ("node", [7])]
    assert all(type(b) is Batch for b in got)


def test_literal_trees_agenda():
    got = agenda_schedule(TREES_SIGS, TREES_INPUTS)
    assert as_lists(got) == [("leaf", [0, 1, 3, 4, 5]), ("node", [2, 6]), ("node", [7])]


# Two signatures at the same depth: depth keeps first-recorded order within a depth.
MIXED_SIGS = ["x", "y", "x", "f", "g", "f", "g"]
MIXED_INPUTS = [(), (), (), (0,), (1,), (2,), (3, 5)]


def test_literal_mixed_depth():
    got = depth_schedule(MIXED_SIGS, MIXED_INPUTS)
    assert as_lists(got) == [("x", [0, 2]), ("y", [1]), ("f", [3, 5]), ("g", [4]),
                             ("g", [6])]


def test_literal_mixed_agenda():
    # Heights (longest chain of users below): x0, x2: 2; y1, f3, f5: 1; g4, g6: 0.
    # Sources: x:[0, 2] (top height 2) beats y:[1] (1). Then f:[3, 5] and y:[1] tie on
    # height 1 -> the larger group, f; that makes 6 ready; y (1) beats g:[6] (0); y
    # releases 4, joining 6 in one g group.
    got = agenda_schedule(MIXED_SIGS, MIXED_INPUTS)
    assert as_lists(got) == [("x", [0, 2]), ("f", [3, 5]), ("y", [1]), ("g", [6, 4])]


# A chain of cells, each with a loss on the side, summed at the end: the lowest-depth rule
# would run the losses once per cell (they are always the shallowest ready nodes); the
# critical path runs every cell first and all the losses in one batch.
LOSS_SIGS = ["cell", "loss", "cell", "loss", "cell", "loss", "sum"]
LOSS_INPUTS = [(), (0,), (0,), (2,), (2,), (4,), (1, 3, 5)]


def test_agenda_runs_side_losses_once_after_the_chain():
    got = agenda_schedule(LOSS_SIGS, LOSS_INPUTS)
    assert as_lists(got) == [("cell", [0]), ("cell", [2]), ("cell", [4]),
                             ("loss", [1, 3, 5]), ("sum", [6])]
    # by depth, one loss batch per cell
    got = depth_schedule(LOSS_SIGS, LOSS_INPUTS)
    assert as_lists(got) == [("cell", [0]), ("loss", [1]), ("cell", [2]), ("loss", [3]),
                             ("cell", [4]), ("loss", [5]), ("sum", [6])]


def _trees_with_losses(shapes):
    """Trees (nested pairs; None is a leaf) recorded in post-order, a loss on every node
    right after it, and one sum of all the losses at the end."""
    sigs, inputs, losses = [], [], []

    def record(tree):
        if tree is None:
            sigs.append("leaf")
            inputs.append(())
        else:
            left, right = record(tree[0]), record(tree[1])
            sigs.append("node")
            inputs.append((left, right))
        me = len(sigs) - 1
        sigs.append("loss")
        inputs.append((me,))
        losses.append(len(sigs) - 1)
        return me

    for shape in shapes:
        record(shape)
    sigs.append("sum")
    inputs.append(tuple(losses))
    return sigs, inputs, losses


def test_agenda_runs_per_node_losses_of_trees_in_one_batch_at_the_end():
    # Three trees of different shapes (depths 3, 1, 4), a loss on every node.
    shapes = [((None, None), (None, (None, None))), (None, None),
              ((((None, None), None), None), None)]
    sigs, inputs, losses = _trees_with_losses(shapes)
    a = agenda_schedule(sigs, inputs)
    check_valid(a, sigs, inputs)
    assert [b.signature for b in a].count("loss") == 1
    # (in the order the nodes made them ready)
    assert [(b.signature, sorted(b.nodes)) for b in a[-2:]] == \
        [("loss", losses), ("sum", [len(sigs) - 1])]
    # every leaf in one batch, then one batch per tree level: 4 levels of "node"
    assert [b.signature for b in a] == ["leaf"] + ["node"] * 4 + ["loss", "sum"]
    d = depth_schedule(sigs, inputs)
    check_valid(d, sigs, inputs)
    assert [b.signature for b in d].count("loss") == 5      # one per depth 0..4


# Same-signature chains of different lengths across examples: examples 0 and 1 are
# k -> c -> a, example 2 is k -> a. By depth, example 2's `a` (depth 1) and the others'
# `a` (depth 2) land in different batches; the agenda runs the ready group `c` first (it
# has a path ahead, the ready `a` has none), so all three `a` run together.
CHAINS_SIGS = ["k", "c", "a", "k", "c", "a", "k", "a"]
CHAINS_INPUTS = [(), (0,), (1,), (), (3,), (4,), (), (6,)]


def test_agenda_beats_depth_on_chains_of_different_lengths():
    d = depth_schedule(CHAINS_SIGS, CHAINS_INPUTS)
    a = agenda_schedule(CHAINS_SIGS, CHAINS_INPUTS)
    assert as_lists(d) == [("k", [0, 3, 6]), ("c", [1, 4]), ("a", [7]), ("a", [2, 5])]
    assert as_lists(a) == [("k", [0, 3, 6]), ("c", [1, 4]), ("a", [7, 2, 5])]
    assert len(a) < len(d)


def test_agenda_beats_depth_whatever_the_example_order():
    # The same three examples, the short one recorded first: the result must not hinge on
    # first-recorded order, since the heights decide.
    sigs = ["k", "a", "k", "c", "a", "k", "c", "a"]
    inputs = [(), (0,), (), (2,), (3,), (), (5,), (6,)]
    a = agenda_schedule(sigs, inputs)
    assert as_lists(a) == [("k", [0, 2, 5]), ("c", [3, 6]), ("a", [1, 4, 7])]
    assert len(depth_schedule(sigs, inputs)) == 4


def test_agenda_prefers_the_longest_path_ahead():
    # Ready sources a0, b1, a2; a0 feeds a chain of two more nodes, b1 feeds one.
    sigs = ["a", "b", "a", "c", "c", "d"]
    inputs = [(), (), (), (0,), (1,), (3,)]
    # Heights: a0 2, b1 1, a2 0 -> "a" first (both a's); then b1 and c3 tie (height 1,
    # one node each) -> the first seen, b; that releases c4 to join c3.
    got = agenda_schedule(sigs, inputs)
    assert as_lists(got) == [("a", [0, 2]), ("b", [1]), ("c", [3, 4]), ("d", [5])]


def test_agenda_longer_path_beats_larger_group():
    # Three ready "a" with nothing after them; one "b" with a user.
    got = agenda_schedule(["a", "a", "a", "b", "c"], [(), (), (), (), (3,)])
    assert as_lists(got) == [("b", [3]), ("a", [0, 1, 2]), ("c", [4])]


def test_agenda_ties_go_to_the_larger_group():
    got = agenda_schedule(["a", "b", "b"], [(), (), ()])
    assert as_lists(got) == [("b", [1, 2]), ("a", [0])]


def test_full_ties_go_to_the_first_seen():
    for strategy in STRATEGIES:
        got = schedule(strategy, ["a", "b"], [(), ()])
        assert as_lists(got) == [("a", [0]), ("b", [1])], strategy
        got = schedule(strategy, ["b", "a"], [(), ()])
        assert as_lists(got) == [("b", [0]), ("a", [1])], strategy


def test_waits_for_every_input_and_duplicates():
    # Node 2 reads node 0 twice and node 1 once; it runs only after both. Node 1 ("y") is
    # at depth 1, so by depth node 2 is at depth 2, not 1.
    sigs = ["x", "y", "z", "z"]
    inputs = [(), (0,), (0, 0, 1), (0, 0)]
    for strategy in STRATEGIES:
        got = schedule(strategy, sigs, inputs)
        check_valid(got, sigs, inputs)
        assert as_lists(got)[:2] == [("x", [0]), ("y", [1])], strategy
    # agenda: z3 (ready after x, height 0) waits for y (height 1); y releases z2 to join it
    assert as_lists(agenda_schedule(sigs, inputs)) == [("x", [0]), ("y", [1]), ("z", [3, 2])]
    assert as_lists(depth_schedule(sigs, inputs)) == [("x", [0]), ("y", [1]), ("z", [3]),
                                                      ("z", [2])]


def test_empty_graph():
    for strategy in STRATEGIES:
        assert schedule(strategy, [], []) == []
        assert schedule(strategy, [], [], 7, []) == []
    assert needed([], 0, []) == bytearray()


def test_offset_ignores_already_executed_inputs_and_constants():
    # A second execution of a run: nodes 10..13 pending, 0..9 already executed, and
    # constants (negative ids). Local node 0 reads executed node 3 and a constant; node 1
    # reads local 0 (=10) and executed 7; node 2 reads executed 2; node 3 reads 2 and 1.
    offset = 10
    sigs = ["f", "g", "f", "g"]
    inputs = [(3, -1), (10, 7), (2,), (12, 11, -2)]
    d = depth_schedule(sigs, inputs, offset)
    a = agenda_schedule(sigs, inputs, offset)
    # depths from the pending nodes only: 0, 1, 0, 2 (executed inputs count as sources)
    assert as_lists(d) == [("f", [0, 2]), ("g", [1]), ("g", [3])]
    # agenda: ready f:[0, 2] -> run both; then g:[1] (11 done); then g:[3].
    assert as_lists(a) == [("f", [0, 2]), ("g", [1]), ("g", [3])]
    for batches in (d, a):
        check_valid(batches, sigs, inputs, offset)
    # every input below the offset: every node a source, at depth 0
    assert as_lists(schedule("depth", sigs, [(3,), (7,), (2,), (9,)], offset)) == \
        [("f", [0, 2]), ("g", [1, 3])]


def test_offset_zero_default_equals_explicit():
    for fn in (agenda_schedule, depth_schedule):
        assert fn(TREES_SIGS, TREES_INPUTS) == fn(TREES_SIGS, TREES_INPUTS, 0) == \
            fn(TREES_SIGS, TREES_INPUTS, 0, None)


def test_inputs_may_be_read_once_from_a_generator():
    for fn in (agenda_schedule, depth_schedule):
        for targets in (None, [len(TREES_SIGS) - 1]):
            assert fn(TREES_SIGS, (ins for ins in TREES_INPUTS), 0, targets) == \
                fn(TREES_SIGS, TREES_INPUTS, 0, targets)


def test_given_numbers_the_batches_hold_those_int_objects():
    """NOTE [schedule memory]: a long chain's batches hold the int objects given (made
    here, above the interpreter's small-int cache), not ints of their own."""
    n = 600
    numbers = [int(str(k)) for k in range(n)]
    sigs = ["a" if k % 2 else "b" for k in range(n)]
    inputs = [()] + [(k - 1,) for k in range(1, n)]
    for fn in (agenda_schedule, depth_schedule):
        batches = fn(sigs, inputs, 0, None, numbers)
        assert batches == fn(sigs, inputs)
        assert all(i is numbers[i] for b in batches for i in b.nodes)


def test_agenda_rejects_a_cycle():
    with pytest.raises(ValueError, match="cycle"):
        agenda_schedule(["a", "b"], [(1,), (0,)])
    # a cycle behind a source, and one a target needs
    with pytest.raises(ValueError, match="cycle"):
        agenda_schedule(["a", "b", "c"], [(), (0, 2), (1,)])
    with pytest.raises(ValueError, match="cycle"):
        agenda_schedule(["a", "b", "c"], [(), (0, 2), (1,)], 0, [2])
    with pytest.raises(ValueError, match="cycle"):
        schedule("agenda", ["a", "b"], [(1,), (0,)])


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        schedule("breadth", ["a"], [()])


def test_schedule_dispatches():
    for args in ((), (0, [2, 7]), (3, None)):
        assert schedule("depth", CHAINS_SIGS, CHAINS_INPUTS, *args) == \
            depth_schedule(CHAINS_SIGS, CHAINS_INPUTS, *args)
        assert schedule("agenda", CHAINS_SIGS, CHAINS_INPUTS, *args) == \
            agenda_schedule(CHAINS_SIGS, CHAINS_INPUTS, *args)
    # the two really differ here, so the dispatch is seen
    assert schedule("depth", CHAINS_SIGS, CHAINS_INPUTS) != \
        schedule("agenda", CHAINS_SIGS, CHAINS_INPUTS)
    assert schedule("depth", CHAINS_SIGS, CHAINS_INPUTS, offset=0, targets=[2]) == \
        depth_schedule(CHAINS_SIGS, CHAINS_INPUTS, 0, [2])


def test_targets_leave_dead_nodes_out():
    # 0 -> 1 (the target), 0 -> 2 (dead): the dead node is not scheduled, not even in the
    # batch of its live twin (NOTE [dead code]).
    for strategy in STRATEGIES:
        got = schedule(strategy, ["x", "y", "y"], [(), (0,), (0,)], 0, [1])
        assert as_lists(got) == [("x", [0]), ("y", [1])], strategy
        got = schedule(strategy, ["x", "y", "y"], [(), (0,), (0,)], 0, [])
        assert got == [], strategy
        got = schedule(strategy, ["x", "y", "y"], [(), (0,), (0,)], 0, [2, 1, 2])
        assert as_lists(got) == [("x", [0]), ("y", [1, 2])], strategy


def test_dead_nodes_do_not_lengthen_the_agendas_critical_path():
    # a0 and b1 are ready; a0 heads a dead chain c2 -> c3 -> c4 (height 3 with it) and
    # feeds the target d6 (live height 1); b1 feeds it through e5 (height 2). Counting the
    # dead chain, "a" would go first; the live heights put b first.
    sigs = ["a", "b", "c", "c", "c", "e", "d"]
    inputs = [(), (), (0,), (2,), (3,), (1,), (5, 0)]
    got = agenda_schedule(sigs, inputs, 0, [6])
    assert as_lists(got) == [("b", [1]), ("a", [0]), ("e", [5]), ("d", [6])]
    got = agenda_schedule(sigs, inputs)
    assert as_lists(got)[:2] == [("a", [0]), ("b", [1])]
    # The same where the dead chain hangs off a target with no other user: a0 and e4 are
    # the targets, a0's one user c2 is dead, so a0's height is 0 and b1 (1) goes first.
    sigs = ["a", "b", "c", "c", "e"]
    inputs = [(), (), (0,), (2,), (1,)]
    got = agenda_schedule(sigs, inputs, 0, [0, 4])
    assert as_lists(got) == [("b", [1]), ("a", [0]), ("e", [4])]
    got = agenda_schedule(sigs, inputs)
    assert as_lists(got)[0] == ("a", [0])


def test_needed():
    # 0 -> 1 -> 3 (target), 2 dead, 4 reads 3 but is not a target; numbers below the
    # offset (executed, constants) are ignored
    inputs = [(5, -1), (10,), (10,), (11, 4), (13,)]
    assert list(needed(inputs, 10, [3])) == [1, 1, 0, 1, 0]
    assert list(needed(inputs, 10, [4])) == [1, 1, 0, 1, 1]
    assert list(needed(inputs, 10, [2, 0])) == [1, 0, 1, 0, 0]
    assert list(needed(inputs, 10, [])) == [0] * 5
    assert type(needed(inputs, 10, [3])) is bytearray


# -- properties over random DAGs -----------------------------------------------------------

@st.composite
def dags(draw):
    """(sigs, inputs, offset): up to 40 nodes of up to 4 signatures, each reading up to 3
    earlier nodes (repeats likely), and maybe executed nodes or constants."""
    n = draw(st.integers(0, 40))
    offset = draw(st.sampled_from([0, 0, 5]))
    alphabet = draw(st.integers(1, 4))
    sigs = [draw(st.sampled_from("abcd"[:alphabet])) for _ in range(n)]
    inputs = []
    for i in range(n):
        k = draw(st.integers(0, min(3, i)))
        ins = [draw(st.integers(0, i - 1)) + offset for _ in range(k)]
        if offset and draw(st.booleans()):
            ins.append(draw(st.integers(0, offset - 1)))     # an already-executed input
        if draw(st.integers(0, 4)) == 0:
            ins.append(draw(st.integers(-3, -1)))            # a constant
        ins = draw(st.permutations(ins)) if len(ins) > 1 else ins
        inputs.append(tuple(ins))
    return sigs, inputs, offset


def maybe_targets(n):
    return st.one_of(st.none(), st.lists(st.integers(0, n - 1), max_size=4)) if n \
        else st.just(None)


@settings(max_examples=60, deadline=None)
@given(dags())
def test_depth_schedule_properties(graph):
    sigs, inputs, offset = graph
    batches = depth_schedule(sigs, inputs, offset)
    check_valid(batches, sigs, inputs, offset)
    depths = depths_of(inputs, offset)
    # one depth per batch, shallow first, one batch per (depth, signature), its nodes in
    # recording order
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
        assert list(b.nodes) == sorted(b.nodes)
    if sigs:
        assert len(batches) <= (max(depths) + 1) * len(set(sigs))


def agenda_replay(batches, sigs, inputs, offset, live):
    """Each batch is ALL the ready (live) nodes of its signature, and that group has the
    largest (height of its highest node, size) among the ready groups, with heights over
    live users only."""
    n = len(sigs)
    height = [0] * n
    for i in reversed(range(n)):
        if live[i]:
            for j in inputs[i]:
                if j - offset >= 0:
                    height[j - offset] = max(height[j - offset], height[i] + 1)
    done: set[int] = set()
    for b in batches:
        ready: dict = {}
        for i in range(n):
            if live[i] and i not in done and \
                    all(j - offset < 0 or j - offset in done for j in inputs[i]):
                ready.setdefault(sigs[i], []).append(i)
        assert sorted(b.nodes) == sorted(ready[b.signature])
        key = {s: (max(height[i] for i in m), len(m)) for s, m in ready.items()}
        assert key[b.signature] == max(key.values())
        done.update(b.nodes)


@settings(max_examples=60, deadline=None)
@given(dags())
def test_agenda_schedule_properties(graph):
    sigs, inputs, offset = graph
    batches = agenda_schedule(sigs, inputs, offset)
    check_valid(batches, sigs, inputs, offset)
    agenda_replay(batches, sigs, inputs, offset, [1] * len(sigs))
    # Never more batches than nodes, and never fewer than the number of signatures.
    assert len(batches) <= len(sigs)
    assert len(batches) >= len(set(sigs))


@settings(max_examples=60, deadline=None)
@given(dags(), st.data())
def test_targets_schedule_exactly_what_they_need(graph, data):
    sigs, inputs, offset = graph
    n = len(sigs)
    targets = data.draw(st.lists(st.integers(0, n - 1), max_size=4)) if n else []
    want = ancestors(inputs, offset, targets)
    assert [i for i, x in enumerate(needed(inputs, offset, targets)) if x] == sorted(want)
    for strategy in STRATEGIES:
        batches = schedule(strategy, sigs, inputs, offset, iter(targets))
        check_valid(batches, sigs, inputs, offset, want)
    # depth: still one batch per (depth, signature) among the needed nodes
    depths = depths_of(inputs, offset)
    batches = depth_schedule(sigs, inputs, offset, targets)
    keys = [(depths[b.nodes[0]], b.signature) for b in batches]
    assert len(set(keys)) == len(keys) and keys == sorted(keys, key=lambda k: k[0])
    assert all(len({depths[i] for i in b.nodes}) == 1 for b in batches)
    if want:
        assert len(batches) <= (max(depths[i] for i in want) + 1) * \
            len({sigs[i] for i in want})
    # agenda: the critical path over what is needed only
    batches = agenda_schedule(sigs, inputs, offset, targets)
    agenda_replay(batches, sigs, inputs, offset, [i in want for i in range(n)])


@settings(max_examples=60, deadline=None)
@given(dags(), st.data())
def test_offset_constants_and_duplicates_change_nothing(graph, data):
    # The graph with the numbers below the offset dropped, the rest renumbered from 0 and
    # every input read once, in some order, schedules the same, whatever the strategy;
    # so does reading every input twice. Run twice: the same (deterministic).
    sigs, inputs, offset = graph
    n = len(sigs)
    targets = data.draw(maybe_targets(n))
    plain = []
    for ins in inputs:
        local = sorted({j - offset for j in ins if j >= offset})
        plain.append(tuple(data.draw(st.permutations(local))) if len(local) > 1
                     else tuple(local))
    doubled = [ins + ins for ins in inputs]
    for strategy in STRATEGIES:
        got = schedule(strategy, sigs, inputs, offset, targets)
        assert got == schedule(strategy, sigs, plain, 0, targets), strategy
        assert got == schedule(strategy, sigs, doubled, offset, targets), strategy
        assert got == schedule(strategy, list(sigs), list(inputs), offset, targets), strategy


# -- the agenda against a plain reference ---------------------------------------------------

def agenda_reference(signatures, inputs, offset=0, targets=None):
    """The agenda written as plainly as it can be (lists of users, a max over the ready
    signatures): the oracle for schedule.py's leaner loop, which must give the same
    batches, in the same order, with their nodes in the same order."""
    n = len(signatures)
    inputs = [[j - offset for j in ins if j - offset >= 0] for ins in inputs]
    users = [[] for _ in range(n)]
    for i, ins in enumerate(inputs):
        for j in ins:
            users[j].append(i)
    live = [targets is None] * n
    for t in targets or ():
        live[t] = True
    height = [0] * n
    for i in range(n - 1, -1, -1):
        for u in users[i]:
            if live[u]:
                height[i] = max(height[i], height[u] + 1)
                live[i] = True
    waiting = [len(ins) for ins in inputs]
    ready, top, batches = {}, {}, []
    released = [i for i in range(n) if not inputs[i] and live[i]]
    while True:
        for u in released:
            ready.setdefault(signatures[u], []).append(u)
            top[signatures[u]] = max(top.get(signatures[u], -1), height[u])
        if not ready:
            return batches
        best = max(ready, key=lambda s: (top[s], len(ready[s])))   # max keeps the first
        members = ready.pop(best)
        del top[best]
        batches.append((best, members))
        released = []
        for i in members:
            for u in users[i]:
                waiting[u] -= 1
                if waiting[u] == 0 and live[u]:
                    released.append(u)


@settings(max_examples=150, deadline=None)
@given(dags(), st.data())
def test_agenda_equals_the_plain_reference(graph, data):
    sigs, inputs, offset = graph
    targets = data.draw(maybe_targets(len(sigs)))
    got = agenda_schedule(sigs, inputs, offset, targets)
    assert as_lists(got) == agenda_reference(sigs, inputs, offset, targets)


def test_agenda_equals_the_loop_on_wide_trees():
    # 40 binary trees of 3 signatures (leaf, node, loss on every node), nodes interleaved
    # across trees as a minibatch records them: many nodes per batch, many ties
    import random
    rng = random.Random(3)
    sigs, inputs = [], []

    def tree(depth):
        if depth == 0 or rng.random() < 0.3:
            sigs.append("leaf")
            inputs.append(())
        else:
            left, right = tree(depth - 1), tree(depth - 1)
            sigs.append("node")
            inputs.append((left, right))
        me = len(sigs) - 1
        sigs.append("loss")
        inputs.append((me,))
        return me

    for _ in range(40):
        tree(rng.randint(0, 7))
    got = agenda_schedule(sigs, inputs)
    assert as_lists(got) == agenda_reference(sigs, inputs)
    assert len(got) < 20 < len(sigs) // 20
    losses = [n for n in range(len(sigs)) if sigs[n] == "loss"]
    assert as_lists(agenda_schedule(sigs, inputs, 0, losses[::3])) == \
        agenda_reference(sigs, inputs, 0, losses[::3])
