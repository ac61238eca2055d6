"""Counters and timings of a run, behind ``db.stats()`` (the last run of this thread): the
totals, a row per signature (``table()``) and the order the batches ran in (``plot()``).

``DYNBATCH_DEBUG=1`` in the environment prints every batch as it runs (execute.py).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .errors import RawSite, Site

# how a signature's batches ran, as the table says it
HOW = {"rule": "direct rule", "block": "block", "compiled": "compiled block", "vmap": "vmap",
       "loop": "per example", "ragged": "across lengths"}


@dataclass
class SignatureRow:
    """One signature of a run: ``name`` (the op or block), ``kind`` ("op", "block", ...),
    ``how`` it ran (a key of ``HOW``; "loop" when any of its batches ran one example at
    a time), ``site`` (the user's line that first recorded it), its ``nodes``, ``batches``
    and ``seconds`` (gathering its inputs and its batched calls)."""

    name: str
    kind: str
    how: str
    site: RawSite | Site | None
    nodes: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def where(self) -> str:
        """'file.py:57 in function' (the path relative to the working directory when the
        file lies under it), or '?' when dynbatch saw no user frame."""
        site = self.site if isinstance(self.site, Site) else Site.of(self.site)
        if site is None:
            return "?"
        path = site.filename
        try:
            rel = os.path.relpath(path)
            path = rel if not rel.startswith("..") else path
        except ValueError:      # another drive (Windows)
            pass
        return f"{path}:{site.lineno} in {site.function}"


@dataclass
class Stats:
    """The last finished run of this thread. ``nodes``: calls recorded; ``batches``:
    batched calls launched; ``fallbacks``: nodes run one example at a time;
    ``vmap_batches``: batches that went through torch.func.vmap; ``rounds``: times the
    examples were suspended at reads of values and resumed; ``signatures``: distinct
    signatures among the batches run; ``free_lists_s``: emptying the interpreter's free
    lists at the close of a large run (session.py); times in seconds.

    ``rows()``: a ``SignatureRow`` per signature run; ``timeline``: per batch in execution
    order, (its row's index in ``rows()``, nodes); ``reads``: for each suspension at a read,
    the number of batches run before it."""

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
    timeline: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    # id(signature) -> (row index, row); ids stay unique while the run holds its
    # signatures, and the rows hold no signature, so the stats keep no model alive
    _rows: dict = field(default_factory=dict, repr=False)

    def count(self, sig, nodes: int, seconds: float, per_example: bool, site,
              ragged: bool = False) -> None:
        """A batch of ``nodes`` nodes of ``sig`` ran (execute.py); ``site``: the user's
        line that recorded its first node (None: where ``sig`` was first recorded).
        ``ragged``: nodes of ``sig``'s family, of several lengths, ran as one call; they
        count in one row per family."""
        key = id(sig.family) if ragged and sig.family is not None else id(sig)
        entry = self._rows.get(key)
        if entry is None:
            entry = self._rows[key] = (len(self._rows), SignatureRow(
                sig.name, sig.kind, "ragged" if ragged else sig.how,
                site if site is not None else sig.site))
        index, row = entry
        row.nodes += nodes
        row.batches += 1
        row.seconds += seconds
        if per_example:
            row.how = "loop"
        self.timeline.append((index, nodes))

    def rows(self) -> list[SignatureRow]:
        """The signatures run, in the order their first batch ran."""
        return [row for _, row in self._rows.values()]

    def table(self) -> str:
        """A row per signature, the most time first: how it ran, where it was recorded,
        nodes, batches, milliseconds::

            print(db.stats().table())
        """
        rows = sorted(self.rows(), key=lambda r: -r.seconds)
        total = sum(r.seconds for r in rows) or 1.0
        head = ("    ms   share  batches    nodes  per batch  how             signature",
                f"{'':61s}recorded at")
        lines = [str(self), "", *head]
        for r in rows:
            lines.append(f"{r.seconds * 1e3:6.1f} {100 * r.seconds / total:6.1f}% "
                         f"{r.batches:8d} {r.nodes:8d} {r.nodes / r.batches:10.1f}  "
                         f"{HOW.get(r.how, r.how):15s} {r.name}")
            lines.append(f"{'':61s}{r.where}")
        if not rows:
            lines.append("(no batch ran)")
        return "\n".join(lines)

    def plot(self, path, title: str | None = None):
        """Write a picture of the run's schedule to ``path`` (PNG, or any format
        matplotlib knows by the suffix): a row per signature, batches left to right in
        execution order, each coloured by its nodes, reads of values marked. Needs
        matplotlib (``pip install matplotlib``); returns the figure."""
        from .picture import schedule_figure    # matplotlib only when asked for
        # 'Linear (block) tree_lstm.py:39': one module's calls at two lines are two rows
        labels = [f"{r.name} ({HOW.get(r.how, r.how)}) "
                  f"{os.path.basename(r.where.split(' in ')[0])}" for r in self.rows()]
        fig = schedule_figure(labels, self.timeline, self.reads, title or (
            f"dynbatch schedule ({self.strategy}): {self.nodes} nodes of "
            f"{self.examples} examples in {self.batches} batches"))
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig

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
