"""Inference on fake tensors: what a call returns (shapes, dtypes, devices, requires_grad)
without running it on real data, so without side effects on any real tensor or module
(``torch._subclasses.FakeTensorMode``, the tool PyTorch makes for this). Also the check of
a rule's batched call on a fake batch.
"""
from __future__ import annotations

import logging
import threading

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._pytree import tree_flatten

from .lazy import Input, TensorMeta, meta_of_tensor
from .state import entered
from .template import map_leaves

Tensor = torch.Tensor
_fake = threading.local()       # .mode: this thread's FakeTensorMode; .quiet: inferring now


class _Quiet(logging.Filter):
    """Fake tensors log an error with a traceback whenever a kernel raises; an error while
    dynbatch infers is an answer (the call is wrong, or data-dependent), raised or acted
    on by dynbatch, not something to print."""

    def filter(self, record) -> bool:
        return not getattr(_fake, "quiet", False)


logging.getLogger("torch._subclasses.fake_tensor").addFilter(_Quiet())


class quiet:
    def __enter__(self):
        self.was = getattr(_fake, "quiet", False)
        _fake.quiet = True

    def __exit__(self, *exc):
        _fake.quiet = self.was


_BATCH_PROBE = 7        # the batch size of the rules' check: unlike any per-example dim


_warm = threading.Event()


def warm_up() -> None:
    """Import and initialize the fake-tensor machinery once per process, in a thread of its
    own: the first FakeTensorMode imports much of torch (seconds), and objects made by
    those imports keep the importing stack's frames alive; made from inside a run, those
    frames would hold the run's lazy tensors, as if the user still held them."""
    if _warm.is_set():
        return

    def first_use():
        with torch._C.DisableTorchFunction(), FakeTensorMode():
            x = torch.empty(2)
            (x + 1).sum()
            try:
                x.nonzero()
            except Exception:
                pass
    thread = threading.Thread(target=first_use, name="dynbatch-fake-warm-up")
    thread.start()
    thread.join()
    _warm.set()


def fake_mode():
    mode = getattr(_fake, "mode", None)
    if mode is None:
        mode = _fake.mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def _stand_in(meta: TensorMeta, batch: int | None = None) -> Tensor:
    shape = tuple(meta.shape) if batch is None else (batch, *meta.shape)
    t = torch.empty(shape, dtype=meta.dtype, device=meta.device)
    return t.requires_grad_() if meta.requires_grad else t


def fakes(a, batch=None):
    """A template ``a`` with a fake stand-in for each marker (with a batch dim in front
    when ``batch`` is given) and for each shared tensor; made under a FakeTensorMode."""
    def fake(x):
        if type(x) is Input:
            return _stand_in(x.meta, batch)
        return _stand_in(meta_of_tensor(x)) if isinstance(x, Tensor) else x
    return map_leaves(fake, a)


def infer(fn, args, kwargs, state):
    """``fn`` on fake stand-ins of a template's tensors, under ``state``: output shapes,
    dtypes, devices and requires_grad, with no side effect on any real tensor."""
    with torch._C.DisableTorchFunction(), quiet(), fake_mode(), entered(state):
        fargs = tuple(fakes(a) for a in args)
        fkwargs = {k: fakes(v) for k, v in kwargs.items()}
        return fn(*fargs, **fkwargs)


def checks_out(rule_fn, canon: dict, outputs, state) -> bool:
    """Whether the rule's batched call, run on fake batched inputs, gives every output the
    batch dim in front of the shape and dtype inferred for one example: a rule that reads
    a dim wrongly or loses a 0-d operand's type promotion fails here, and vmap runs the
    call instead."""
    try:
        with torch._C.DisableTorchFunction(), quiet(), fake_mode(), entered(state):
            kw = {k: fakes(v, _BATCH_PROBE) for k, v in canon.items()}
            leaves = tree_flatten(rule_fn(kw))[0]
    except Exception:
        return False
    return len(leaves) == len(outputs) and all(
        isinstance(x, Tensor) and tuple(x.shape) == (_BATCH_PROBE, *m.shape) and
        x.dtype == m.dtype for x, m in zip(leaves, outputs))


def fake_cannot(err) -> bool:
    """Errors that mean fake tensors cannot run the call (its output depends on the data,
    or the op has no fake kernel), not that the call is wrong."""
    return isinstance(err, (DataDependentOutputException, DynamicOutputShapeException,
                            UnsupportedOperatorException, NotImplementedError))
