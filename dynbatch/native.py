"""Built-in modules batched natively: nn.Linear, nn.Embedding, nn.LayerNorm, the RNN cells
(on vectors, or on rows of one) and nn.LSTM, nn.GRU, nn.RNN (on one unbatched sequence).
The batched call is the module itself on the stacked inputs, moved to the module's own
batch layout where it differs; what a call returns is inferred on a fake copy of the
module, and a native call that does not check out there leaves the call to vmap.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from .errors import TraceError, where
from .infer import checks_out, fake_mode, fakes, quiet
from .lazy import Input, meta_of_tensor, with_length
from .rules import fallback, ragged, segments
from .signature import BLOCK, Signature, alone, wrapper
from .state import entered
from .template import filler

BUILTIN_BLOCKS = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.LSTMCell, nn.GRUCell, nn.RNNCell,
                  nn.LSTM, nn.GRU, nn.RNN)
# nn.Module.__call__ as torch defines it: blocks.py patches the class's while a run records
original_call = nn.Module.__call__

_NATIVE: dict = {}      # what a module's call infers, by its config and metas, across runs


def signature(module, targs, tkwargs, metas, state, name, example, site, target,
              seen: dict | None = None) -> Signature:
    """The signature of a built-in module's call: its outputs inferred on a fake copy of
    the module, once per (config, metas) for the process; batched natively where the
    native call checks out on fakes, else through vmap. ``example`` and ``site`` name the
    call in errors; ``target``: the per-example call; ``seen``: what this run read of
    each module already (its config and parameters do not change while a run records).

    A call on a sequence that batches across lengths (``_ragged_form``) is inferred once
    for every length: its outputs along the sequence (all of them, or an RNN module's
    first) have the call's length, and the rest do not depend on it."""
    form = _ragged_form(module, targs, tkwargs)
    length = None
    if form is not None:
        length = metas[0].shape[0]
        metas = (with_length(metas[0], -1),) + metas[1:]
    own = seen.get(id(module)) if seen is not None else None
    if own is None:
        own = (type(module), module.training, module.extra_repr(),
               tuple((n, meta_of_tensor(t)) for n, t in module.named_parameters(recurse=False)),
               tuple((n, meta_of_tensor(t)) for n, t in module.named_buffers(recurse=False)))
        if seen is not None:
            seen[id(module)] = own
    facts = (own, state, metas, tuple(type(a) for a in targs), tuple(tkwargs))
    known = _NATIVE.get(facts)
    if length is not None:
        metas = (targs[0].meta,) + metas[1:]
    sig = Signature(BLOCK, module, name, state, metas)
    sig.target = target
    sig.template = (targs, tkwargs)
    fill = sig.fill = filler(targs, tkwargs)
    if known is None:
        fake = _fake_module(module)
        try:
            with quiet(), fake_mode(), entered(state):
                out = original_call(fake, *(fakes(a) for a in targs),
                                     **{k: fakes(v) for k, v in tkwargs.items()})
        except Exception as err:
            raise TraceError(f"{name} failed for {where(example, site)}\n"
                             f"  {type(err).__name__}: {err}") from err
        leaves, spec = tree_flatten(out)
        outputs = tuple(meta_of_tensor(x) for x in leaves)
        native = _native_call(module, targs)
        ok = checks_out(lambda kw: native(fake, kw["args"], kw["kwargs"]),
                        {"args": targs, "kwargs": tkwargs}, outputs, state)
        known = _NATIVE[facts] = (outputs, spec, ok, length)
    outputs, spec, ok, inferred_at = known
    if inferred_at != length:
        along = range(1 if isinstance(module, nn.RNNBase) else len(outputs))
        outputs = tuple(with_length(m, length) if i in along else m
                        for i, m in enumerate(outputs))
    sig.outputs, sig.wrap = outputs, wrapper(None if spec.is_leaf() else spec, outputs)
    sig.single = outputs[0] if spec.is_leaf() else None
    flat = sig.flat
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        sig.site = site
        alone(sig, "nn.Embedding with scale_grad_by_freq=True scales gradients by each "
                   "call's own index counts")
    elif ok:
        native = _native_call(module, targs)
        sig.how = "block"
        sig.batched = lambda values: flat(native(module, *fill(values)))
        sig.ragged = form
    else:
        sig.how = "vmap"
        target = sig.target
        sig.batched = lambda values: flat(fallback.vmap_call(target, fill, values))
    return sig


def _rnn_call(module, targs):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called per example on an unbatched
    sequence (L, d), on a batch of them of one length: the batch's (n, L, d) go in as the
    module's own batch dim (dim 1, or 0 with ``batch_first``), a per-example initial state
    (layers x directions, H) as (layers x directions, n, H), a shared one expanded; the
    outputs come back with the batch dim first. Other forms (batched or packed input) are
    left to the plain call, which the inference check then refuses."""
    x = targs[0] if targs else None
    if type(x) is not Input or len(x.meta.shape) != 2 or len(targs) > 2:
        return lambda m, args, kwargs: original_call(m, *args, **kwargs)
    first = module.batch_first

    def call(m, args, kwargs):
        args = list(args)
        xs = args[0]
        n = xs.shape[0]
        args[0] = xs if first else xs.transpose(0, 1)
        if len(args) > 1 and args[1] is not None:
            args[1] = _states(args[1], targs[1], n)
        out, state = original_call(m, *args, **kwargs)
        out = out if first else out.transpose(0, 1)
        state = tuple(h.transpose(0, 1) for h in state) if type(state) is tuple else \
            state.transpose(0, 1)
        return out, state
    return call


def _ragged_form(module, targs, tkwargs) -> ragged.Ragged | None:
    """NOTE [ragged groups] in rules/ragged.py. Linear, Embedding and LayerNorm treat the
    rows of a sequence (L, ...) alone; an RNN module runs an unbatched sequence (L, d)
    over one packed batch of every length."""
    x = targs[0] if targs else None
    if type(x) is not Input or x.k != 0 or len(targs) > (2 if isinstance(module, nn.RNNBase)
                                                         else 1) or tkwargs:
        return None
    rank = len(x.meta.shape)
    if isinstance(module, nn.RNNBase):
        return ragged.Ragged((0,), _packed_run, "packed") if rank == 2 else None
    least = {nn.Linear: 2, nn.Embedding: 1}.get(type(module))
    if type(module) is nn.LayerNorm:
        least = len(module.normalized_shape) + 1
    if least is None or rank < least:
        return None
    return ragged.Ragged((0,), segments.rows_run((0,), ()), "rows")


def _packed_run(sigs, parts):
    """An RNN module over sequences of several lengths (parts[j][0]: (n_j, L_j, d)): their
    rows packed time-major, longest first (a ``PackedSequence`` made directly from the
    rows, one index_select), one call, each example's outputs taken back in row order and
    its final states in example order (the module restores that order itself)."""
    sig = sigs[0]
    seq = segments.Lengths(parts, 0)
    x = seq.cat([p[0] for p in parts])
    into, back, sizes, order, unorder = _packing(seq, x.device)
    values = list(parts[0])
    values[0] = PackedSequence(x.index_select(0, into), sizes, order, unorder)
    for k in range(1, len(values)):
        values[k] = torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
    args, kwargs = sig.fill(values)
    args = list(args)
    if len(args) > 1 and args[1] is not None:
        args[1] = _states(args[1], sig.template[0][1], seq.n)
    out, state = original_call(sig.fn, *args, **kwargs)
    rows = out.data.index_select(0, back)
    state = tuple(h.transpose(0, 1) for h in state) if type(state) is tuple else \
        (state.transpose(0, 1),)
    return [r + e for r, e in zip(seq.rows((rows,)), seq.examples(state))]


def _packing(seq, device):
    """(rows -> packed, packed -> rows, batch sizes, sorted order, its inverse) of a
    group: as ``pack_padded_sequence`` orders them, made once per distinct group."""
    key = ("packed", seq.key, device)
    found = segments.INDEX.get(key)
    if found is None:
        lengths = seq.lengths()
        order = sorted(range(len(lengths)), key=lambda b: -lengths[b])
        starts = [0] * len(lengths)
        for b in range(1, len(lengths)):
            starts[b] = starts[b - 1] + lengths[b - 1]
        into, sizes = [], []
        for t in range(lengths[order[0]] if lengths else 0):
            live = [b for b in order if lengths[b] > t]
            sizes.append(len(live))
            into.extend(starts[b] + t for b in live)
        back = [0] * len(into)
        for packed_row, row in enumerate(into):
            back[row] = packed_row
        unorder = [0] * len(order)
        for r, b in enumerate(order):
            unorder[b] = r
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        found = (as_tensor(into).to(device), as_tensor(back).to(device), as_tensor(sizes),
                 as_tensor(order).to(device), as_tensor(unorder).to(device))
        segments.remember(key, found)
    return found


def _states(hx, marks, n: int):
    """An RNN module's initial state for a batch of n unbatched sequences: a per-example
    (n, layers x directions, H) as (layers x directions, n, H), a shared one expanded."""
    pairs = zip(hx, marks) if type(hx) in (list, tuple) else ((hx, marks),)
    moved = [h.unsqueeze(1).expand(h.shape[0], n, *h.shape[1:]).contiguous()
             if type(mark) is not Input else h.transpose(0, 1).contiguous()
             for h, mark in pairs]
    return type(hx)(moved) if type(hx) in (list, tuple) else moved[0]


def _native_call(module, targs):
    """The module on a batch: its own call, with a shared initial state of an RNN cell
    expanded along the batch dim. An RNN cell called per example on rows of one
    (``cell(x.unsqueeze(0), h.unsqueeze(0))``, the form from before cells took unbatched
    input) runs on the batch with that dim taken out, and its outputs get it back: the
    cell treats rows independently, so (n, 1, d) rows are n rows of (n, d)."""
    if isinstance(module, nn.RNNBase):
        return _rnn_call(module, targs)
    if not isinstance(module, nn.RNNCellBase):
        return lambda m, args, kwargs: original_call(m, *args, **kwargs)
    x = targs[0] if targs else None
    rows_of_one = type(x) is Input and len(x.meta.shape) == 2 and x.meta.shape[0] == 1
    if len(targs) < 2 and not rows_of_one:
        return lambda m, args, kwargs: original_call(m, *args, **kwargs)
    state = targs[1] if len(targs) > 1 else None
    shared = [type(h) is not Input for h in (state if type(state) in (list, tuple) else
                                             (state,))]

    def batch_of(h, is_shared: bool, n: int):
        if rows_of_one:     # shared (1, H) -> (H); batched (n, 1, H) -> (n, H)
            h = h.squeeze(0) if is_shared else h.squeeze(1)
        return h.expand(n, *h.shape) if is_shared else h

    def call(m, args, kwargs):
        args = list(args)
        if rows_of_one:
            args[0] = args[0].squeeze(1)
        n = args[0].shape[0]
        if len(args) > 1 and args[1] is not None:
            hx = args[1]
            args[1] = type(hx)(batch_of(h, s, n) for h, s in zip(hx, shared)) \
                if type(hx) in (list, tuple) else batch_of(hx, shared[0], n)
        out = original_call(m, *args, **kwargs)
        if rows_of_one:
            out = tuple(o.unsqueeze(1) for o in out) if type(out) is tuple else \
                out.unsqueeze(1)
        return out
    return call


def _fake_module(module):
    """A shallow copy of a built-in module whose parameters and buffers are fake tensors
    of the same metas: inference touches no real tensor and swaps nothing in the module
    another thread may be using."""
    fake = copy.copy(module)
    with fake_mode():
        fake._parameters = {n: None if p is None else fakes(p) for n, p in
                            module._parameters.items()}
        fake._buffers = {n: None if b is None else fakes(b) for n, b in
                         module._buffers.items()}
    if isinstance(module, nn.RNNBase):     # its forward reads this list, not _parameters
        fake._flat_weights = [fake._parameters.get(n) for n in module._flat_weights_names]
    return fake
