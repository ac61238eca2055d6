"""Plans (plan.py, gather.py, refs.py): a schedule made executable as plain data.

A plan made ahead (``ahead.plan_ahead``) and executed (``ahead.run_plan``) gives what
``@db.batched`` gives, values and gradients; pickled with ``refs.dumps`` it names the
model's parameters by path, so it runs against the live weights of another process, a
fresh interpreter included. Gathers follow NOTE [row order] and NOTE [detached rows];
store entries are freed once nothing reads them.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch import ahead, execute, profile, refs
from dynbatch.errors import PlanError
from dynbatch.plan import Index, Joined, Plan, Slice, Stacked, Step, Values

ROOT = Path(__file__).resolve().parents[1]
VOCAB, DIM, CLASSES = 12, 6, 3


@dataclass(eq=False)
class Tree:
    label: int
    word: int = 0
    children: tuple = ()


def random_tree(rng: random.Random, leaves: int) -> Tree:
    if leaves == 1:
        return Tree(rng.randrange(CLASSES), rng.randrange(VOCAB))
    k = rng.randint(1, leaves - 1)
    return Tree(rng.randrange(CLASSES), 0, (random_tree(rng, k), random_tree(rng, leaves - k)))


def trees(n: int = 6, seed: int = 0) -> list[Tree]:
    rng = random.Random(seed)
    return [random_tree(rng, rng.randint(1, 7)) for _ in range(n)]


class TreeRNN(nn.Module):
    """A binary tree RNN written for one tree; ``blocks`` marks its cell a block."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.cell = nn.Linear(2 * DIM, DIM)
        self.out = nn.Linear(DIM, CLASSES)

    def combine(self, left, right):
        return torch.tanh(self.cell(torch.cat([left, right])))

    def encode(self, tree: Tree, combine):
        if not tree.children:
            return self.embed(torch.tensor(tree.word))
        left, right = (self.encode(c, combine) for c in tree.children)
        return combine(self, left, right)

    def forward(self, tree: Tree, combine=None):
        h = self.encode(tree, combine or TreeRNN.combine)
        return F.cross_entropy(self.out(h), torch.tensor(tree.label))


@db.block
def block_combine(model: TreeRNN, left, right):
    return torch.tanh(model.cell(torch.cat([left, right])))


def loss(tree, model):
    return model(tree)


def block_loss(tree, model):
    return model(tree, block_combine)


FNS = {"per-op": loss, "blocks": block_loss}


def model_of(seed: int = 0) -> TreeRNN:
    torch.manual_seed(seed)
    return TreeRNN().double()


def grads(model) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def results_and_grads(compute, model):
    model.zero_grad(set_to_none=True)
    outs = compute()
    torch.stack(outs).sum().backward()
    return [o.detach() for o in outs], grads(model)


def assert_same(a, b):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] is None) == (grads_b[name] is None), name
        if grads_a[name] is not None:
            torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", FNS)
def test_plan_made_ahead_runs_as_batched(impl):
    fn, model, examples = FNS[impl], model_of(), trees()
    the_plan = ahead.plan_ahead(fn, examples, (model,))
    planned = results_and_grads(lambda: ahead.run_plan(the_plan), model)
    batched = results_and_grads(lambda: db.batched(fn)(examples, model), model)
    eager = results_and_grads(lambda: [fn(t, model) for t in examples], model)
    assert_same(planned, eager)
    assert_same(batched, eager)
    nodes = db.stats().nodes
    assert len(the_plan.steps) < nodes / 2, "the plan batches"


def test_a_plan_is_plain_data():
    the_plan = ahead.plan_ahead(loss, trees(), (model_of(),))
    assert type(the_plan) is Plan and the_plan.results is not None
    specs = (Slice, Index, Values, Stacked, Joined)
    for step in the_plan.steps:
        assert type(step) is Step
        assert all(type(i) is int for i in step.nodes) and all(type(i) is int for i in
                                                                step.frees)
        for spec, inputs in step.gathers:
            assert type(spec) in specs and all(type(k) is int for k in inputs)
        assert step.sig.source is not None, "every signature can be made again"


def test_a_pickled_plan_reads_the_live_weights():
    """Parameters pickle by path: a plan loaded after an optimizer step computes with the
    new weights, as a plan made in a DataLoader worker must."""
    model, examples = model_of(), trees()
    data = refs.dumps(ahead.plan_ahead(loss, examples, (model,)), (model,))
    assert not any(p.detach().numpy().tobytes() in data for p in model.parameters()), \
        "no parameter's values are in the pickle"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    loaded = ahead.load_plan(data, (model,))
    assert_same(results_and_grads(lambda: ahead.run_plan(loaded), model),
                results_and_grads(lambda: [loss(t, model) for t in examples], model))


def test_a_plan_without_its_arguments_is_refused():
    model = model_of()
    data = refs.dumps(ahead.plan_ahead(loss, trees(), (model,)), (model,))
    with pytest.raises(PlanError, match="argument 0"):
        ahead.load_plan(data, ())
    with pytest.raises(PlanError, match="argument 0 module 'embed'"):
        ahead.load_plan(data, (nn.Linear(2, 2),))


CHILD = """
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from dynbatch import ahead
import test_plan as T
model = T.model_of()
model.load_state_dict(torch.load(sys.argv[1]))
answers = {{}}
for impl in T.FNS:
    with open(f"{{sys.argv[2]}}.{{impl}}", "rb") as f:
        the_plan = ahead.load_plan(f.read(), (model,))
    answers[impl] = T.results_and_grads(lambda: ahead.run_plan(the_plan), model)
torch.save(answers, sys.argv[3])
"""


def test_a_plan_pickles_and_runs_in_a_fresh_interpreter(tmp_path):
    """Per-op and block plans, made here, run in a new Python process given the same
    arguments (a model with these weights): the results and gradients of eager code."""
    model, examples = model_of(seed=3), trees(seed=3)
    with torch.no_grad():                   # weights the child cannot make from a seed
        model.cell.weight.mul_(0.5)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    for impl, fn in FNS.items():
        the_plan = ahead.plan_ahead(fn, examples, (model,))
        (tmp_path / f"plan.{impl}").write_bytes(refs.dumps(the_plan, (model,)))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "weights.pt"),
                           str(tmp_path / "plan"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = torch.load(tmp_path / "out.pt")
    assert sorted(answers) == sorted(FNS)
    for impl, fn in FNS.items():
        eager = results_and_grads(lambda fn=fn: [fn(t, model) for t in examples], model)
        assert_same(answers[impl], eager)


# -- gathers and frees ----------------------------------------------------------------------

def chains(lengths):
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(DIM, generator=g, dtype=torch.float64) for _ in range(n)]
            for n in lengths]


def rnn(xs, cell):
    h = torch.zeros(DIM, dtype=torch.float64)
    for x in xs:
        h = torch.tanh(cell(torch.cat([x, h])))
    return h.sum()


def test_rows_in_order_are_sliced_not_copied():
    """NOTE [row order]: an RNN over equal-length sequences reads each step's h from the
    rows of the previous batch, in order: every gather of a node output is a slice."""
    torch.manual_seed(0)
    cell = nn.Linear(2 * DIM, DIM).double()
    the_plan = ahead.plan_ahead(rnn, chains([5] * 6), (cell,))
    kinds = [type(spec) for step in the_plan.steps for spec, _ in step.gathers]
    assert Slice in kinds and Index not in kinds and Joined not in kinds, kinds


def test_ragged_rows_are_gathered_and_exact():
    torch.manual_seed(0)
    cell = nn.Linear(2 * DIM, DIM).double()
    examples = chains([5, 1, 3, 7, 2, 5])
    the_plan = ahead.plan_ahead(rnn, examples, (cell,))
    kinds = {type(spec) for step in the_plan.steps for spec, _ in step.gathers}
    assert kinds & {Index, Joined}, kinds
    outs, _ = results_and_grads(lambda: ahead.run_plan(the_plan), cell)
    eager, _ = results_and_grads(lambda: [rnn(xs, cell) for xs in examples], cell)
    assert_same((outs, {}), (eager, {}))


def test_rows_no_target_needs_through_gradients_are_detached():
    """NOTE [detached rows]: a value read only by argmax shares a batch with values that
    need gradients; its rows pass none, so a parameter used only through it keeps
    ``grad is None``, as in eager code."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(DIM, DIM), "b": nn.Linear(DIM, DIM)}).double()

    def fn(x, m):
        picked = m["b"](x).argmax()                    # b: reached only through argmax
        return m["a"](x).sum() + picked.double()

    examples = [torch.randn(DIM, dtype=torch.float64) for _ in range(4)]
    the_plan = ahead.plan_ahead(fn, examples, (model,))
    assert_same(results_and_grads(lambda: ahead.run_plan(the_plan), model),
                results_and_grads(lambda: [fn(x, model) for x in examples], model))
    assert all(p.grad is None for p in model["b"].parameters())


def test_store_entries_are_freed_once_read():
    torch.manual_seed(0)
    cell = nn.Linear(2 * DIM, DIM).double()
    the_plan = ahead.plan_ahead(rnn, chains([4, 6, 2, 6]), (cell,))
    store: list = []
    execute.execute(the_plan, store, profile.Stats(), lambda i, order=False: i)
    kept = {place[1] for _, places in the_plan.results for place in places
            if place[0] == "row"}
    assert len(store) == len(the_plan.steps)
    left = {k for k, entry in enumerate(store) if entry is not None}
    assert left == kept, "only the entries the results read outlive the plan"


def test_run_plan_stats_count_batches():
    the_plan = ahead.plan_ahead(loss, trees(), (model_of(),))
    stats = profile.Stats()
    ahead.run_plan(the_plan, stats)
    assert stats.batches == len(the_plan.steps) and stats.fallbacks == 0
