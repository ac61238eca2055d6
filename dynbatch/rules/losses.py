"""Loss rules: class losses (cross entropy, nll) over each example's logits, and pointwise
losses, computed with reduction='none' for the whole batch, then reduced per example as
PyTorch reduces one example's losses.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..lazy import Input
from .registry import Call, register
from .table import elementwise


def class_loss(call: Call):
    """F.cross_entropy / F.nll_loss of one example's logits [C] (or [N, C]) and class
    targets [] (or [N]): batched, logits [B * N, C] and targets [B * N] with
    reduction='none'; 'mean' over one example divides by its targets' total class weight
    (nan when every target is ignored), 'sum' sums its N losses, as PyTorch does."""
    kw0 = call.kwargs
    logits, target = kw0["input"], kw0["target"]
    if type(logits) is not Input or len(logits.meta.shape) not in (1, 2):
        return None
    rows = () if len(logits.meta.shape) == 1 else (logits.meta.shape[0],)
    if type(target) is Input:
        if tuple(target.meta.shape) != rows or target.meta.dtype.is_floating_point:
            return None
    elif not isinstance(target, Tensor) or tuple(target.shape) != rows or \
            target.is_floating_point():
        return None
    if kw0.get("size_average") is not None or kw0.get("reduce") is not None:
        return None
    if isinstance(kw0.get("weight"), Input) or (kw0.get("label_smoothing") and
                                               kw0.get("weight") is not None):
        return None
    reduction = kw0["reduction"]
    if reduction not in ("none", "mean", "sum"):
        return None
    fn = call.target
    per_example_target = type(target) is Input
    classes = logits.meta.shape[-1]

    def run(kw):
        x, y = kw["input"], kw["target"]
        b = x.shape[0]
        if not per_example_target:
            y = y.expand(b, *y.shape)
        kw["input"], kw["target"] = x.reshape(-1, classes), y.reshape(-1)
        kw["reduction"] = "none"
        loss = fn(**kw).reshape(b, *rows)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum(1) if rows else loss
        keep = (y != kw["ignore_index"]).to(loss.dtype)
        weight = kw["weight"]
        if weight is not None:
            keep = keep * weight[y.clamp(0, weight.shape[0] - 1)]
        return (loss.sum(1) / keep.sum(1)) if rows else loss / keep
    return run


register(class_loss, F.cross_entropy, F.nll_loss)


def pointwise_loss(call: Call):
    """mse / l1 / smooth-l1 / huber losses: elementwise with reduction='none', then each
    example's mean or sum over its own elements."""
    if call.per_example() - {"input", "target"} or "input" not in call.per_example():
        return None
    if call.kwargs.get("size_average") is not None or call.kwargs.get("reduce") is not None:
        return None
    reduction = call.kwargs.get("reduction")
    if reduction not in ("none", "mean", "sum"):
        return None
    inner = elementwise(Call(call.fn, call.target, dict(call.kwargs, reduction="none"),
                             call.outputs))
    if inner is None:
        return None
    # a shared target of the input's shape takes the batch dim, so that the shapes agree
    # as they do for one example (torch warns when a loss's shapes differ)
    target = call.kwargs["target"]
    grow = isinstance(target, Tensor) and tuple(target.shape) == tuple(call.meta("input").shape)

    def run(kw):
        kw["reduction"] = "none"
        if grow:
            kw["target"] = kw["target"].expand(kw["input"].shape)
        out = inner(kw)
        if reduction == "none":
            return out
        flat = out.reshape(out.shape[0], -1)
        return flat.mean(1) if reduction == "mean" else flat.sum(1)
    return run


register(pointwise_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
