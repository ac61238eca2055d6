"""Counters and timings of a run, behind ``db.stats()`` (the last run of this thread).

``DYNBATCH_DEBUG=1`` in the environment prints every batch as it runs (execute.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Stats:
    """The last finished run of this thread. ``nodes``: calls recorded; ``batches``:
    batched calls launched; ``fallbacks``: nodes run one example at a time;
    ``vmap_batches``: batches that went through torch.func.vmap; ``rounds``: times the
    examples were suspended at reads of values and resumed; ``signatures``: distinct
    signatures among the batches run; ``free_lists_s``: emptying the interpreter's free
    lists at the close of a large run (session.py); times in seconds."""

    strategy: str = ""
    examples: int = 0
    nodes: int = 0
    batches: int = 0
    fallbacks: int = 0
    vmap_batches: int = 0
    trace_s: float = 0.0
    schedule_s: float = 0.0
    execute_s: float = 0.0
    free_lists_s: float = 0.0
    signatures: int = 0
    rounds: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def nodes_per_batch(self) -> float:
        return self.nodes / self.batches if self.batches else 0.0

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.nodes} nodes in {self.batches} batches "
                f"({self.nodes_per_batch:.1f} per batch; {self.fallbacks} per-example "
                f"fallbacks, {self.vmap_batches} vmap) trace {self.trace_s * 1e3:.1f} ms, "
                f"schedule {self.schedule_s * 1e3:.1f} ms, execute {self.execute_s * 1e3:.1f} ms" +
                (f", free lists {self.free_lists_s * 1e3:.1f} ms" if self.free_lists_s else ""))


class _Last(threading.local):
    stats = Stats()


_last = _Last()


def last() -> Stats:
    return _last.stats


def publish(stats: Stats) -> None:
    _last.stats = stats
