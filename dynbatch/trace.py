"""Recording: torch calls on per-example data become nodes of the current run's Graph.

Which tensors are per-example: lazy tensors, the tensors found in an example, and every
tensor made inside the traced code from no lazy input (``torch.tensor(word_id)``,
``torch.zeros(h)``, ``table[i]``), which becomes a constant node (a Python scalar made a
tensor is an immediate, not even a node: NOTE [immediates] in graph.py). Everything else
reached from outside (parameters, buffers, tables) is shared and passed to batched calls
as is.

``record(fn, args, kwargs)`` is the hot path: one signature key, one dict lookup, one Node;
a line that repeats its last call skips the key (NOTE [op sites]). What a new key needs
(output shapes, rule) is worked out once, in infer.py; a sum of a stack is recorded as
one rewritten node (NOTE [stacked sums] in fusion.py). The run's
TorchFunctionMode, and the wrappers of the hottest torch functions, send every torch call
made by the traced code here.
"""
from __future__ import annotations

import bisect
import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from . import infer as _infer
from . import lazy, rules
from .errors import (BlockError, MixedRunError, UnsupportedError, line_of,
                     raw_site, where)
from .errors import _is_internal_file as _internal_files
from .fusion import match_stacked_sum, stacked_sum
from sys import _getframe
from .graph import ArgsNode, CallNode, Graph, Immediate, Node, make_node
from .lazy import LazyTensor, map_lazy
from .signature import BLOCK, CONST, OP, Signature, signature_key
from .signature import _is_grad_enabled, _is_inference
from .signature import GLOBAL_SIGNATURES as _GLOBAL_SIGNATURES

try:
    from greenlet import getcurrent as _getcurrent
except ImportError:
    _getcurrent = None

Tensor = torch.Tensor
_DisableTorchFunction = torch._C.DisableTorchFunction

_current = None                     # the Run recording now, or None

# Reading a value: these force their lazy inputs and run eagerly on the values.
_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
          Tensor.__index__, Tensor.numpy, torch.equal, torch.allclose, Tensor.equal,
          Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero, Tensor.__len__,
          Tensor.__array__, Tensor.__format__, Tensor.__repr__, Tensor.__str__,
          Tensor.__reduce_ex__, Tensor.__deepcopy__, Tensor.__iter__}
# Output shape depends on the data: cannot batch; they run per example on forced values.
_DATA_DEPENDENT = {torch.nonzero, Tensor.nonzero, torch.masked_select, Tensor.masked_select,
                   torch.unique, Tensor.unique, torch.unique_consecutive,
                   Tensor.unique_consecutive, torch.argwhere, Tensor.argwhere,
                   torch.repeat_interleave, Tensor.repeat_interleave, torch.bincount,
                   Tensor.bincount, torch.histc, Tensor.histc, torch.multinomial,
                   Tensor.multinomial, torch.nonzero_static}
# Torch calls that only read metadata: answered from the tkey, never recorded.
_METADATA = {Tensor.dim, Tensor.size, Tensor.numel, Tensor.is_floating_point,
             Tensor.is_complex, Tensor.__len__, torch.numel, Tensor.ndimension,
             Tensor.nelement, Tensor.element_size, Tensor.is_contiguous, Tensor.get_device,
             Tensor.data_ptr, Tensor.stride, Tensor.storage_offset}


# NOTE [identity dropout]: a dropout that drops nothing (p == 0, or not training: every
# dropout of a model in eval mode) returns its very input in eager PyTorch, the same
# object. So it records no node: the input comes back as it is. A Tree-LSTM's per-node
# loss reads its h through a dropout; at p == 0 that is 2,800 nodes of 41,600 in an SST
# training minibatch of 64 trees. {function: (default of training, name of training)}
_DROPOUTS = {torch.nn.functional.dropout: (True, "training"),
             torch.nn.functional.alpha_dropout: (False, "training"),
             torch.dropout: (True, "train"), torch.alpha_dropout: (True, "train")}
_SPECIAL = _METADATA | _READS | _DATA_DEPENDENT | set(_DROPOUTS)
_ATTRIBUTE_GETTERS = {getattr(Tensor, name).__get__ for name in (
    "shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "grad",
    "is_leaf", "data", "T", "mT", "names") if hasattr(getattr(Tensor, name, None), "__get__")}


class Run:
    """One @batched call or autobatch scope: the graph being recorded and its lifecycle."""

    __slots__ = ("graph", "strategy", "_example", "example_starts", "example_ids",
                 "local_signatures", "closed", "failed",
                 "stats", "block_trace", "main", "rounds", "default_device", "wanted", "scope",
                 "inference", "int_scalar", "int_immediates", "signatures_run", "templates",
                 "block_sites", "op_sites", "__weakref__")

    def __init__(self, strategy: str, block_trace: bool = False):
        self.graph = Graph()
        self.strategy = strategy
        self._example: int | None = None
        # node ids at which run.example changed, and the example from each on: a node's
        # example without a slot in every node (NOTE [lean nodes] in graph.py)
        self.example_starts: list = []
        self.example_ids: list = []
        self.local_signatures: dict = {}
        self.closed = False
        self.failed = False
        self.stats = None
        self.block_trace = block_trace
        self.main = None          # the scheduling greenlet while examples run as greenlets
        self.rounds = 0           # times examples were suspended at a read and resumed
        self.default_device = _default_device()   # looked up once: it costs ~10 us
        self.wanted: list = []    # nodes the suspended examples are waiting to read
        self.scope = False        # an autobatch scope (else a @batched call)
        self.inference = torch.is_inference_mode_enabled()   # the caller's
        self.int_scalar = _scalar_signature(_PY_SCALAR_DTYPE[int], self.default_device)
        self.int_immediates: dict = {}   # int -> its lazy tensor (NOTE [shared immediates])
        self.signatures_run: set = set()   # distinct signatures of the batches run
        # Signature -> args of its first node (NOTE [plain nodes]); (Signature, _KWARGS) ->
        # the keywords its nodes share (append_node)
        self.templates: dict = {}
        self.block_sites: dict = {}   # id(code) -> (code, {offset: last block call there})
        self.op_sites: dict = {}      # id(code) -> {offset: last op call there} (NOTE [op sites])

    @property
    def example(self) -> int | None:
        """The index of the example whose code runs now (None in a scope)."""
        return self._example

    @example.setter
    def example(self, index: int | None) -> None:
        self._example = index
        self.example_starts.append(len(self.graph.nodes))
        self.example_ids.append(index)

    def example_of(self, node_id: int) -> int | None:
        """The example that recorded node ``node_id`` of this run's graph."""
        k = bisect.bisect_right(self.example_starts, node_id) - 1
        return self.example_ids[k] if k >= 0 else None


def current_run():
    return _current


@contextlib.contextmanager
def recording(run: Run):
    """Make ``run`` the current run; route torch calls to it; restore everything after."""
    global _current
    previous = _current
    _current = run
    mode = _Mode()
    from . import blocks
    blocks.install()
    _patch_hot_functions()
    try:
        with mode:
            yield run
    finally:
        _current = previous
        _unpatch_hot_functions()
        blocks.uninstall()


@contextlib.contextmanager
def switched_to(run):
    """Record into ``run`` (a block's body trace) without touching the mode or patches."""
    global _current
    previous = _current
    _current = run
    try:
        yield run
    finally:
        _current = previous


# NOTE [hot functions]: a torch function reaches the mode through torch's override machinery
# at about 2-5 us a call, more than recording it costs. While a run records, the functions
# per-example code calls most often are replaced in their modules by thin wrappers that go
# straight to ``dispatch`` (torch.fx patches functions the same way). A wrapper does exactly
# what the mode would: only when the mode is active in this thread, so dynbatch's own calls
# (made under DisableTorchFunction) and other threads get the original function.
_HOT = {
    torch: ["tensor", "cat", "stack", "sigmoid", "tanh", "relu", "exp", "log", "matmul",
            "zeros", "ones", "zeros_like", "ones_like", "where", "clamp", "softmax",
            "log_softmax", "chunk", "split", "mm", "mul", "add", "sum", "mean", "max",
            "maximum", "minimum", "abs", "sqrt", "full", "arange", "concat", "unbind"],
    torch.nn.functional: ["linear", "embedding", "cross_entropy", "nll_loss", "relu",
                          "dropout", "log_softmax", "softmax", "layer_norm", "gelu", "silu",
                          "leaky_relu", "elu", "softplus", "pad", "normalize", "mse_loss"],
}
_hot_originals: list = []
_hot_depth = 0
_mode_enabled = torch._C._is_torch_function_mode_enabled


def _hot_wrapper(fn):
    if fn is _torch_tensor:
        return _tensor_wrapper(fn)

    def hot(*args, **kwargs):
        if _current is not None and _mode_enabled():
            return dispatch(fn, args, kwargs)
        return fn(*args, **kwargs)
    hot.__wrapped__ = fn
    hot.__name__ = getattr(fn, "__name__", "hot")
    hot.__doc__ = getattr(fn, "__doc__", None)
    return hot


def _tensor_wrapper(fn):
    """``torch.tensor(word_id)``, the commonest call of tree code, straight to an immediate
    (the same as dispatch -> _scalar_constant would make, without the detours)."""
    def tensor(*args, **kwargs):
        run = _current
        if run is not None and _mode_enabled():
            if not kwargs and len(args) == 1 and type(args[0]) is int and \
                    not run.block_trace:
                value = args[0]
                shared = run.int_immediates.get(value)    # NOTE [shared immediates]
                if shared is None:
                    info, tkey = run.int_scalar
                    shared = run.int_immediates[value] = \
                        LazyTensor(Immediate(value, info, run.example, run), 0, tkey)
                return shared
            return dispatch(fn, args, kwargs)
        return fn(*args, **kwargs)
    tensor.__wrapped__ = fn
    tensor.__name__ = "tensor"
    tensor.__doc__ = fn.__doc__
    return tensor


_HOT_WRAPPERS = None


def _patch_hot_functions() -> None:
    global _hot_depth, _HOT_WRAPPERS
    _hot_depth += 1
    if _hot_depth > 1:
        return
    if _HOT_WRAPPERS is None:
        _HOT_WRAPPERS = [(module, name, getattr(module, name), _hot_wrapper(getattr(module, name)))
                         for module, names in _HOT.items() for name in names
                         if hasattr(module, name)]
    for module, name, _, wrapper in _HOT_WRAPPERS:
        setattr(module, name, wrapper)


def _unpatch_hot_functions() -> None:
    global _hot_depth
    _hot_depth -= 1
    if _hot_depth == 0:
        for module, name, original, _ in _HOT_WRAPPERS:
            setattr(module, name, original)


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})


def dispatch(fn, args, kwargs):
    """Every torch call made while a run records comes here."""
    run = _current
    if run is None:
        return _outside_run(fn, args, kwargs)
    if fn is _torch_tensor and len(args) == 1 and type(args[0]) in _PY_SCALAR_DTYPE:
        return _scalar_constant(run, args[0], kwargs)
    if fn in _SPECIAL:
        if fn in _DROPOUTS:
            return _dropout(fn, args, kwargs)
        return _special(run, fn, args, kwargs)
    return record(fn, args, kwargs)


def record(fn, args, kwargs):
    """Record ``fn(*args, **kwargs)`` into the current run; returns lazy output(s)."""
    run = _current
    if run is None:
        return _outside_run(fn, args, kwargs)
    if (fn is _tensor_sum or fn is _torch_sum) and not run.block_trace:
        fused = match_stacked_sum(run, args, kwargs)     # NOTE [stacked sums]
        if fused is not None:
            return _append_stacked_sum(run, *fused)
    calls = None
    n_args = len(args)
    if not kwargs and 0 < n_args <= 2 and type(args[0]) is LazyTensor and \
            not run.block_trace:
        # NOTE [op sites]: this line's last call, if it was one like this, says it all
        frame = _getframe(2)
        code = frame.f_code
        if code is _HOT_CODE and frame.f_back is not None:  # through a hot-function
            frame = frame.f_back                             # wrapper: one frame more
            code = frame.f_code
        offset = frame.f_lasti
        calls = run.op_sites.get(id(code))
        if calls is not None:
            known = calls.get(offset)
            if known is not None and known[0][0] is fn:
                out = _record_as_before(run, known, fn, args, n_args)
                if out is not None:
                    return out
        elif _internal_files.get(code.co_filename) is False:
            # a site keeps its code object alive, so the id stays this code's
            calls = run.op_sites[id(code)] = {}
    key, inputs, depth, plain = signature_key(fn, args, kwargs, run)
    if not inputs:
        return _eager_constant(run, fn, args, kwargs)
    info = _GLOBAL_SIGNATURES.get(key)
    if info is None:
        info = run.local_signatures.get(key)
        if info is None:
            info = _infer.new_signature(run, fn, args, kwargs, key)
    kind = info.kind
    if kind is not OP and kind is not BLOCK:
        return _special(run, fn, args, kwargs)
    out = append_node(run, fn, args, kwargs, info, inputs, depth, plain)
    # only calls keyed by signature_key's fast path, whose key layout _record_as_before knows
    # and whose node is a plain Node (NOTE [lean nodes])
    if calls is not None and (n_args == 1 or type(args[1]) in _FAST_SECOND) and \
            info.fn is fn:
        calls[offset] = (key, info, run.graph.nodes[-1].site)
    return out


def _record_as_before(run, known, fn, args, n_args):
    """NOTE [op sites]: the commonest calls of per-op code, ``f(x)``, ``f(x, y)`` and
    ``f(x, 2.0)`` on lazy tensors, are keyed by signature_key's fast path as (fn, mode,
    x.tkey[, y.tkey | type(y), y]). Most lines of a model make the same call every time
    they run, so each line (code object, instruction offset) keeps its last such call's
    key, signature and site (``run.op_sites``). A call there whose parts are those of the
    key (tkeys by identity: they are the signatures' own tuples) has that signature: the
    key is not built and hashed, nor the site looked up. Anything else (another tkey
    object, another scalar, a lazy tensor of another run) returns None and takes the
    general path, which leaves its own call for the next one to compare against. The
    graph is the same node for node (test_op_sites_record_the_graph_the_general_path_does).
    SST128 per-op training at B=64, old and new alternating in one process: trace x0.92,
    forward x0.96 (``python benchmarks/ab.py dynbatch.trace:record --rev b89e0f4
    --impl dynbatch-agenda --rounds 4``, 2.3 us a node traced after).
    """
    key = known[0]
    a = args[0]
    if a.tkey is not key[2]:
        return None
    na = a.node
    if na.owner is not run:
        return None
    if (2 if _is_inference() else 1 if _is_grad_enabled() else 0) != key[1]:
        return None
    ia = na.id
    if n_args == 1:
        if len(key) != 3:
            return None
        inputs = ia             # NOTE [one input] in graph.py
        depth = na.depth
        indices = a.index
        plain = ia >= 0 and indices < 16
    else:
        b = args[1]
        if type(b) is LazyTensor:
            if len(key) != 4 or b.tkey is not key[3]:
                return None
            nb = b.node
            if nb.owner is not run:
                return None
            ib = nb.id
            inputs = (ia, ib)
            depth = na.depth if na.depth > nb.depth else nb.depth
            indices = a.index | b.index << 4
            plain = ia >= 0 and ib >= 0 and a.index < 16 and b.index < 16
        else:
            if len(key) != 5 or type(b) is not key[3] or b != key[4]:
                return None
            inputs = ia
            depth = na.depth
            indices = a.index
            plain = ia >= 0 and indices < 16
    info = known[1]
    nodes = run.graph.nodes
    # append_node's work, inline: calling it instead made per-op tracing 2.7% slower
    # (ab.py, the command above, against append_node taking the site)
    if plain:                   # NOTE [plain nodes], as append_node does it
        templates = run.templates
        if info not in templates:
            templates[info] = tuple(None if type(x) is LazyTensor else x for x in args)
        node = Node(len(nodes), info, inputs, depth + 1, known[2], run)
        if indices:             # NOTE [indexed plain nodes]
            node.row = indices
            info.indexed = True
    else:
        node = ArgsNode(len(nodes), args, info, inputs, depth + 1, known[2], run)
    nodes.append(node)
    structure = info.structure
    outputs = info.outputs
    if structure is None:
        return LazyTensor(node, 0, outputs[0])
    if structure is tuple and len(outputs) == 2:
        return (LazyTensor(node, 0, outputs[0]), LazyTensor(node, 1, outputs[1]))
    return structure([LazyTensor(node, i, t) for i, t in enumerate(outputs)])


_tensor_sum, _torch_sum = Tensor.sum, torch.sum
_FAST_SECOND = (LazyTensor, float, int)     # second arguments of signature_key's fast path
_SITES: dict = {}            # (id(code), offset) -> (code, offset); the value keeps code alive
_SITES_LIMIT = 100_000


def _append_stacked_sum(run, stack, args, info, inputs, depth):
    """Record the sum of ``stack`` as a ``stacked_sum`` node; when the stack is the node
    just before it, swap the two (NOTE [stacked sums])."""
    nodes = run.graph.nodes
    right_after = nodes[-1] is stack
    out = append_node(run, stacked_sum, args, None, info, inputs, depth, False)
    if right_after:
        total = out.node
        stack.id, total.id = total.id, stack.id
        nodes[stack.id], nodes[total.id] = stack, total
        stack.inputs = total.id
        stack.depth = total.depth + 1
    return out


def snapshot(value):
    """``value`` with every list in it copied. A node reads its arguments when it runs,
    later; the user's own list may have changed by then (``history.append(h)`` after
    ``torch.stack(history)``)."""
    t = type(value)
    if t is list:
        copy = value[:]
        for k, x in enumerate(copy):
            if type(x) is list or type(x) is tuple:
                copy[k] = snapshot(x)
        return copy
    if t is tuple:
        for x in value:
            if type(x) is list or type(x) is tuple:
                return tuple(snapshot(y) for y in value)
    return value


def remember_site(where_key, code):
    if len(_SITES) > _SITES_LIMIT:
        _SITES.clear()
    site = _SITES[where_key] = (code, where_key[1])
    return site


_PLAIN_KWARG_TYPES = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))
_KWARGS = "kwargs"      # run.templates[(signature, _KWARGS)]: the kwargs its nodes share


def append_node(run, fn, args, kwargs, info, inputs, depth, plain):
    """Add one node to the run's graph (ops and blocks alike); returns its lazy output(s).

    NOTE [plain nodes]: most calls of per-op code are ``f(x)``, ``f(x, y)`` or
    ``f(x, 2.0)`` on outputs of earlier nodes (``plain``, from signature_key; a later
    output than the first is read as NOTE [indexed plain nodes] in graph.py says). Their
    ``inputs`` say where every lazy argument comes from, and every other argument is part
    of the signature, so equal for all its nodes: such a node keeps no ``args``. The first
    node of each signature leaves its arguments, lazy tensors blanked, in
    ``run.templates`` for the executor; every lazy tensor is freed as soon as the user's
    code drops it: tracing AST per-op code at B=256 allocates 279 bytes a node instead of
    363 (``benchmarks/time_split.py --profile --task ast --impl dynbatch-agenda --batch
    256``)."""
    nodes = run.graph.nodes
    indices = 0
    if plain and not run.block_trace:
        indices = args[0].index         # NOTE [indexed plain nodes]
        if len(args) == 2 and type(args[1]) is LazyTensor:
            indices |= args[1].index << 4
        templates = run.templates
        if info not in templates:
            # lazy tensors blanked: they would keep their nodes' batch outputs alive until
            # the run ends, and the executor fills those places from ``inputs``
            templates[info] = tuple(None if type(a) is LazyTensor else a for a in args)
        args = None
    else:
        for a in args:
            if type(a) is list:
                args = snapshot(args)
                break
        if kwargs:
            if any(type(v) is list for v in kwargs.values()):
                kwargs = {k: snapshot(v) for k, v in kwargs.items()}
            elif all(type(v) in _PLAIN_KWARG_TYPES for v in kwargs.values()):
                # plain values are part of the key, so equal for every node of the
                # signature (the executor reads its first node's): one dict for them all,
                # not one of 176 bytes per node (SST per-op, B=256: 5,000 cat(..., dim=1))
                kwargs = run.templates.setdefault((info, _KWARGS), kwargs)
    # the user's line: inline for the common case (the recorder's caller's caller is theirs)
    frame = _getframe(3)
    code = frame.f_code
    if code is _HOT_CODE and frame.f_back is not None:     # through a hot-function
        frame = frame.f_back                               # wrapper: one frame more
        code = frame.f_code
    if _internal_files.get(code.co_filename) is False:
        # one shared (code, offset) tuple per site, not one per node (56 bytes each)
        where_key = (id(code), frame.f_lasti)
        site = _SITES.get(where_key)
        if site is None:
            site = remember_site(where_key, code)
    else:       # a file seen for the first time, or a path with more frames: walk up
        site = raw_site(4)
    node = make_node(len(nodes), fn, args, kwargs, info, inputs, depth + 1, site, run)
    if indices:
        node.row = indices
        info.indexed = True
    nodes.append(node)
    structure = info.structure
    outputs = info.outputs
    if structure is None:
        return LazyTensor(node, 0, outputs[0])
    if structure is tuple and len(outputs) == 2:      # a cell's (h, c): no comprehension
        return (LazyTensor(node, 0, outputs[0]), LazyTensor(node, 1, outputs[1]))
    return structure([LazyTensor(node, i, t) for i, t in enumerate(outputs)])


def constant(run: Run, value: Tensor, site=None, fn=None) -> LazyTensor:
    """Per-example data: a source node holding a real tensor; stacked at execution. ``fn``
    marks a node that stands for something else (a block body's argument)."""
    tkey = (value.shape, value.dtype, value.device)
    key = (CONST, value.shape, value.dtype, value.device, value.requires_grad)
    info = _GLOBAL_SIGNATURES.get(key)
    if info is None:
        info = _GLOBAL_SIGNATURES[key] = Signature(CONST, outputs=(tkey,), name="constant")
    nodes = run.graph.nodes
    if fn is None:
        node = ArgsNode(len(nodes), (value,), info, (), 0, site, run)
    else:
        node = CallNode(len(nodes), fn, (value,), None, info, (), 0, site, run)
    nodes.append(node)
    return LazyTensor(node, 0, tkey)


_torch_tensor = torch.tensor
_HOT_CODE = _hot_wrapper(torch.sigmoid).__code__     # every hot wrapper runs this code
_PY_SCALAR_DTYPE = {int: torch.int64, bool: torch.bool, float: None}
_SCALAR_SHAPE = torch.Size([])


def _scalar_constant(run, value, kwargs):
    """``torch.tensor(word_id)``: the commonest per-example constant. Keep the Python value
    and make one tensor for a whole gather at execution, instead of one tensor per node
    now and a stack later; outside a block's body it is not even a node (NOTE
    [immediates])."""
    dtype = kwargs.get("dtype")
    device = kwargs.get("device")
    if len(kwargs) > (dtype is not None) + (device is not None):
        return _eager_constant(run, _torch_tensor, (value,), kwargs)
    if dtype is None:
        dtype = _PY_SCALAR_DTYPE[type(value)] or torch.get_default_dtype()
    device = torch.device(device) if device is not None else run.default_device
    info, tkey = _scalar_signature(dtype, device)
    if not run.block_trace:
        return LazyTensor(Immediate(value, info, run.example, run), 0, tkey)
    nodes = run.graph.nodes
    node = ArgsNode(len(nodes), (value,), info, (), 0, raw_site(2), run)
    nodes.append(node)
    return LazyTensor(node, 0, tkey)


_SCALAR_SIGNATURES: dict = {}


def _scalar_signature(dtype, device) -> tuple:
    """(Signature, tkey) of a 0-d constant made from a Python scalar."""
    tkey = (_SCALAR_SHAPE, dtype, device)
    found = _SCALAR_SIGNATURES.get(tkey)
    if found is None:
        info = Signature(CONST, fn=_torch_tensor, outputs=(tkey,), name="torch.tensor(scalar)")
        found = _SCALAR_SIGNATURES[tkey] = (info, tkey)
    return found


def _default_device() -> torch.device:
    return torch.get_default_device() if hasattr(torch, "get_default_device") else \
        torch.device("cpu")


def _eager_constant(run, fn, args, kwargs):
    """A torch call on no lazy input, inside traced code: run it now; tensor results are
    per-example data (constants)."""
    if fn in _ATTRIBUTE_GETTERS:       # x.shape, p.device on a real tensor: not data
        with _DisableTorchFunction():
            return fn(*args, **kwargs)
    if run.default_device.type != "cpu" and "device" not in kwargs and \
            fn in _device_constructors():
        # torch.set_default_device's mode sits below ours and is disabled here with it
        kwargs = dict(kwargs, device=run.default_device)
    with _DisableTorchFunction():   # constant() reads tensor attributes: no dispatch
        out = fn(*args, **kwargs)
        if isinstance(out, Tensor):
            if any(out is a for a in args):
                return out
            return constant(run, out, raw_site(3))
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, Tensor) for o in out):
            site = raw_site(3)
            return type(out)([constant(run, o, site) for o in out])
        return out


def _special(run, fn, args, kwargs):
    """Reads, metadata queries and data-dependent ops: never batched nodes."""
    if fn in _METADATA:
        meta = map_lazy(args, kwargs, _infer.meta_of)
        with _DisableTorchFunction():
            return fn(*meta[0], **meta[1])
    if run.block_trace:
        raise BlockError(f"{rules.name_of(fn)} reads a tensor's value inside a block")
    values = map_lazy(args, kwargs, force)
    with _DisableTorchFunction():
        out = fn(*values[0], **values[1])
    if fn in _READS:
        return out
    if run.graph is not None and isinstance(out, Tensor):
        return constant(run, out, raw_site(3))
    return out


def _dropout(fn, args, kwargs):
    """NOTE [identity dropout]."""
    x = args[0] if args else kwargs.get("input")
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    default, name = _DROPOUTS[fn]
    training = args[2] if len(args) > 2 else kwargs.get(name, default)
    if type(x) is LazyTensor and (training is False or (type(p) in (int, float) and p == 0)):
        return x
    return record(fn, args, kwargs)


def _outside_run(fn, args, kwargs):
    """A lazy tensor used after its run ended: it has a value; compute eagerly on it."""
    values = map_lazy(args, kwargs, force)
    with _DisableTorchFunction():
        return fn(*values[0], **values[1])


def force(lt: LazyTensor) -> Tensor:
    """The real value of a lazy tensor, executing its run's pending work first."""
    node = lt.node
    if node.batch is None:
        force_all([lt])
    if lt._value is None:
        with _DisableTorchFunction():   # dynbatch's own indexing must not be recorded
            lt._value = node.batch[lt.index][node.row]
    return lt._value


def force_all(lazies) -> None:
    """Execute what the given lazy tensors (of one run) need: in @batched code, after every
    other example has reached a read too (NOTE [reads])."""
    pending = [lt.node for lt in lazies if lt.node.batch is None]
    if any(n.id < 0 for n in pending):     # immediates need no other example: fill now
        _fill_immediates([n for n in pending if n.id < 0])
        pending = [n for n in pending if n.id >= 0]
    if not pending:
        return
    run = pending[0].owner
    if run.block_trace:
        raise BlockError("a block's body reads a tensor's value "
                         f"(at {where(run.example, pending[0].site)})")
    if run.closed:
        raise MixedRunError("this lazy tensor's run ended before it was computed "
                            "(the run failed); recompute it in a new run")
    if run.main is not None and _suspendable(run):
        # NOTE [reads]: wait for the other examples to reach their reads too, so the
        # pending work of all of them runs as one set of batches.
        if torch.is_inference_mode_enabled() != run.inference:
            unsupported("reading a value inside torch.inference_mode() in per-example code "
                        "(the mode cannot follow the example across the suspension; use "
                        "torch.no_grad() there, or wrap the whole @batched call)")
        grad = torch.is_grad_enabled()
        run.wanted.extend(pending)
        run.main.switch()
        if torch.is_grad_enabled() != grad:   # another example changed it meanwhile
            with _DisableTorchFunction():
                torch._C._set_grad_enabled(grad)
    elif run.main is None and not run.scope and run.stats.examples > 1:
        _warn_serial_reads()
    if any(n.batch is None for n in pending):
        # In a scope the user's own loop comes back for the other pending values: run
        # them all now, batched. In @batched code, run only what this read needs.
        _execute_pending(run, None if run.scope else pending)


def _warn_serial_reads() -> None:
    """Without greenlet (a declared dependency, so a broken install) a read cannot wait
    for the other examples: results stay exact, but every read runs one example's
    pending work on its own. Say so once rather than be silently slow."""
    global _warned_serial_reads
    if not _warned_serial_reads:
        _warned_serial_reads = True
        message = ("dynbatch: greenlet is not installed, so a value read in per-example "
                   "code runs that example's work unbatched; pip install greenlet")
        site = raw_site()               # the user's line that read the value
        if site is None:
            warnings.warn(message, RuntimeWarning)
        else:
            code, offset = site
            warnings.warn_explicit(message, RuntimeWarning, code.co_filename,
                                   line_of(code, offset))


_warned_serial_reads = False


def _suspendable(run) -> bool:
    """Only from an example's own greenlet, and not from inside a torch-function handler:
    there torch has popped the mode, and switching to another example would let it run
    unrecorded (and restore the mode stack out of order)."""
    return _getcurrent() is not run.main and \
        torch._C._is_torch_function_mode_enabled()


def _execute_pending(run, targets) -> None:
    from .execute import execute_pending   # execute imports this module
    execute_pending(run, targets)


def _fill_immediates(column) -> None:
    from .execute import fill_immediates
    with _DisableTorchFunction():
        fill_immediates(column)


def unsupported(message: str):
    run = _current
    example = run.example if run is not None else None
    raise UnsupportedError(f"{message} is not supported ({where(example, raw_site(3))}); "
                           "write it out of place")


def wrap_example(run: Run, example):
    """Tensors that are the example or sit in its plain lists, tuples and dicts become
    per-example constants; anything else (nltk Trees, dataclasses...) is left as it is."""
    t = type(example)
    if isinstance(example, Tensor):
        with _DisableTorchFunction():
            return constant(run, example)
    if t is list or t is tuple:
        if any(isinstance(x, (Tensor, list, tuple, dict)) for x in example):
            return t(wrap_example(run, x) for x in example)
        return example
    if t is dict:
        return {k: wrap_example(run, v) for k, v in example.items()}
    return example


lazy._record = record
lazy._dispatch = dispatch
lazy._force = force
lazy._unsupported = unsupported
