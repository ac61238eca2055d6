"""Node and Graph: the recorded program of one run, as plain data.

Invariants of a Graph: nodes are in recording order, which is a topological order (a node's
inputs were recorded before it); ``node.id`` is its position; ``node.depth`` is one more than
the largest depth among its inputs (0 for constants), an immediate among its arguments
counting as depth 0 even where ``inputs`` leaves it out (NOTE [block edges] in blocks.py);
every node belongs to one example (or to none in the autobatch scope), which its run knows
(``Run.example_of``; NOTE [lean nodes]). Nodes point to their inputs only, never to their
users, so a finished run is freed by reference counting alone.
"""
from __future__ import annotations

from .errors import Site


class Node:
    """One recorded call. ``fn(*args, **kwargs)`` with lazy tensors among the args;
    ``inputs`` are the ids of the nodes those lazy tensors come from (-1 for an immediate),
    one entry per lazy argument, except that a block node lists a repeated node once and
    no immediates (NOTE [block edges]); a tuple, or the id itself where there is one
    (NOTE [one input]; ``input_ids`` and ``input_id`` read either).

    After execution ``batch`` holds the tuple of batched outputs of the call that computed
    it and ``row`` its row in them (NOTE [batch dim]: dim 0 of every batched tensor is the
    batch; row i belongs to the i-th node of that batch); ``execute.FREED`` once nothing
    can read them any more (NOTE [freeing] in execute.py).

    NOTE [indexed plain nodes]: a plain node (NOTE [plain nodes] in trace.py) may read a
    later output of an input (``sigmoid(f)`` where ``i, f, o, u = gates.chunk(4)``): until
    it runs, its ``row`` holds the output index each input is read at, 4 bits each (the
    k-th input's at bits 4k..4k+3; -1 or 0: all first outputs), and its signature is
    marked ``indexed``. It keeps no argument tuple and no lazy tensor: per-op SST at B=256
    traced 252 bytes a node before, 228 after (``python benchmarks/time_split.py --profile
    --impl dynbatch-agenda --batch 256 --minibatches 1``, git 93691f2 and 2d265bb).
    ``input_index`` reads it.

    NOTE [lean nodes]: a node's function is its signature's and it has no keywords, but
    for the few that are a ``CallNode``: 112 bytes a node instead of 128 (sys.getsizeof;
    test_lean_nodes_take_their_function_from_the_signature). Per-op SST at B=256 traced 279
    bytes a node before, 263 after (the command above, git 0801352 and 7d83710). A plain
    node keeps no argument tuple, so ``Node`` has no slot for one (``args`` reads the
    class's None; an ``ArgsNode`` keeps them), and no node keeps the index of its example:
    the run notes the node id at which each example starts or resumes
    (``Run.example_of``). A Node is then 96 bytes; Python rounds objects to 16 bytes, so
    one slot fewer would have saved nothing. 85% of per-op SST nodes are plain: traced
    229 bytes a node before (git a4819b8), 214 after (the command above).

    NOTE [one input]: most nodes read one input (``tanh(x)``, ``self.W(x)``, ``x * 2.0``),
    and a one-item tuple of its id costs 48 bytes more than the id alone. So ``inputs``
    is the id itself for those, a tuple otherwise (``packed`` makes either from a list);
    readers go through ``input_ids`` and ``input_id``, and the scheduler takes either per
    node. Per-op SST at B=256: 214 bytes a node traced before, 187 after (the command
    above; python benchmarks/memory_phases.py: traced +20.8 -> +17.0 MB, the step's peak
    +75.2 -> +72.2).
    """

    __slots__ = ("id", "info", "inputs", "depth", "site", "owner", "batch", "row")
    args = None         # NOTE [plain nodes]: read from the signature's template
    kwargs = None

    def __init__(self, id, info, inputs, depth, site, owner):
        self.id = id
        self.info = info
        self.inputs = inputs
        self.depth = depth
        self.site = site
        self.owner = owner
        self.batch = None
        self.row = -1

    @property
    def example(self) -> int | None:
        """The index of the example whose code recorded the node (``Run.example_of``)."""
        return self.owner.example_of(self.id)

    @property
    def fn(self):
        return self.info.fn

    @property
    def executed(self) -> bool:
        return self.batch is not None

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or getattr(self.fn, "__name__", None)
        name = name or type(self.fn).__name__
        ins = ", ".join(f"%{i}" for i in input_ids(self))
        return f"%{self.id} = {name}({ins})  # examples[{self.example}] depth {self.depth}"


def packed(ids) -> int | tuple:
    """A node's ``inputs`` from a sequence of input ids (NOTE [one input])."""
    return ids[0] if len(ids) == 1 else tuple(ids)


def input_ids(node) -> tuple:
    """The ids of a node's inputs as a tuple (NOTE [one input])."""
    ins = node.inputs
    return (ins,) if type(ins) is int else ins


def input_id(node, k: int) -> int:
    """The id of a node's k-th input (NOTE [one input])."""
    ins = node.inputs
    return ins if type(ins) is int else ins[k]


def input_index(node, k: int) -> int:
    """The output of its k-th input a pending plain node reads (NOTE [indexed plain
    nodes])."""
    row = node.row
    return (row >> (4 * k)) & 15 if row > 0 else 0


class ArgsNode(Node):
    """A node that keeps its arguments (NOTE [lean nodes]): one not plain (NOTE [plain
    nodes] in trace.py), or a constant's, whose argument is its value."""

    __slots__ = ("args",)

    def __init__(self, id, args, info, inputs, depth, site, owner):
        Node.__init__(self, id, info, inputs, depth, site, owner)
        self.args = args


class CallNode(ArgsNode):
    """A node whose function is not its signature's, or that has keywords (NOTE [lean
    nodes]): a block body's argument placeholder, a call with keywords."""

    __slots__ = ("fn", "kwargs")

    def __init__(self, id, fn, args, kwargs, info, inputs, depth, site, owner):
        ArgsNode.__init__(self, id, args, info, inputs, depth, site, owner)
        self.fn = fn
        self.kwargs = kwargs


def make_node(id, fn, args, kwargs, info, inputs, depth, site, owner) -> Node:
    """The leanest node a recorded call can be (NOTE [lean nodes]); ``inputs`` an id or a
    sequence of them (NOTE [one input])."""
    if type(inputs) is not int:
        inputs = packed(inputs)
    if kwargs or fn is not info.fn:     # kwargs or None: not a fresh empty dict (64 bytes)
        return CallNode(id, fn, args, kwargs or None, info, inputs, depth, site, owner)
    if args is None:
        return Node(id, info, inputs, depth, site, owner)
    return ArgsNode(id, args, info, inputs, depth, site, owner)


class Immediate:
    """A Python scalar made a tensor by ``torch.tensor(word_id)`` in per-example code.

    NOTE [immediates]: the commonest per-example data is not a node of the graph. It has
    no inputs and nothing to schedule, so it takes no part in scheduling; the nodes that
    read it list the id -1 among their inputs (ignored as "already computed"). Its value
    is made when a batch first gathers it: one ``torch.tensor`` for every immediate of
    that gather (execute.fill_immediates); a column of nothing but such fresh immediates
    (a batch's word ids, its labels) becomes that tensor without the immediates keeping
    rows in it, and a later reader fills its own. Inside a block's body trace, constants stay
    ordinary nodes (the body compiler names values by node id).

    NOTE [shared immediates]: a run makes one lazy tensor per int it meets in
    ``torch.tensor(i)`` and hands it to every such call: a minibatch of 64 SST trees makes
    4,187 such calls on some 900 words and 5 labels. They are immutable constants (in-place
    ops on per-example tensors are refused), so sharing cannot change a value; a gather
    makes a column of them from their Python values whether or not some were filled, and
    a result gets a tensor of its own (``execute.materialize``), as eager's results do.
    Only ``.value`` read inside the run is one tensor for equal calls: an in-place change
    to it there is seen by both."""

    __slots__ = ("args", "info", "example", "owner", "batch", "row")
    id = -1
    depth = 0
    inputs = ()
    kwargs = None
    site = None

    def __init__(self, value, info, example, owner):
        self.args = (value,)
        self.info = info
        self.example = example
        self.owner = owner
        self.batch = None
        self.row = -1

    @property
    def fn(self):
        return self.info.fn

    @property
    def executed(self) -> bool:
        return self.batch is not None

    def __repr__(self) -> str:
        return f"%imm = tensor({self.args[0]!r})  # examples[{self.example}]"


class Graph:
    """The nodes of one run. Every node before ``first_pending`` has run; after it, nodes
    run when a result or a read needs them (NOTE [dead code] in execute.py), so executed
    and pending nodes may interleave there (``ragged``)."""

    __slots__ = ("nodes", "first_pending", "ragged")

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.first_pending = 0
        self.ragged = False     # some node after first_pending has run (after a read)

    def pending(self) -> list[Node]:
        return [n for n in self.nodes[self.first_pending:] if n.batch is None]

    def lint(self) -> None:
        """Check the invariants above; raises AssertionError naming the first broken node."""
        for pos, node in enumerate(self.nodes):
            assert node.id == pos, f"{node!r}: id {node.id} at position {pos}"
            depth = 0
            for i in input_ids(node):
                if i < 0:       # an immediate (NOTE [immediates]): depth 0, no node
                    depth = max(depth, 1)
                    continue
                assert i < node.id, f"{node!r} uses %{i}, recorded after it"
                inp = self.nodes[i]
                assert inp.owner is node.owner, f"{node!r} uses %{i} of another run"
                depth = max(depth, inp.depth + 1)
            if depth == 0 and node.depth == 1 and _may_read_an_immediate(node):
                depth = 1       # NOTE [block edges]
            assert node.depth == depth, f"{node!r}: depth {node.depth}, expected {depth}"
            if pos < self.first_pending:
                assert node.batch is not None, f"{node!r} before first_pending has no value"

    def __len__(self) -> int:
        return len(self.nodes)

    def __str__(self) -> str:
        lines = []
        for node in self.nodes:
            site = Site.of(node.site)
            lines.append(f"{node!r}" + (f"  ({site.filename}:{site.lineno})" if site else ""))
        return "\n".join(lines)


def _may_read_an_immediate(node) -> bool:
    """Whether a node's arguments hold an immediate (a block node does not list them), or
    may have: an executed node's arguments are dropped (execute._store)."""
    if node.args is None:
        return node.batch is not None
    items = []
    for a in node.args:
        items.extend(a if type(a) in (tuple, list) else (a,))
    return any(type(getattr(x, "node", None)) is Immediate for x in items)
