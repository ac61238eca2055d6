"""Batching rules: how a recorded call runs for a whole batch. One table, one place.

NOTE [batch dim]: every per-example tensor arrives stacked on dim 0; shared values arrive
as they are. A rule reads a call in canonical form (``Call``: the canonical callable and
its arguments by canonical name, ``normalize.py``), decides once per signature, and
returns the batched call as a function of the filled canonical arguments, or None to
decline. Declined and unnormalized calls run through ``torch.func.vmap``, which defines
the semantics of batching; when vmap cannot batch a call either, the batch runs one
example at a time (``fallback.py``), counted and warned at the user's line.
"""
from . import indexing, losses, table  # noqa: F401  (each registers its rules)
from .registry import RULES, Batched, Call, Rule, register, rule_for

__all__ = ["RULES", "Batched", "Call", "Rule", "register", "rule_for"]
