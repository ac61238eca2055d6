"""The eager-equivalence oracle, for dynbatch's tests and for users' own.

``assert_matches_eager(fn, examples, *args)`` runs ``fn`` once per example in plain PyTorch
and once under ``db.batched``, on the same inputs and weights, and compares every output and
every parameter gradient; ``max_batches`` also proves that batching happened.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from . import api
from .rules import fallback


@contextlib.contextmanager
def strict():
    """Within: running a batch one example at a time (no batching rule, and vmap could not
    batch the call) raises ``FallbackError`` instead, naming the user's line."""
    old = fallback.STRICT
    fallback.STRICT = True
    try:
        yield
    finally:
        fallback.STRICT = old


def _leaves(structure, where: str):
    if isinstance(structure, torch.Tensor):
        yield where, structure
    elif isinstance(structure, (list, tuple)):
        for i, x in enumerate(structure):
            yield from _leaves(x, f"{where}[{i}]")
    elif isinstance(structure, dict):
        for k, x in structure.items():
            yield from _leaves(x, f"{where}[{k!r}]")


def _scalar_loss(outputs) -> torch.Tensor | None:
    total = None
    for _, t in _leaves(outputs, ""):
        if t.requires_grad and t.dtype.is_floating_point:
            term = t.sum() if total is None else total + t.sum()
            total = term
    return total


def _parameters_of(args) -> list[nn.Parameter]:
    params = []
    seen = set()
    for a in args:
        items = a.parameters() if isinstance(a, nn.Module) else (
            [a] if isinstance(a, torch.Tensor) and a.requires_grad else [])
        for p in items:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _grads(params, outputs):
    for p in params:
        p.grad = None
    loss = _scalar_loss(outputs)
    if loss is not None and loss.requires_grad:
        loss.backward()
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_close(actual, expected, *, atol: float, rtol: float, where: str) -> None:
    """Same structure, same shapes and dtypes, values within tolerance; names the place."""
    a_leaves = list(_leaves(actual, where))
    e_leaves = list(_leaves(expected, where))
    assert len(a_leaves) == len(e_leaves), \
        f"{where}: {len(a_leaves)} tensors from dynbatch, {len(e_leaves)} from eager"
    if type(actual) is not type(expected) and not (
            isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple))):
        raise AssertionError(f"{where}: {type(actual).__name__} vs {type(expected).__name__}")
    for (name, a), (_, e) in zip(a_leaves, e_leaves):
        assert isinstance(a, torch.Tensor) and type(a) is torch.Tensor or \
            isinstance(a, torch.Tensor), f"{name}: not a real tensor ({type(a).__name__})"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs eager {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} vs eager {e.dtype}"
        if a.dtype.is_floating_point or a.dtype.is_complex:
            diff = (a.detach() - e.detach()).abs()
            bound = atol + rtol * e.detach().abs()
            bad = ~(diff <= bound) & ~(torch.isnan(a.detach()) & torch.isnan(e.detach()))
            assert not bool(bad.any()), \
                f"{name}: max abs diff {diff.max().item():.3e} (atol {atol}, rtol {rtol})"
        else:
            assert torch.equal(a, e), f"{name}: {a} vs eager {e}"


def assert_matches_eager(fn: Callable, examples: Sequence, *args, atol: float = 1e-8,
                         rtol: float = 1e-6, strategy: str = "agenda",
                         max_batches: int | None = None,
                         params: Iterable[torch.Tensor] | None = None, **kwargs):
    """Run ``fn(example, *args, **kwargs)`` eagerly per example and batched; compare every
    output and the gradient of every parameter (modules and grad-requiring tensors among
    ``args``, or ``params``) of the sum of all outputs. Returns the batched outputs."""
    params = list(params) if params is not None else _parameters_of(args)
    eager = [fn(x, *args, **kwargs) for x in examples]
    eager_grads = _grads(params, eager)
    batched = api.batched(fn, strategy=strategy)(examples, *args, **kwargs)
    stats = api.stats()
    batched_grads = _grads(params, batched)
    assert len(batched) == len(eager), f"{len(batched)} results for {len(eager)} examples"
    for i, (b, e) in enumerate(zip(batched, eager)):
        assert_close(b, e, atol=atol, rtol=rtol, where=f"examples[{i}]")
    for k, (b, e) in enumerate(zip(batched_grads, eager_grads)):
        name = f"grad of parameter {k} {tuple(params[k].shape)}"
        assert (b is None) == (e is None), f"{name}: present in one run only"
        if b is not None:
            assert_close(b, e, atol=atol, rtol=rtol, where=name)
    if max_batches is not None:
        assert stats.batches <= max_batches, f"{stats.batches} batches > {max_batches}: {stats}"
    return batched
