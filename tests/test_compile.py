"""torch.compile around dynbatch (api.py: entry points opaque to dynamo) and inside it
(blocks.py, codegen.py: ``db.block(..., compile=True)`` compiles a block's batched body).

The oracle is the per-example eager loop on the same weights, in float64 (conftest):
values, dtypes and every parameter gradient. Around dynbatch, dynamo must compile only the
user's code: no frame of dynbatch's engine is compiled, and minibatches of new sizes make
no recompilation (dynamo's recompile-limit warning, its recompile logs). Inside, a
compiled block is compiled once per signature for the process: later runs, other batch
sizes and plans made in a DataLoader worker reuse it.
"""
from __future__ import annotations

import collections
import logging
import os
import random
import shutil
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import dynbatch as db
from dynbatch.errors import ExecuteError, TraceError
from dynbatch.models import BinaryTreeLSTM
from dynbatch.testing import assert_close, assert_matches_eager

from test_models import CLASSES, DIM, VOCAB, random_binary_tree

dynamo = pytest.importorskip("torch._dynamo")
ATOL, RTOL = 1e-8, 1e-6
ENGINE = os.path.dirname(os.path.abspath(db.__file__))
SIZES = (16, 5, 7, 3, 9, 11, 2, 4, 13, 6)     # more sizes than dynamo's recompile limit


def trees(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [random_binary_tree(rng, rng.randint(1, 7)) for _ in range(n)]


def engine_file(filename: str) -> bool:
    """dynbatch's own code (not the reference models beside it)."""
    path = os.path.abspath(filename)
    return path.startswith(ENGINE + os.sep) and \
        not path.startswith(os.path.join(ENGINE, "models") + os.sep)


class DynamoWatch:
    """What dynamo did inside the block: the code objects it compiled, its log records and
    warnings (recompiles, graph-break warnings), and the frames it was asked to convert."""

    def __init__(self):
        self.compiled: list = []
        self.records: list[str] = []
        self.warnings: list[str] = []

    @property
    def frames(self) -> int:
        return dynamo.utils.counters["frames"]["total"]

    def recompiled(self) -> list[str]:
        return [m for m in self.records + self.warnings
                if "recompil" in m or "cache_size_limit" in m]


class _Records(logging.Handler):
    def __init__(self, out: list):
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record):
        self.out.append(record.getMessage())


@contextmanager
def watching_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    watch = DynamoWatch()
    handle = dynamo.convert_frame.register_bytecode_hook(
        lambda code, new_code: watch.compiled.append(code))
    handler = _Records(watch.records)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield watch
        watch.warnings = [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)
        handle.remove()


def assert_dynamo_kept_out(watch: DynamoWatch, max_frames: int) -> None:
    inside = [c for c in watch.compiled if engine_file(c.co_filename)]
    assert not inside, f"dynamo compiled dynbatch's frames: {inside}"
    assert not watch.recompiled(), watch.recompiled()
    # before the entry points were opaque, one call converted ~100 frames of the engine
    assert watch.frames <= max_frames, (watch.frames, watch.compiled)


def grads_of(model: nn.Module) -> list:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def eager_reference(model: nn.Module, batch: list, per_example):
    model.zero_grad()
    outs = [per_example(x) for x in batch]
    torch.stack(outs).sum().backward()
    return outs, grads_of(model)


def assert_grads_close(actual: list, expected: list) -> None:
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"grad {k}: present in one run only"
        if a is not None:
            assert_close(a, e, atol=ATOL, rtol=RTOL, where=f"grad of parameter {k}")


# -- around dynbatch: torch.compile(model) ---------------------------------------------------

class BatchedTreeLSTM(BinaryTreeLSTM):
    """A model whose forward is the batched per-example loss: ``model(trees)`` -> list."""

    @db.batched
    def forward(self, tree):
        return BinaryTreeLSTM.forward(self, tree)


def test_compiled_model_with_a_batched_forward_matches_eager():
    torch.manual_seed(0)
    model = BatchedTreeLSTM(VOCAB, DIM, DIM, CLASSES)
    compiled = torch.compile(model, backend="eager")
    with watching_dynamo() as watch:
        for k, n in enumerate(SIZES):
            batch = trees(n, seed=k)
            expected, expected_grads = eager_reference(
                model, batch, lambda t: BinaryTreeLSTM.forward(model, t))
            model.zero_grad()
            outs = compiled(batch)
            assert type(outs) is list and len(outs) == n
            torch.stack(outs).sum().backward()
            for i, (o, e) in enumerate(zip(outs, expected)):
                assert_close(o, e, atol=ATOL, rtol=RTOL, where=f"examples[{i}]")
            assert_grads_close(grads_of(model), expected_grads)
    assert db.stats().examples == SIZES[-1] and db.stats().fallbacks == 0
    assert_dynamo_kept_out(watch, max_frames=2)


class HeadOnBatched(BinaryTreeLSTM):
    """dynbatch inside, tensor code around it: what dynamo should compile."""

    @db.batched
    def roots(self, tree):
        return self.encode(tree)[0]

    def forward(self, batch):
        h = torch.stack(self.roots(batch))
        return torch.log_softmax(self.classifier(torch.tanh(h)) * 2.0, dim=-1)


def test_compiled_model_compiles_the_code_around_dynbatch():
    torch.manual_seed(1)
    model = HeadOnBatched(VOCAB, DIM, DIM, CLASSES)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with watching_dynamo() as watch:
        # one minibatch size: dynamo specializes the user's frame on the length of the
        # list it is given, a dynamo matter outside dynbatch (README: torch.compile)
        for seed in range(4):
            batch = trees(6, seed=10 + seed)
            expected, expected_grads = eager_reference(
                model, batch,
                lambda t: torch.log_softmax(
                    model.classifier(torch.tanh(model.encode(t)[0])) * 2.0, dim=-1))
            model.zero_grad()
            out = compiled(batch)
            out.sum().backward()
            assert_close(out, torch.stack(expected), atol=ATOL, rtol=RTOL, where="logits")
            assert_grads_close(grads_of(model), expected_grads)
    assert_dynamo_kept_out(watch, max_frames=4)
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op != "placeholder"]
    assert any("log_softmax" in op for op in ops), ops
    for gm in graphs:       # no graph holds a node recorded from the engine's code
        for n in gm.graph.nodes:
            trace = n.meta.get("stack_trace") or ""
            assert not any(engine_file(line.split('"')[1]) for line in trace.splitlines()
                           if line.strip().startswith('File "')), trace


def test_scope_and_force_inside_compiled_code():
    torch.manual_seed(2)
    lin = nn.Linear(3, 3)
    data = [[float(i), 1.0, -float(i)] for i in range(6)]

    def step(data):
        with db.autobatch():
            ys = [torch.tanh(lin(torch.tensor(v))) for v in data]
            first = db.force(ys[0])        # a value mid-scope: what is pending runs
            # forced in the scope: a lazy tensor read by compiled code would have dynamo
            # trace LazyTensor's own methods
            ys = db.force([y * first.sum() for y in ys])
        return torch.stack(ys).sum(0)

    compiled = torch.compile(step, backend="eager")
    with watching_dynamo() as watch:
        for n in (6, 3, 5, 2, 4, 1, 6, 3, 5, 2):
            expected = step(data[:n])
            got = compiled(data[:n])
            assert_close(got, expected, atol=ATOL, rtol=RTOL, where=f"{n} examples")
    assert_dynamo_kept_out(watch, max_frames=12)


# -- inside dynbatch: compiled blocks --------------------------------------------------------

def compiled_blocks(options):
    class CompiledBlocks(BinaryTreeLSTM):
        leaf = db.block(BinaryTreeLSTM.leaf, compile=options)
        node = db.block(BinaryTreeLSTM.node, compile=options)
        node_loss = db.block(BinaryTreeLSTM.node_loss, compile=options)
    return CompiledBlocks


AOT = {"backend": "aot_eager"}      # dynamo and AOT autograd, without a C++ compiler
AOTBlocks = compiled_blocks(AOT)


def tree_loss(tree, model):
    return model(tree)


def test_compiled_blocks_match_eager_across_runs_and_sizes():
    torch.manual_seed(3)
    model = AOTBlocks(VOCAB, DIM, DIM, CLASSES)
    with watching_dynamo() as watch:
        for k, n in enumerate(SIZES[:4]):
            assert_matches_eager(tree_loss, trees(n, seed=20 + k), model, atol=ATOL,
                                 rtol=RTOL)
            s = db.stats()
            assert s.fallbacks == 0, s
            hows = {r.name: r.how for r in s.rows()}
            assert {hows[f"BinaryTreeLSTM.{b}"] for b in ("leaf", "node", "node_loss")} \
                == {"compiled"}, s.table()
        with torch.no_grad():   # another grad mode: compiled for it, values unchanged
            assert_matches_eager(tree_loss, trees(5, seed=40), model, atol=ATOL, rtol=RTOL)
    # each block's body compiled for the process, not per run: once for each grad mode,
    # and again where a batch has one node (dynamo specializes sizes 0 and 1); dynamic
    # sizes, so not once per batch size
    assert not watch.recompiled(), watch.recompiled()
    bodies = collections.Counter(c.co_filename for c in watch.compiled)
    assert set(bodies) == {f"<dynbatch compiled block BinaryTreeLSTM.{b}>"
                           for b in ("leaf", "node", "node_loss")}, bodies
    assert max(bodies.values()) <= 4, bodies


def test_a_compiled_block_function_decorator_and_its_plain_twin():
    W = nn.Parameter(torch.randn(4, 4) * 0.5)
    U = nn.Parameter(torch.randn(4, 4) * 0.5)

    def cell(x, h, W, U):
        return torch.tanh(W @ x + U @ h) * torch.sigmoid(h)

    compiled_cell = db.block(compile=AOT)(cell)
    plain_cell = db.block(cell)

    def run(seq, W, U, cell):
        h = torch.zeros(4)
        for x in seq:
            h = cell(x, h, W, U)
        return h.sum()

    rng = random.Random(4)
    seqs = [[torch.tensor([rng.uniform(-1, 1) for _ in range(4)]) for _ in range(k)]
            for k in (1, 3, 2, 5, 4)]
    assert_matches_eager(run, seqs, W, U, compiled_cell, atol=ATOL, rtol=RTOL,
                         params=[W, U])
    assert how_of("cell") == "compiled", db.stats().table()
    assert_matches_eager(run, seqs, W, U, plain_cell, atol=ATOL, rtol=RTOL, params=[W, U])
    assert how_of("cell") == "block", db.stats().table()


def how_of(block: str) -> str:
    """How the last run ran the block whose name ends with ``block``."""
    hows = {r.how for r in db.stats().rows() if r.name.split(".")[-1] == block}
    assert len(hows) == 1, db.stats().table()
    return hows.pop()


class CompiledModuleCell(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.lin = nn.Linear(2 * n, n)

    def forward(self, x, h):
        return torch.tanh(self.lin(torch.cat([x, h]))) + 0.5 * h


@pytest.mark.parametrize("how", ["subclass", "instance"])
def test_compiled_module_blocks(how):
    torch.manual_seed(5)
    if how == "subclass":
        cell = db.block(compile=AOT)(type("Cell", (CompiledModuleCell,), {}))()
    else:
        cell = db.block(CompiledModuleCell(), compile=AOT)

    def run(seq, cell):
        h = torch.zeros(4)
        for x in seq:
            h = cell(x, h)
        return h

    seqs = [list(torch.randn(k, 4)) for k in (2, 1, 4, 3)]
    assert_matches_eager(run, seqs, cell, atol=ATOL, rtol=RTOL)
    assert how_of("Cell" if how == "subclass" else "CompiledModuleCell") == "compiled"


def test_a_compiled_block_sees_a_replaced_parameter():
    torch.manual_seed(9)
    model = AOTBlocks(VOCAB, DIM, DIM, CLASSES)
    batch = trees(5, seed=60)
    assert_matches_eager(tree_loss, batch, model, atol=ATOL, rtol=RTOL)
    # the compiled body met in the next run reads the new tensor, not the old one's
    model.node_gates.weight = nn.Parameter(torch.randn_like(model.node_gates.weight))
    with torch.no_grad():
        model.leaf_gates.bias.mul_(-2.0)
    assert_matches_eager(tree_loss, batch, model, atol=ATOL, rtol=RTOL)
    assert how_of("node") == "compiled"


def test_a_block_the_compiler_fails_runs_uncompiled_with_a_warning():
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    @db.block(compile={"backend": broken})
    def cell(x, W):
        return torch.tanh(W @ x) + x

    W = nn.Parameter(torch.randn(3, 3))
    xs = [torch.randn(3) for _ in range(4)]
    with pytest.warns(RuntimeWarning, match="torch.compile of block .*cell failed"):
        assert_matches_eager(lambda x, W: cell(x, W).sum(), xs, W, atol=ATOL, rtol=RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # once: the block runs plain from then on
        assert_matches_eager(lambda x, W: cell(x, W).sum(), xs, W, atol=ATOL, rtol=RTOL)
    assert db.stats().fallbacks == 0


def test_block_compile_argument_is_checked():
    def f(x):
        return x * 2

    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        db.block(f, compile="yes")
    marked = db.block(f)
    assert db.block(marked) is marked
    with pytest.raises(ValueError, match="is a block already"):
        db.block(marked, compile=True)


def test_a_compiled_block_that_fails_names_the_example_and_line():
    torch.manual_seed(6)
    emb = nn.Embedding(5, 3)

    @db.block(compile=AOT)
    def lookup(i, emb):
        return torch.tanh(emb(i))

    def per_example(word, emb):
        return lookup(torch.tensor(word), emb).sum()

    with pytest.raises(ExecuteError) as info:
        db.batched(per_example)([1, 2, 7, 3], emb)     # 7: out of the table
    message = str(info.value)
    assert "examples[2]" in message and "test_compile.py" in message, message
    assert "lookup(torch.tensor(word), emb)" in message, message


def test_a_block_whose_compile_options_fail_names_the_line():
    @db.block(compile={"backend": "no-such-backend"})
    def cell(x):
        return torch.tanh(x)

    with pytest.raises(TraceError) as info:
        db.batched(lambda x: cell(x) * 2)([torch.ones(2), torch.zeros(2)])
    message = str(info.value)
    assert "torch.compile" in message and "test_compile.py" in message, message


def test_compiled_blocks_planned_in_a_worker_run_compiled_here():
    torch.manual_seed(7)
    model = AOTBlocks(VOCAB, DIM, DIM, CLASSES)
    fn = db.batched(tree_loss)
    data = trees(8, seed=50)
    loader = db.DataLoader(data, fn, model, batch_size=4, num_workers=1)
    for batch in loader:
        expected, expected_grads = eager_reference(model, list(batch),
                                                   lambda t: tree_loss(t, model))
        model.zero_grad()
        outs = fn(batch, model)
        s = db.stats()
        assert s.extra.get("ahead"), "the minibatch was not planned in the worker"
        torch.stack(outs).sum().backward()
        for i, (o, e) in enumerate(zip(outs, expected)):
            assert_close(o, e, atol=ATOL, rtol=RTOL, where=f"examples[{i}]")
        assert_grads_close(grads_of(model), expected_grads)
        hows = {r.name: r.how for r in s.rows()}
        assert hows["BinaryTreeLSTM.node"] == hows["BinaryTreeLSTM.leaf"] == "compiled", hows


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor on the CPU needs a C++ compiler (g++ or c++ on PATH)")
def test_one_inductor_block():
    """The default backend (inductor: C++ on this CPU) on one small block, compiled once
    for both minibatch sizes."""
    torch.manual_seed(8)
    lin = nn.Linear(4, 4)

    @db.block(compile=True)
    def cell(x, lin):
        return torch.sigmoid(lin(x)) * torch.tanh(x)

    def run(xs, lin):
        return sum(cell(x, lin) for x in xs).sum()

    with watching_dynamo() as watch:
        for k in (3, 7):
            seqs = [list(torch.randn(j % 3 + 1, 4)) for j in range(k)]
            assert_matches_eager(run, seqs, lin, atol=ATOL, rtol=RTOL)
            assert how_of("cell") == "compiled"
    assert not watch.recompiled(), watch.recompiled()


# -- a minibatch that is one example ---------------------------------------------------------

def test_one_nltk_tree_passed_as_the_minibatch_is_refused():
    nltk = pytest.importorskip("nltk")
    tree = nltk.Tree.fromstring("(3 (2 good) (3 (2 very) (4 fine)))")
    fn = db.batched(lambda t: torch.tensor(float(len(t.leaves()))))
    with pytest.raises(TypeError) as info:
        fn(tree)
    message = str(info.value)
    assert "nltk.tree.tree.Tree" in message and "pass a list of examples" in message
    assert "test_compile.py" in message, message
    assert [float(x) for x in fn([tree])] == [3.0]
