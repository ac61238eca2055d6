"""db.DataLoader (loader.py, wire.py): minibatches planned ahead, in workers or here.

The oracle: ``fn(batch, *args)`` from the loader equals ``fn(list(batch), *args)`` run in
this process, values and every gradient (None included), for every reference model, over
several optimizer steps, so that the parameters a worker saw when it planned are not the
ones the plan runs with. Plans whose state went stale are made again here; plans for other
arguments are refused; code that reads values cannot be planned in workers.
"""
from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch import ahead, refs, session, wire
from dynbatch.errors import PlanAheadError, PlanError
from dynbatch.models import BiLSTMTagger, BinaryTreeLSTM, ChildSumTreeLSTM
from dynbatch.models.decoder import Seq2SeqGRU
from dynbatch.models.parser import ShiftReduceParser, gold_transitions

import test_models as TM

VOCAB, DIM = TM.VOCAB, TM.DIM


def binary_trees(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [TM.random_binary_tree(rng, rng.randint(1, 8)) for _ in range(n)]


def nary_trees(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [TM.random_nary_tree(rng, rng.randint(0, 3)) for _ in range(n)]


def sentences(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 7)
        out.append(([rng.randrange(VOCAB) for _ in range(k)],
                    [rng.randrange(TM.CLASSES) for _ in range(k)]))
    return out


def seq_pairs(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [([rng.randrange(3, 12) for _ in range(rng.randint(1, 6))],
             [rng.randrange(3, 12) for _ in range(rng.randint(1, 6))]) for _ in range(n)]


def parses(n: int, seed: int = 0) -> list:
    out = []
    for t in binary_trees(n, seed):
        words = [leaf.word_id for leaf in _leaves(t)]
        out.append((words, gold_transitions(t)))
    return out


def _leaves(t):
    return [t] if not t.children else [x for c in t.children for x in _leaves(c)]


@db.batched
def tree_loss(tree, model):
    return model(tree)


@db.batched
def tag_loss(example, model):
    return model(*example)


@db.batched
def seq_loss(pair, model):
    return model.loss(*pair)


@db.batched
def parse_loss(example, model):
    return model.loss(*example)       # (loss, number of decisions): a Python int beside it


def _models():
    torch.manual_seed(0)
    return {
        "binary-plain": (BinaryTreeLSTM(VOCAB, DIM, DIM, TM.CLASSES), tree_loss, binary_trees),
        "binary-cell-blocks": (TM.CellBlocks(VOCAB, DIM, DIM, TM.CLASSES), tree_loss,
                               binary_trees),
        "binary-all-blocks": (TM.AllBlocks(VOCAB, DIM, DIM, TM.CLASSES), tree_loss,
                              binary_trees),
        "childsum": (ChildSumTreeLSTM(VOCAB, DIM, DIM, TM.CLASSES), tree_loss, nary_trees),
        "tagger": (BiLSTMTagger(VOCAB, DIM, DIM, TM.CLASSES), tag_loss, sentences),
        "seq2seq": (Seq2SeqGRU(12, DIM, DIM, bos=1, eos=2), seq_loss, seq_pairs),
        "parser": (ShiftReduceParser(VOCAB, DIM, DIM, DIM), parse_loss, parses),
    }


MODELS = list(_models())


def total(outs) -> torch.Tensor:
    return torch.stack([o[0] if isinstance(o, tuple) else o for o in outs]).sum()


def assert_same(a, b, where: str) -> None:
    flat_a = torch.utils._pytree.tree_flatten(a)[0]
    flat_b = torch.utils._pytree.tree_flatten(b)[0]
    assert len(flat_a) == len(flat_b), where
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, where
            assert x.requires_grad == y.requires_grad, where
            torch.testing.assert_close(x, y, atol=1e-10, rtol=0, msg=where)
        else:
            assert x == y, where


def grads(model) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def check_steps(model, fn, examples, num_workers: int, steps: int = 3, **kwargs) -> None:
    """``steps`` training steps through the loader on ``model`` and in this process on a
    twin with the same weights and optimizer: equal results and gradients at each."""
    model = model.double()
    twin = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    loader = db.DataLoader(examples, fn, model, batch_size=4, num_workers=num_workers,
                           **kwargs)
    done = 0
    for batch in loader:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        outs = fn(batch, model)
        stats = db.stats()
        assert stats.extra.get("ahead"), "the plan made ahead ran"
        assert stats.batches < stats.nodes, stats
        ref = fn(list(batch), twin)
        assert_same(outs, ref, f"step {done}")
        total(outs).backward()
        total(ref).backward()
        ga, gb = grads(model), grads(twin)
        assert ga.keys() == gb.keys()
        for name in ga:
            assert (ga[name] is None) == (gb[name] is None), name
            if ga[name] is not None:
                torch.testing.assert_close(ga[name], gb[name], atol=1e-10, rtol=0)
        for opt in opts:
            opt.step()
        done += 1
        if done == steps:
            break
    assert done == steps


@pytest.mark.parametrize("name", MODELS)
def test_reference_models_in_the_main_process(name):
    model, fn, data = _models()[name]
    check_steps(model, fn, data(16), num_workers=0)


@pytest.mark.parametrize("name", MODELS)
def test_reference_models_in_two_workers(name):
    model, fn, data = _models()[name]
    check_steps(model, fn, data(16), num_workers=2)


class Tagger(BiLSTMTagger):
    @db.batched
    def forward(self, example):
        return BiLSTMTagger.forward(self, *example)


@pytest.mark.parametrize("form", ["method", "module"])
def test_a_batched_method_and_its_module(form):
    torch.manual_seed(0)
    model = Tagger(VOCAB, DIM, DIM, TM.CLASSES).double()
    examples = sentences(12)
    loader = db.DataLoader(examples, model.forward if form == "method" else model,
                           batch_size=5, num_workers=2)
    seen = []
    for batch in loader:
        outs = model(batch)
        assert db.stats().extra.get("ahead")
        assert_same(outs, model(list(batch)), "method")
        seen.extend(batch.indices)
    assert seen == list(range(12))


class Branchy(nn.Module):
    """Per-example code whose path depends on plain module state."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.scale = 1.0

    def forward(self, x):
        h = torch.tanh(self.lin(x)) * self.scale
        return h * 2 if self.training else h


@db.batched
def branchy(x, model):
    return model(x).sum()


def vectors(n: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(DIM, generator=g, dtype=torch.float64) for _ in range(n)]


def test_state_changed_after_asking_is_planned_again():
    """NOTE [plan validity]: planned in train(), run after eval(): planned again here, with
    one warning, and the results are eval()'s."""
    torch.manual_seed(0)
    model = Branchy().double()
    loader = db.DataLoader(vectors(12), branchy, model, batch_size=4, num_workers=2)
    with pytest.warns(RuntimeWarning, match="training") as caught:
        for k, batch in enumerate(loader):
            model.train(k == 0)
            outs = branchy(batch, model)
            assert_same(outs, branchy(list(batch), model), f"batch {k}")
    assert sum("planned again" in str(w.message) for w in caught) == 1


def test_state_set_before_iterating_reaches_the_workers():
    """The workers take on the main process's module state and grad mode when a
    minibatch is asked for: eval() and no_grad() between epochs need no replanning,
    persistent workers included."""
    torch.manual_seed(0)
    model = Branchy().double()
    loader = db.DataLoader(vectors(12), branchy, model, batch_size=4, num_workers=2,
                           persistent_workers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for mode in ("train", "eval", "scaled"):
            model.train(mode == "train")
            model.scale = 3.0 if mode == "scaled" else 1.0
            with torch.set_grad_enabled(mode == "train"):
                for batch in loader:
                    outs = branchy(batch, model)
                    assert db.stats().extra.get("ahead")
                    assert all(o.requires_grad == (mode == "train") for o in outs)
                    assert_same(outs, branchy(list(batch), model), mode)


@db.batched
def reads(x, model):
    h = model.lin(x)
    steps = int(h.argmax()) % 3             # a read: the value decides the code path
    for _ in range(steps):
        h = torch.tanh(model.lin(h))
    return h.sum()


def test_code_that_reads_values_cannot_be_planned_in_workers():
    torch.manual_seed(0)
    model = Branchy().double()
    loader = db.DataLoader(vectors(8), reads, model, batch_size=4, num_workers=2)
    with pytest.raises(PlanAheadError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "num_workers=0" in message and "test_loader.py" in message
    assert "steps = int(h.argmax())" in message and "examples[0]" in message


def test_code_that_reads_values_runs_here_without_workers():
    torch.manual_seed(0)
    model = Branchy().double()
    loader = db.DataLoader(vectors(8), reads, model, batch_size=4, num_workers=0)
    for batch in loader:
        outs = reads(batch, model)
        assert not db.stats().extra.get("ahead") and db.stats().rounds > 0
        assert_same(outs, [reads.fn(x, model) for x in batch], "reads")


@db.batched
def fails_on_one(x, model):
    h = model.lin(x)
    return (h @ torch.ones(h.shape[0] + (x.shape[0] != DIM), dtype=h.dtype)).sum()


def test_a_worker_error_names_the_example_and_the_line():
    torch.manual_seed(0)
    model = Branchy().double()
    examples = vectors(8)
    examples[5] = torch.randn(DIM + 1, dtype=torch.float64)      # the odd one
    loader = db.DataLoader(examples, fails_on_one, model, batch_size=4, num_workers=2)
    with pytest.raises(Exception) as err:
        for batch in loader:
            fails_on_one(batch, model)
    message = str(err.value)
    assert "examples[1]" in message, message        # the second of dataset indices 4..7
    assert "[4, 5, 6, 7]" in message and "test_loader.py" in message, message
    assert "h = model.lin(x)" in message, message


def test_shuffle_generator_and_drop_last_pass_through():
    model = Branchy().double()
    loader = db.DataLoader(vectors(10), branchy, model, batch_size=4, shuffle=True,
                           drop_last=True, generator=torch.Generator().manual_seed(7),
                           num_workers=2)
    reference = torch.utils.data.DataLoader(range(10), batch_size=4, shuffle=True,
                                            drop_last=True,
                                            generator=torch.Generator().manual_seed(7))
    assert len(loader) == len(reference) == 2
    got = [batch.indices for batch in loader]
    assert got == [b.tolist() for b in reference]
    assert got != [[0, 1, 2, 3], [4, 5, 6, 7]], "shuffled"


def test_a_sampler_passes_through():
    model = Branchy().double()
    sampler = [9, 3, 5, 1, 0]
    loader = db.DataLoader(vectors(10), branchy, model, batch_size=2, sampler=sampler)
    assert [b.indices for b in loader] == [[9, 3], [5, 1], [0]]


def test_a_batch_run_with_other_arguments_is_refused():
    torch.manual_seed(0)
    model, other = Branchy().double(), Branchy().double()
    batch = next(iter(db.DataLoader(vectors(4), branchy, model, batch_size=4)))
    with pytest.raises(PlanError, match="planned by a db.DataLoader for branchy"):
        branchy(batch, other)
    with pytest.raises(PlanError, match="is run by reads"):
        reads(batch, model)
    assert_same(branchy(batch, model), branchy(list(batch), model), "as planned")


def test_a_changed_model_structure_is_refused():
    torch.manual_seed(0)
    model = Branchy().double()
    batch = next(iter(db.DataLoader(vectors(4), branchy, model, batch_size=4)))
    model.lin = nn.Linear(DIM, 2 * DIM).double()    # the plan names a (DIM, DIM) weight
    with pytest.raises(PlanError, match="structure changed.*lin.weight"):
        branchy(batch, model)


@db.batched
def keeps(x, model, log):
    h = model.lin(x)
    log.append(h)
    return h.sum()


def test_storing_lazy_values_into_the_arguments_cannot_be_planned():
    model = Branchy().double()
    loader = db.DataLoader(vectors(4), keeps, model, [], batch_size=4, num_workers=2)
    with pytest.raises(PlanAheadError, match="log.append"):
        next(iter(loader))


def test_a_plan_travels_as_arrays():
    """What a worker sends: int64 tensors of codes and indices, the signatures' keys,
    and no graph of Python objects; unpacked here it computes what @db.batched does."""
    torch.manual_seed(0)
    model = TM.CellBlocks(VOCAB, DIM, DIM, TM.CLASSES).double()
    examples = binary_trees(8)
    the_plan = ahead.plan_ahead(tree_loss.fn, examples, (model,))
    packed = wire.pack(the_plan, refs.SignatureKeys((model,)))
    assert packed.code.dtype == packed.ints.dtype == torch.int64
    assert all(type(k) is bytes for k in packed.signatures)
    assert len(packed.signatures) < len(the_plan.steps) and not packed.tensors
    table = refs.Signatures((model,), lambda: session.Run("agenda"))
    again = wire.unpack(packed, [table(k) for k in packed.signatures])
    assert len({id(step.sig) for step in again.steps}) == len(packed.signatures)
    assert_same(ahead.run_plan(again), tree_loss(examples, model), "unpacked")
    index_views = [spec.rows for step in again.steps for spec, _ in step.gathers
                   if type(spec).__name__ == "Index"]
    assert index_views and all(r.untyped_storage().data_ptr() ==
                               packed.ints.untyped_storage().data_ptr()
                               for r in index_views), "index tensors are views of one"


def test_a_non_batched_function_is_refused():
    with pytest.raises(TypeError, match="@db.batched"):
        db.DataLoader(vectors(4), lambda x, m: x, Branchy(), batch_size=2)


def test_a_label_from_the_example_shuffled_in_one_worker():
    """F.cross_entropy and a per-example label from the example, shuffled, one worker."""
    torch.manual_seed(0)
    lin = nn.Linear(DIM, 3).double()

    @db.batched
    def ce(example, lin):
        x, y = example
        return F.cross_entropy(lin(x), torch.tensor(y))

    data = [(x, k % 3) for k, x in enumerate(vectors(9))]
    loader = db.DataLoader(data, ce, lin, batch_size=4, shuffle=True, num_workers=1)
    for batch in loader:
        assert_same(ce(batch, lin), ce(list(batch), lin), "ce")


def test_examples_shuffled_in_place_after_the_loader_was_made_are_refused():
    """A forked worker plans its own copy of the examples: one shuffled in place here
    afterwards would silently pair the plan's results with other examples."""
    model = Branchy().double()
    examples = vectors(8)
    loader = db.DataLoader(examples, branchy, model, batch_size=4, num_workers=1,
                           persistent_workers=True)
    assert len([b for b in loader]) == 2
    random.Random(0).shuffle(examples)
    with pytest.raises(PlanError, match="examples changed"):
        next(iter(loader))


def test_host_constants_travel_with_their_device():
    """NOTE [host constants]: constants a worker made on the host for a device are read
    from the device copy of the one int64 tensor, or moved, when the plan runs."""
    torch.manual_seed(0)
    model = TM.CellBlocks(VOCAB, DIM, DIM, TM.CLASSES).double()
    examples = binary_trees(6)
    the_plan = ahead.plan_ahead(tree_loss.fn, examples, (model,))
    cpu = torch.device("cpu")
    tagged = 0
    for step in the_plan.steps:
        for k, (spec, inputs) in enumerate(step.gathers):
            if type(spec).__name__ == "Values":
                step.gathers[k] = (spec._replace(device=cpu), inputs)
                tagged += 1
    assert tagged
    packed = wire.pack(the_plan, refs.SignatureKeys((model,)))
    assert packed.device == cpu
    table = refs.Signatures((model,), lambda: session.Run("agenda"))
    again = wire.unpack(packed, [table(k) for k in packed.signatures])
    assert_same(ahead.run_plan(again), tree_loss(examples, model), "host constants")


def test_batch_sampler_excludes_the_other_batching_arguments():
    with pytest.raises(ValueError, match="batch_sampler excludes"):
        db.DataLoader(vectors(4), branchy, Branchy(), batch_sampler=[[0, 1]], shuffle=True)
