"""Node, Constant and Graph: the recorded program of one run, as plain data.

Invariants of a Graph:
- ``nodes`` are in recording order, a topological order: every input of a node was
  recorded before it; ``node.id`` is its position.
- A node's ``inputs`` are node ids (>= 0) or constant ids (< 0, ``~k`` for
  ``constants[k]``); ``outs``, when not None, says which output of each input it reads
  (else the first output of each).
- A node keeps no arguments: its signature's template holds every argument that is not a
  per-example tensor (the signature key names them all), and ``inputs`` say where the
  per-example ones come from.
- Each node belongs to one example (or to none, in an autobatch scope), which the graph
  knows from the ids at which each example started or resumed recording (``example_of``).
- Nodes point to their inputs only, never to their users, so a finished run is freed by
  reference counting alone.
"""
from __future__ import annotations

import bisect

import torch

from .errors import Site


class Node:
    """One recorded call: ``inputs``, the ids of the nodes (or constants, negative) it
    reads; ``outs``, which output of each it reads (None: output 0 of every one; made by
    ``outs_of``). Where its value lies once computed is the graph's to say
    (``Graph.batch_of``, ``Graph.row_of``)."""

    __slots__ = ("id", "sig", "inputs", "outs", "site", "owner")

    def __init__(self, id: int, sig, inputs: tuple, outs, site, owner):
        self.id = id
        self.sig = sig
        self.inputs = inputs
        self.outs = outs
        self.site = site
        self.owner = owner

    def input_refs(self) -> list[tuple[int, int]]:
        """(input id, output index) of each input."""
        outs = self.outs or (0,) * len(self.inputs)
        return list(zip(self.inputs, outs))

    def __repr__(self) -> str:
        ins = ", ".join(f"%{i}" if i >= 0 else f"$c{~i}" for i in self.inputs)
        return f"%{self.id} = {self.sig.name}({ins})"


# A large run holds every node at once (memory peaks when it is scheduled), and the
# ``outs`` tuples other than None repeat (a cell's c is output 1 of every cell): one shared
# object per distinct tuple.
_OUTS: dict = {}
_OUTS_LIMIT = 4096


def outs_of(outs: tuple) -> tuple | None:
    """A node's ``outs``: None when every input is read at output 0, else one shared
    tuple per distinct value."""
    if not any(outs):
        return None
    shared = _OUTS.get(outs)
    if shared is None:
        if len(_OUTS) >= _OUTS_LIMIT:
            return outs
        shared = _OUTS[outs] = outs
    return shared


class Constant:
    """Per-example data that needs no computing: a Python scalar made a tensor by
    ``torch.tensor(word_id)`` (kept as the scalar; one tensor is made for a whole column
    when a batch gathers it), or a tensor made inside the per-example code that a recorded
    call reads. Constants are not scheduled; readers name them by a negative id."""

    __slots__ = ("id", "value", "meta", "owner")

    def __init__(self, id: int, value, meta, owner):
        self.id = id
        self.value = value
        self.meta = meta
        self.owner = owner

    def as_tensor(self) -> torch.Tensor:
        if isinstance(self.value, torch.Tensor):
            return self.value
        with torch._C.DisableTorchFunction():
            return torch.tensor(self.value, dtype=self.meta.dtype, device=self.meta.device)

    def __repr__(self) -> str:
        return f"$c{~self.id} = {self.value!r}"


class Graph:
    """The nodes and constants of one run, and where each node's value lies once it is
    computed: ``batch_of[id]``, the number of the batch that computed it in the run's store
    of batch outputs (None while pending), and ``row_of[id]``, its row there (NOTE [batch
    dim]: dim 0 of every batched tensor is the batch). Every node before ``first_pending``
    has run; after it nodes run when a result or a read needs them, so executed and
    pending nodes may interleave there."""

    __slots__ = ("nodes", "constants", "first_pending", "batch_of", "row_of", "_starts",
                 "_examples")

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.constants: list[Constant] = []
        self.first_pending = 0
        self.batch_of: list[int | None] = []
        self.row_of: list[int | None] = []
        self._starts: list[int] = []
        self._examples: list[int | None] = []

    def placed(self) -> None:
        """Make ``batch_of`` and ``row_of`` as long as ``nodes`` (new nodes: pending)."""
        missing = len(self.nodes) - len(self.batch_of)
        if missing > 0:
            self.batch_of.extend([None] * missing)
            self.row_of.extend([None] * missing)

    def computed(self, node_id: int) -> bool:
        return node_id < len(self.batch_of) and self.batch_of[node_id] is not None

    def begin_example(self, example: int | None) -> None:
        """Nodes recorded from now on belong to ``example``."""
        self._starts.append(len(self.nodes))
        self._examples.append(example)

    def example_of(self, node_id: int) -> int | None:
        k = bisect.bisect_right(self._starts, node_id) - 1
        return self._examples[k] if k >= 0 else None

    def pending(self) -> list[Node]:
        return [n for n in self.nodes[self.first_pending:] if not self.computed(n.id)]

    def lint(self) -> None:
        """Check the invariants above; raises AssertionError naming the first broken node."""
        for pos, node in enumerate(self.nodes):
            assert node.id == pos, f"{node!r}: id {node.id} at position {pos}"
            assert type(node.inputs) is tuple, f"{node!r}: inputs {node.inputs!r}"
            assert node.outs is None or len(node.outs) == len(node.inputs), f"{node!r}"
            for k, (i, out) in enumerate(node.input_refs()):
                if i < 0:
                    assert ~i < len(self.constants), f"{node!r} reads a missing constant"
                    continue
                assert i < node.id, f"{node!r} uses %{i}, recorded after it"
                source = self.nodes[i]
                assert source.owner is node.owner, f"{node!r} uses %{i} of another run"
                assert out < len(source.sig.outputs), f"{node!r} reads output {out} of %{i}"
                expected = node.sig.inputs[0 if node.sig.fused is not None else k]
                assert source.sig.outputs[out] is expected, \
                    f"{node!r}: input {k} is not what %{i} makes"
            if pos < self.first_pending:
                assert self.computed(pos), f"{node!r} before first_pending has no value"

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        lines = []
        for node in self.nodes:
            site = Site.of(node.site)
            lines.append(f"{node!r}  # examples[{self.example_of(node.id)}]" +
                         (f" {site.filename}:{site.lineno}" if site else ""))
        return "\n".join(lines)
