"""Execution (execute.py, gather.py, rules/fallback.py): every batched call gives what
inference promised, or runs again one example at a time.

A batched call that raises, or gives other shapes or dtypes than one example's call, is
never passed on: its batch runs per example (counted in ``stats().fallbacks``, warned at
the user's line, an error under ``dynbatch.testing.strict()``), with eager's values.
"""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import dynbatch as db
from dynbatch import execute, rules
from dynbatch.errors import FallbackError
from dynbatch.testing import strict


def examples(n=4, dim=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(dim, generator=g) for _ in range(n)]


def line_of(fn, marker: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(k for k, text in enumerate(lines) if marker in text)


def fails_off_the_probe(call):
    """A rule that passes the fake check (a batch of 7) and fails on a real batch."""
    def run(kw):
        x = kw["input"]
        if x.shape[0] != 7:
            raise RuntimeError("this rule is wrong")
        return torch.cosh(x)
    return run


def wrong_dtype_off_the_probe(call):
    def run(kw):
        x = kw["input"]
        return torch.cosh(x) if x.shape[0] == 7 else torch.cosh(x).float()
    return run


def cosh_twice(x):
    return torch.cosh(x) * 2        # COSH-LINE


@pytest.mark.parametrize("rule", [fails_off_the_probe, wrong_dtype_off_the_probe])
def test_a_failing_batched_call_runs_per_example_and_says_so(monkeypatch, rule):
    monkeypatch.setitem(rules.RULES, torch.cosh, rule)
    monkeypatch.setattr(execute, "_warned", set())
    xs = examples()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = db.batched(cosh_twice)(xs)
    for x, y in zip(xs, out):
        assert y.dtype == x.dtype
        torch.testing.assert_close(y, torch.cosh(x) * 2, atol=0, rtol=0)
    assert db.stats().fallbacks == len(xs)
    messages = [w for w in caught if "one example at a time" in str(w.message)]
    assert messages and messages[0].filename == __file__
    assert messages[0].lineno == line_of(cosh_twice, "COSH-LINE")


def test_strict_mode_refuses_to_run_per_example(monkeypatch):
    monkeypatch.setitem(rules.RULES, torch.cosh, fails_off_the_probe)
    with strict(), pytest.raises(FallbackError, match=r"test_execute.py:\d+"):
        db.batched(cosh_twice)(examples())


def test_a_call_vmap_cannot_batch_runs_per_example_from_then_on(monkeypatch):
    monkeypatch.setattr(execute, "_warned", set())

    class Twice(torch.autograd.Function):           # no vmap rule: vmap refuses it
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    w = torch.randn(3, requires_grad=True)

    def fn(x, w):
        return Twice.apply(x * w).sum()

    xs = examples()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = db.batched(fn)(xs, w)
        assert db.stats().fallbacks == len(xs)
        torch.stack(out).sum().backward()
        batched_grad = w.grad.clone()
        w.grad = None
        db.batched(fn)(xs, w)
        assert db.stats().fallbacks == len(xs) and db.stats().vmap_batches < db.stats().batches
    torch.stack([fn(x, w) for x in xs]).sum().backward()
    torch.testing.assert_close(batched_grad, w.grad)


def test_debug_prints_every_batch(monkeypatch, capsys):
    monkeypatch.setattr(execute, "DEBUG", True)
    db.batched(lambda x: (x * 2).sum())(examples())
    lines = [line for line in capsys.readouterr().out.splitlines() if "dynbatch: batch" in line]
    assert len(lines) == db.stats().batches and "x4" in lines[0]
