"""Gathering a batch's inputs from the store of earlier batch outputs, as the plan's gather
specs say (plan.py: ``Slice``, ``Index``, ``Values``, ``Stacked``, ``Joined``).
"""
from __future__ import annotations

import torch

from .plan import Index, Slice, Stacked, Values


def gather(spec, store: list):
    kind = type(spec)
    if kind is Slice:
        src = store[spec.entry][spec.output]
        start, stop = spec.start, spec.stop
        out = src if start == 0 and stop == src.shape[0] else src[start:stop]
        return out.detach() if spec.detach else out
    if kind is Index:
        src = store[spec.entry][spec.output]
        rows = spec.rows
        if rows.device != src.device:
            rows = rows.to(src.device)
        out = src.index_select(0, rows)
        return out.detach() if spec.detach else out
    if kind is Values:
        t = spec.tensor
        return t if spec.device is None or t.device == spec.device else t.to(spec.device)
    if kind is Stacked:
        values = spec.tensors
        return torch.stack(values) if len(values) > 1 else values[0].unsqueeze(0)
    joined = torch.cat([gather(part, store) for part in spec.parts])
    order = spec.order
    if order is None:
        return joined
    return joined.index_select(0, order if order.device == joined.device
                               else order.to(joined.device))


def gather_inputs(step, store: list) -> list:
    """The batched value of every input of a step, in input order, then its extras."""
    values = [None] * len(step.sig.inputs) if step.gathers else []
    for spec, ks in step.gathers:
        value = gather(spec, store)
        if len(ks) == 1:
            values[ks[0]] = value
        else:
            for k, part in zip(ks, value.split(value.shape[0] // len(ks))):
                values[k] = part
    values.extend(step.extra)
    return values
