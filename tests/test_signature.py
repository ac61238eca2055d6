"""Signatures (signature.py, template.py, infer.py, state.py): what decides which calls
batch together, and what is worked out once for each.

A key names everything that changes a call's result: the callable, the state (grad mode,
autocast, default dtype), each per-example tensor's meta, shared tensors and objects, and
Python values with their types. A new key's outputs are inferred on fake tensors, with
no effect on any real tensor; data-dependent calls become reads; a rule that fails its
fake check gives way to vmap; the caches stay bounded.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynbatch as db
from dynbatch import rules, signature
from dynbatch.infer import infer
from dynbatch.lazy import Input, current, meta_of
from dynbatch.state import entered, state_now
from dynbatch.template import filler, map_leaves, markers, metas_of, template_of

CPU = torch.device("cpu")


def meta(*shape, dtype=torch.float64, grad=False):
    return meta_of(shape, dtype, CPU, grad)


def test_keys_name_grad_mode_autocast_and_default_dtype():
    keys, states = [], []

    def fn(x):
        tracer = current.tracer
        contexts = [torch.enable_grad(), torch.no_grad(),
                    torch.autocast("cpu", dtype=torch.bfloat16), entered((1, torch.float32, ()))]
        for context in contexts:
            with context:
                states.append(state_now())
                keys.append(signature.call_key(torch.add, state_now(), (x, x), {}, tracer)[0])
        return x

    db.batched(fn)([torch.randn(3)])
    assert len(set(states)) == 4 and len(set(keys)) == 4, states


def test_keys_tell_python_values_apart_by_type():
    keys = []

    def fn(x):
        for value in (1, 1.0, True):
            keys.append(signature.call_key(torch.mul, state_now(), (x, value), {},
                                           current.tracer)[0])
        return x

    db.batched(fn)([torch.randn(3)])
    assert len(set(keys)) == 3


def test_inference_leaves_real_tensors_alone():
    """F.embedding with max_norm renormalizes the rows it looks up, in place, in eager
    code; inferring its output must not touch the real table."""
    table = torch.full((6, 4), 3.0)
    before = table.clone()
    out = infer(F.embedding, (Input(0, meta(2, dtype=torch.int64)), table),
                {"max_norm": 1.0}, 1)
    assert out.shape == (2, 4) and out.dtype == table.dtype
    assert torch.equal(table, before)


def test_inference_runs_in_the_calls_state():
    x = Input(0, meta(3, dtype=torch.float32))
    assert infer(torch.mm, (Input(0, meta(2, 3, dtype=torch.float32)),
                            torch.randn(3, 2, dtype=torch.float32)), {},
                 (1, torch.float64, (("cpu", torch.bfloat16),))).dtype == torch.bfloat16
    assert not infer(torch.exp, (Input(0, meta(3, grad=True)),), {}, 0).requires_grad
    assert infer(torch.exp, (Input(0, meta(3, grad=True)),), {}, 1).requires_grad
    assert infer(torch.ones_like, (x,), {}, (1, torch.float64, ())).dtype == torch.float32


@pytest.mark.parametrize("fn, args", [
    (torch.nonzero, lambda x: (x,)),
    (torch.Tensor.unique, lambda x: (x,)),
    (torch.masked_select, lambda x: (x, Input(1, meta(4, dtype=torch.bool)))),
    (torch.Tensor.item, lambda x: (Input(0, meta()),)),
])
def test_data_dependent_calls_are_reads(fn, args):
    targs = args(Input(0, meta(4)))
    sig = signature.rebuilt_op(fn, targs, {}, 1)
    assert sig.kind is signature.READ


@pytest.mark.parametrize("fn, args", [
    (torch.Tensor.add_, lambda x: (x, 1.0)),
    (torch.Tensor.__iadd__, lambda x: (x, 1.0)),
    (F.relu, lambda x: (x,)),
])
def test_in_place_calls_are_marked(fn, args):
    kwargs = {"inplace": True} if fn is F.relu else {}
    assert signature.rebuilt_op(fn, args(Input(0, meta(4))), kwargs, 1).kind is \
        signature.INPLACE


def test_a_rule_is_chosen_once_and_declines_what_it_cannot_batch():
    sig = signature.rebuilt_op(torch.softmax, (Input(0, meta(5)),), {"dim": -1}, 1)
    assert sig.how == "rule" and sig.rule is not None
    zero_d = signature.rebuilt_op(torch.softmax, (Input(0, meta()),), {"dim": -1}, 1)
    assert zero_d.how == "vmap", "a 0-d per-example tensor has no dim -1 to shift"
    values = [torch.randn(7, 5)]
    torch.testing.assert_close(sig.batched(values)[0], torch.softmax(values[0], -1))


def test_a_rule_that_fails_its_fake_check_gives_way_to_vmap(monkeypatch):
    def wrong(call):                    # sums over the batch dim: the wrong shape
        return lambda kw: kw["input"].sum(0)

    monkeypatch.setitem(rules.RULES, torch.sin, wrong)
    sig = signature.rebuilt_op(torch.sin, (Input(0, meta(3)),), {}, 1)
    assert sig.how == "vmap"
    values = [torch.randn(4, 3)]
    torch.testing.assert_close(sig.batched(values)[0], values[0].sin())


def test_signatures_of_plain_keys_are_shared_across_runs():
    seen = []

    def fn(x):
        y = x * 2.0
        seen.append(y.node.sig)
        return y

    db.batched(fn)([torch.randn(3)])
    db.batched(fn)([torch.randn(3)])
    assert seen[0] is seen[1]


def test_facts_about_shared_tensors_are_inferred_once(monkeypatch):
    """A key naming a parameter lives for one run, but what inference found is reused by
    the next run's new parameters of the same metas."""
    calls = []
    real = signature.infer
    monkeypatch.setattr(signature, "infer", lambda *a: calls.append(a[0]) or real(*a))

    def fn(x, lin):
        return F.linear(x, lin.weight, lin.bias)

    db.batched(fn)([torch.randn(3)], nn.Linear(3, 2))
    first = calls.count(F.linear)
    db.batched(fn)([torch.randn(3)], nn.Linear(3, 2))
    assert first == 1 and calls.count(F.linear) == 1


def test_the_caches_stay_bounded(monkeypatch):
    monkeypatch.setattr(signature, "_LIMIT", 8)
    for n in range(1, 30):
        db.batched(lambda x: x * 3.0)([torch.randn(n)])
        assert len(signature.GLOBAL) <= 9


def test_template_marks_each_per_example_tensor_and_fills_it_back():
    seen = {}

    def fn(x, w):
        args = ([x, w, 2], {"scale": x, "where": slice(0, x)})
        seen["template"] = template_of(args, {"alpha": 0.5})
        return x

    w = torch.randn(3)
    db.batched(fn)([torch.randn(3)], w)
    targs, tkwargs, metas, facts = seen["template"]
    found = markers((targs, tkwargs))
    assert [m.k for m in found] == [0, 1, 2] and metas_of(targs, tkwargs) == metas
    assert targs[0][1] is w and tkwargs == {"alpha": 0.5}
    assert facts is not None, "shared tensors enter the facts key by meta"
    args, kwargs = filler(targs, tkwargs)(["a", "b", "c"])
    assert args[0] == ["a", w, 2] and args[1] == {"scale": "b", "where": slice(0, "c")}


def test_map_leaves_rebuilds_containers():
    tree = (1, [2, {"k": slice(3, None)}])
    assert map_leaves(lambda v: v * 10 if type(v) is int else v, tree) == \
        (10, [20, {"k": slice(30, None)}])
