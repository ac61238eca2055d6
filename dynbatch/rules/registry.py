"""The registry of batching rules: the canonical form of a call a rule reads (``Call``) and
the one table from normalization keys to rules (NOTE [batch dim] in ``__init__.py``).
"""
from __future__ import annotations

from collections.abc import Callable

from ..lazy import Input, TensorMeta

Batched = Callable[[dict], object]      # filled canonical kwargs -> batched output(s)


class Call:
    """A recorded call in canonical form: ``target(**kwargs)`` for one example, where
    ``kwargs`` holds an ``Input`` marker for each per-example tensor (at top level or in a
    list) and shared values as they are; ``outputs``: the metas of its outputs."""

    __slots__ = ("fn", "target", "kwargs", "outputs")

    def __init__(self, fn, target, kwargs: dict, outputs: tuple[TensorMeta, ...]):
        self.fn, self.target, self.kwargs, self.outputs = fn, target, kwargs, outputs

    def meta(self, name: str) -> TensorMeta | None:
        """The meta of the per-example tensor passed as ``name``, or None."""
        value = self.kwargs.get(name)
        return value.meta if type(value) is Input else None

    def per_example(self) -> set[str]:
        """The names whose value is, or holds, a per-example tensor."""
        names = set()
        for name, value in self.kwargs.items():
            if type(value) is Input or (type(value) in (list, tuple) and
                                        any(type(v) is Input for v in value)):
                names.add(name)
        return names

    def only(self, *names: str) -> bool:
        """Whether the per-example tensors are exactly at ``names``."""
        return self.per_example() == set(names)


Rule = Callable[[Call], Batched | None]
RULES: dict = {}


def register(rule: Rule, *keys) -> None:
    """``rule`` batches calls whose normalization key (the torch function a Tensor method is
    bound to, else the callable itself) is among ``keys``."""
    for key in keys:
        if key is None:
            continue
        assert RULES.get(key, rule) is rule, f"two batching rules for {key!r}"
        RULES[key] = rule


def rule_for(key) -> Rule | None:
    return RULES.get(key)

