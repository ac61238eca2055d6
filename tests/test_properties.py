"""Random programs: hypothesis draws a DAG of steps ``(op, input indices < i)`` over ~40
ops built from more than 25 torch callables, with a random width D; the program is applied
recursively over randomly drawn binary trees, so each example's graph differs. Every case
checks the eager-equivalence oracle (outputs and parameter gradients, float64, atol 1e-8)
under both strategies, in STRICT mode so nothing silently runs one example at a time.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dynbatch as db
from dynbatch.lazy import current
from dynbatch.testing import assert_matches_eager

ATOL, RTOL = 1e-8, 1e-6
WORDS = 8


def _factor(d: int) -> tuple[int, int]:
    for a in range(2, d):
        if d % a == 0:
            return a, d // a
    return 1, d


def _glu(x, y):
    a, g = torch.cat([x, y]).chunk(2)
    return a * torch.sigmoid(g)


def _unbind(x, y):
    a, b = torch.stack([x, y], 1).unbind(1)
    return a * b


def _max_dim(P, x):
    a, b = _factor(x.shape[0])
    return torch.max(x.reshape(a, b), dim=1).values.sum() + x


def _reshape_t(P, x):
    a, b = _factor(x.shape[0])
    return x.reshape(a, b).t().reshape(-1)


# name -> (arity, fn(P, *inputs)); every input and output has shape [D]
OPS = {
    "tanh": (1, lambda P, x: torch.tanh(x)),
    "sigmoid": (1, lambda P, x: torch.sigmoid(x)),
    "relu": (1, lambda P, x: F.relu(x) - 0.1 * x),
    "gauss": (1, lambda P, x: torch.exp(-(x * x))),
    "sin": (1, lambda P, x: x.sin()),
    "sqrt_abs": (1, lambda P, x: torch.sqrt(x.abs() + 1.0)),
    "clamp": (1, lambda P, x: torch.clamp(x, -0.5, 0.5)),
    "softmax": (1, lambda P, x: F.softmax(x, dim=0)),
    "log_softmax": (1, lambda P, x: torch.log_softmax(x, -1)),
    "layer_norm": (1, lambda P, x: F.layer_norm(x, x.shape, P.ln_w, P.ln_b)),
    "linear": (1, lambda P, x: F.linear(x, P.W, P.b)),
    "matmul_shared_left": (1, lambda P, x: P.W @ x),
    "matmul_shared_right": (1, lambda P, x: torch.matmul(x, P.W)),
    "index_shared": (1, lambda P, x: x[P.flip]),
    "slices_cat": (1, lambda P, x: torch.cat([x[1:], x[:1]])),
    "reshape_t": (1, _reshape_t),
    "view_transpose": (1, lambda P, x: x.view(1, -1).transpose(0, 1).flatten()),
    "permute": (1, lambda P, x: x.reshape(1, -1, 1).permute(2, 0, 1).reshape(-1)),
    "expand_sum": (1, lambda P, x: x.unsqueeze(0).expand(3, -1).sum(dim=0) / 3),
    "cumsum": (1, lambda P, x: torch.cumsum(x, dim=0) / x.shape[0]),
    "embedding_argmax": (1, lambda P, x: x + F.embedding(x.argmax(), P.table)),
    "table_by_argmin": (1, lambda P, x: x * P.table[torch.argmin(x)]),
    "normalize": (1, lambda P, x: (x - x.mean()) / (x.std() + 1.0)),
    "logsumexp": (1, lambda P, x: x - torch.logsumexp(x, dim=0)),
    "amax": (1, lambda P, x: x / (x.abs().amax() + 1.0)),
    "max_dim": (1, _max_dim),
    "squeeze": (1, lambda P, x: x.unsqueeze(1).squeeze(1) * 2 - x),
    "rpow": (1, lambda P, x: 2.0 ** torch.tanh(x)),
    "rsub_rdiv": (1, lambda P, x: 1.0 - 1.0 / (2.0 + x * x)),
    "maximum_shared": (1, lambda P, x: torch.maximum(x, P.b)),
    "stack_shared": (1, lambda P, x: torch.stack([x, P.b]).sum(0)),
    "add": (2, lambda P, x, y: x + y),
    "sub_mul": (2, lambda P, x, y: (x - y) * y),
    "where": (2, lambda P, x, y: torch.where(x > y, x, y)),
    "cat_linear": (2, lambda P, x, y: F.linear(torch.cat([x, y]), P.W2)),
    "stack_mean": (2, lambda P, x, y: torch.stack([x, y]).mean(0)),
    "stack_logsumexp": (2, lambda P, x, y: torch.logsumexp(torch.stack([x, y], dim=1),
                                                           dim=1)),
    "outer_matmul": (2, lambda P, x, y: (x.unsqueeze(1) @ y.unsqueeze(0)) @ y / x.shape[0]),
    "dot_scale": (2, lambda P, x, y: x * (x @ y) / x.shape[0]),
    "glu_chunk": (2, lambda P, x, y: _glu(x, y)),
    "split": (2, lambda P, x, y: torch.split(torch.cat([x, y]), x.shape[0])[1] - x),
    "unbind": (2, lambda P, x, y: _unbind(x, y)),
    "mix_0d": (2, lambda P, x, y: x * y.sum() / x.shape[0]),
}


class Params(nn.Module):
    """The shared tensors a program may use, for width d."""

    def __init__(self, d: int):
        super().__init__()
        self.emb = nn.Embedding(WORDS, d)
        self.table = nn.Parameter(torch.randn(max(WORDS, d), d) * 0.5)
        self.W = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.W2 = nn.Parameter(torch.randn(d, 2 * d) / (2 * d) ** 0.5)
        self.b = nn.Parameter(torch.randn(d) * 0.1)
        self.ln_w = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.ln_b = nn.Parameter(0.1 * torch.randn(d))
        self.register_buffer("flip", torch.arange(d - 1, -1, -1))


class Tree:
    __slots__ = ("word", "children")

    def __init__(self, word, children=()):
        self.word = word
        self.children = children


def random_tree(rng: random.Random, leaves: int) -> Tree:
    if leaves == 1:
        return Tree(rng.randrange(WORDS))
    k = rng.randint(1, leaves - 1)
    return Tree(None, (random_tree(rng, k), random_tree(rng, leaves - k)))


def run_program(program, P, a, b):
    """The sum of the program's sinks (values no step reads), so no value is dead code: a
    dead value fused into a batch with live ones would be a different (gradient) question,
    tested in test_api.py."""
    values = [a, b]
    used = set()
    for name, ins in program:
        values.append(OPS[name][1](P, *(values[i] for i in ins)))
        used.update(ins)
    sinks = [v for i, v in enumerate(values) if i not in used]
    out = sinks[0]
    for v in sinks[1:]:
        out = out + v
    return out


def make_fn(program):
    def per_example(tree, P):
        def node(t):
            if not t.children:
                w = torch.tensor(t.word)
                a, b = P.emb(w), torch.tanh(P.table[w])
            else:
                a, b = node(t.children[0]), node(t.children[1])
            return torch.tanh(run_program(program, P, a, b))
        root = node(tree)
        return root, (root * root).sum()
    return per_example


def check(program, d, trees):
    P = Params(d)
    fn = make_fn(program)
    for strategy in ("agenda", "depth"):
        assert_matches_eager(fn, trees, P, atol=ATOL, rtol=RTOL, strategy=strategy)
        s = db.stats()
        assert s.fallbacks == 0, s
        assert s.batches < s.nodes, s


@st.composite
def programs(draw):
    n = draw(st.integers(1, 6))
    names = sorted(OPS)
    steps = []
    for i in range(n):
        name = draw(st.sampled_from(names))
        arity = OPS[name][0]
        ins = tuple(draw(st.integers(0, i + 1)) for _ in range(arity))
        steps.append((name, ins))
    return steps


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs(), d=st.integers(2, 6), seed=st.integers(0, 2 ** 16),
       n_trees=st.integers(2, 5))
def test_random_programs_over_random_trees(program, d, seed, n_trees, strict):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trees = [random_tree(rng, rng.randint(1, 5)) for _ in range(n_trees)]
    check(program, d, trees)


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_over_random_trees(name, strict):
    # hypothesis may not draw every op in 30 cases; each op also runs on its own
    torch.manual_seed(0)
    rng = random.Random(0)
    trees = [random_tree(rng, rng.randint(1, 4)) for _ in range(4)]
    arity = OPS[name][0]
    program = [(name, (0,) if arity == 1 else (0, 1)), ("tanh", (2,))]
    check(program, 6 if name != "reshape_t" else 4, trees)


def test_op_vocabulary_is_wide():
    # one program chaining every op once reaches more than 25 different torch callables
    used = set()
    fn = make_fn([(name, (i + 1,) * OPS[name][0]) for i, name in enumerate(OPS)])

    def spy(tree, P):
        out = fn(tree, P)
        used.update(n.sig.fn for n in current.tracer.graph.nodes)
        return out
    torch.manual_seed(0)
    db.batched(spy)([random_tree(random.Random(0), 3)], Params(4))
    assert len(used) >= 25, sorted(map(str, used))
