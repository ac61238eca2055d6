"""Blocks: a module or function call recorded as ONE node, batched as a whole.

Built-in blocks (nn.Linear, nn.Embedding, nn.LayerNorm, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
batch natively: the batched call is the module on stacked inputs. ``db.block`` marks user
functions, nn.Module subclasses and module instances. A user block's body is traced once
per signature (per run) into the same op vocabulary, then replayed for a whole batch
through the direct rules; a body that cannot be traced (it reads a value) runs per example.
While a run records, ``nn.Module.__call__`` is patched so block calls reach the tracer.
"""
from __future__ import annotations

import functools
import warnings
from sys import _getframe

import torch
from torch import nn

from . import infer, rules, specialize, trace
from .errors import BlockError, TraceError, where, raw_site
from .errors import _is_internal_file as _internal_files
from .graph import ArgsNode, Node, input_ids, make_node, packed
from .lazy import LazyTensor
from .signature import (_SCALARS, BLOCK, CONST, Signature, autograd_mode, layout_of,
                        raise_mixed, signature_key)
from .trace import _SITES

BUILTIN_BLOCKS = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.LSTMCell, nn.GRUCell, nn.RNNCell)
_original_call = nn.Module.__call__
_installed = 0
_is_grad_enabled = torch.is_grad_enabled
_is_inference = torch.is_inference_mode_enabled


def is_block(module: nn.Module) -> bool:
    # The mark lives on the class (db.block(SomeModule)) or in the instance's __dict__
    # (db.block(module)); read there, not by getattr(module, ...): on a module without
    # it, that falls through to nn.Module.__getattr__, which raises and catches an
    # AttributeError in Python: 2% of a per-op training step (every Dropout call).
    t = type(module)
    return t in BUILTIN_BLOCKS or getattr(t, "_dynbatch_block", False) or \
        module.__dict__.get("_dynbatch_block", False)


def _has_lazy(args, kwargs) -> bool:
    for a in args:
        t = type(a)
        if t is LazyTensor:
            return True
        if (t is tuple or t is list) and any(type(x) is LazyTensor for x in a):
            return True
    return any(type(v) is LazyTensor for v in kwargs.values()) if kwargs else False


def _module_call(self, *args, **kwargs):
    if trace._current is not None:
        if type(self) is _Dropout and _drops_nothing(self, args, kwargs):
            return args[0]
        if is_block(self) and _has_lazy(args, kwargs):
            return record_block(self, args, kwargs)
    return _original_call(self, *args, **kwargs)


_Dropout = nn.Dropout
_module_state = torch.nn.modules.module


def _drops_nothing(module, args, kwargs) -> bool:
    """NOTE [identity dropout] (trace.py) at the module: an ``nn.Dropout`` in eval mode or
    with p == 0 returns its input, the same object, as its forward's F.dropout would, and
    skips the call through Module.__call__, forward and F.dropout (1.7 us of a per-op
    Tree-LSTM's per-node loss, 0.03 us here). Only where the call would run nothing else:
    no hook of any kind, no forward of the instance's own, no compiled or jit-traced call,
    not in place (an in-place op on a per-example tensor is refused, and still is)."""
    return len(args) == 1 and not kwargs and type(args[0]) is LazyTensor and \
        (not module.training or module.p == 0) and not module.inplace and \
        not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
             or module._backward_pre_hooks or _module_state._global_forward_hooks
             or _module_state._global_forward_pre_hooks
             or _module_state._global_backward_hooks
             or _module_state._global_backward_pre_hooks) and \
        module._compiled_call_impl is None and "forward" not in module.__dict__ and \
        not torch._C._get_tracing_state()


def install() -> None:
    global _installed
    if _installed == 0:
        nn.Module.__call__ = _module_call
    _installed += 1


def uninstall() -> None:
    global _installed
    _installed -= 1
    if _installed == 0:
        nn.Module.__call__ = _original_call


class BlockFunction:
    """A function marked with ``db.block``: the identity its nodes' signatures name.

    ``db.block`` hands the user a plain function that calls ``record_block`` with this
    object (``_block_function``): a plain function binds to an instance as a method in C,
    where an object with ``__get__`` costs a Python call and a partial per block call."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __repr__(self) -> str:
        return f"<dynbatch block {self.fn.__qualname__}>"


def _block_function(fn):
    marked = BlockFunction(fn)

    @functools.wraps(fn)
    def block_call(*args, **kwargs):
        if trace._current is not None:
            return record_block(marked, args, kwargs)
        return fn(*args, **kwargs)

    block_call.__dynbatch_block__ = marked
    return block_call


def block(obj):
    """Mark a function, an nn.Module subclass or a module instance as a block: each call is
    recorded as one node and batched as a whole. It must be a pure function of its
    arguments (no reads of tensor values, no randomness, no state changes)::

        @db.block
        def cell(x, h, W):
            return torch.tanh(W @ torch.cat([x, h]))
    """
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj._dynbatch_block = True
        return obj
    if isinstance(obj, nn.Module):
        object.__setattr__(obj, "_dynbatch_block", True)
        return obj
    if isinstance(getattr(obj, "__dynbatch_block__", None), BlockFunction):
        return obj
    if callable(obj):
        return _block_function(obj)
    raise TypeError(f"db.block expects a function, an nn.Module subclass or a module, "
                    f"got {type(obj).__name__}")


def record_block(fn, args, kwargs):
    """Record one block call. The signature lives for this run only: a block's batched form
    closes over the module's current parameters, which may be replaced between runs.

    NOTE [block calls]: the commonest calls (a module or Python values, lazy tensors, and
    tuples of lazy tensors such as a cell's (h, c), no keywords) are keyed and recorded
    here in one frame. Measured per call of the SST Tree-LSTM's node cell (min of 15 x
    4,000): 4.1-4.4 us here, 4.6-4.8 us keyed by signature_key with the node made here,
    4.9-5.1 us through signature_key and trace.append_node; some 2-3 ms of a training
    minibatch's 5,208 block calls. So the loop below repeats signature_key's general
    loop, and its tuple case repeats its lazy case, as signature_key's does; the key is
    the same one (test_block_calls_are_keyed_as_signature_key_keys_them). Each line of
    the user's remembers its last call's key list and signature (``run.block_sites``, by
    code object, then offset: no file check, no key tuple once a function is known): a
    call from there whose key list equals it (item by item, mostly by identity: tkeys are
    the signatures' own tuples) skips making the key a tuple and hashing it (a tkey's
    device and dtype hash slowly), and the site lookup. With that, and types known not
    to be tensors skipping ``isinstance(a, Tensor)`` (0.15 us for a module), tracing an
    SST minibatch costs 5-8% less, old and new code alternating in one process (``python
    benchmarks/ab.py dynbatch.blocks:record_block --rev ffa9add~1``); a node cell call
    costs 3.7 us (``python benchmarks/trace_cost.py``). A line whose call repeats then
    gets a recorder of its own (NOTE [site recorders]), which skips all of this.

    NOTE [block edges]: a block node's ``inputs`` serve only the scheduler (the executor
    reads its arguments), so they list each input node once where it repeats (a cell's h
    and c come from one node) and leave immediates out (a word id or a label runs in no
    batch). A Tree-LSTM minibatch has 45% fewer edges to schedule: 8,400 instead of
    15,300. Graph.lint still counts the immediates among the arguments for the depth."""
    run = trace._current
    if kwargs:
        return _record_block_general(fn, args, kwargs, run)
    # NOTE [site recorders]: a line that made the same call before records it in one step
    frame = _getframe(2)
    code = frame.f_code
    entry = run.block_sites.get(id(code))
    known = None            # the line's last call: (key, site, info, recorder, made)
    if entry is not None:
        known = entry[1].get(frame.f_lasti)
        if known is not None and known[3] is not None:
            out = known[3](fn, args, run)
            if out is not None:
                return out
    key = [fn, 2 if _is_inference() else 1 if _is_grad_enabled() else 0]
    inputs = []
    last = -1
    depth = -1
    lists = False
    for a in args:
        t = type(a)
        if t is LazyTensor:
            node = a.node
            if node.owner is not run:
                raise_mixed(run)
            i = node.id
            if i != last and i >= 0:      # NOTE [block edges]
                inputs.append(i)
                last = i
            if node.depth > depth:
                depth = node.depth
            key.append(a.tkey)
        elif t is tuple or t is list:
            lists = lists or t is list
            key.append(t)
            key.append(len(a))
            for x in a:
                if type(x) is not LazyTensor:
                    return _record_block_general(fn, args, kwargs, run)
                node = x.node
                if node.owner is not run:
                    raise_mixed(run)
                i = node.id
                if i != last and i >= 0:
                    inputs.append(i)
                    last = i
                if node.depth > depth:
                    depth = node.depth
                key.append(x.tkey)
        elif t in _SCALARS:
            key.append(t)
            key.append(a)
        elif t in _OTHER_TYPES:         # a module (a method's self), a config object
            key.append(a)
        elif t is slice or isinstance(a, torch.Tensor):
            return _record_block_general(fn, args, kwargs, run)
        else:
            if len(_OTHER_TYPES) < 1_000:
                _OTHER_TYPES.add(t)
            key.append(a)
    if depth < 0:       # no per-example tensor among the arguments: a plain call
        return _call_body(fn, args, kwargs)
    # trace.append_node's work, inline (its frame is the user's caller's caller here).
    # A code object met before is the user's (no file check); by id, as hashing a code
    # object hashes its constants; the entry keeps the code alive, so the id stays its own
    if entry is None and _internal_files.get(code.co_filename) is False:
        entry = run.block_sites[id(code)] = (code, {})
    if entry is not None:
        calls = entry[1]
        offset = frame.f_lasti
        if known is not None and known[0] == key:     # list ==: mostly `is` per item
            site = known[1]
            info = known[2]
            if known[3] is None and known[4] < _SITE_RECORDERS_PER_LINE and not lists:
                calls[offset] = (key, site, info, _site_recorder(key, args, info, site),
                                 known[4] + 1)
        else:
            where_key = (id(code), offset)
            site = _SITES.get(where_key)
            if site is None:
                site = trace.remember_site(where_key, code)
            info = _block_signature(run, key, fn, args, kwargs)
            calls[offset] = (key, site, info, None, 0 if known is None else known[4])
    else:
        site = raw_site(3)
        info = _block_signature(run, key, fn, args, kwargs)
    if lists:       # the user may change their list before the node runs
        args = trace.snapshot(args)
    elif len(inputs) == 1 and not run.block_trace and _plain_block_args(args):
        templates = run.templates           # NOTE [plain blocks]
        if info not in templates:
            templates[info] = tuple(None if type(a) is LazyTensor else a for a in args)
        args = None
    nodes = run.graph.nodes
    node = make_node(len(nodes), fn, args, None, info, inputs, depth + 1, site, run)
    nodes.append(node)
    outputs = info.outputs
    structure = info.structure
    if structure is None:
        return LazyTensor(node, 0, outputs[0])
    if structure is tuple and len(outputs) == 2:      # a cell's (h, c)
        return (LazyTensor(node, 0, outputs[0]), LazyTensor(node, 1, outputs[1]))
    return structure([LazyTensor(node, i, t) for i, t in enumerate(outputs)])


_SITE_RECORDERS_PER_LINE = 4    # a line whose calls keep changing falls back for good


def _plain_block_args(args) -> bool:
    """NOTE [plain blocks]: a block call whose one lazy argument is a first output, at the
    top level (a module's ``self.W(x)``), keeps no arguments, as a plain op's node does
    (NOTE [plain nodes] in trace.py): its ``inputs`` say where the value comes from, and
    its signature's template (``run.templates``) the rest, which the signature's key holds
    by identity or value. Not inside a block's body, whose compiler reads every node's
    arguments. Per-op SST at B=256 (20,800 ``nn.Linear`` calls) traced 263 bytes a node
    before, 252 after (``python benchmarks/time_split.py --profile --impl dynbatch-agenda
    --batch 256 --minibatches 1``, git 7d83710 and 93691f2)."""
    lazy = None
    for a in args:
        t = type(a)
        if t is LazyTensor:
            if lazy is not None:
                return False
            lazy = a
        elif t is tuple or t is list:
            return False
    return lazy is not None and not lazy.index and lazy.node.id >= 0


def _site_recorder(key, args, info, site):
    """NOTE [site recorders]: a function that records, from one line of the user's, a
    block call like the one just recorded there twice (``key``): the same block, the same
    objects (by identity) and Python values, lazy tensors with equal tkeys (by identity
    first: tkeys are mostly the signatures' own tuples) in the same places, the same grad
    mode, no lists (they are copied). Anything else, a lazy tensor of another run
    included, makes it return None, and ``record_block`` records the call its general
    way. The recorder is straight-line code generated for the call's layout, as block
    bodies are (Program): no walk over the arguments, no key list to build and compare,
    the node and its lazy outputs made in place. One layout's code is compiled once per
    process; a run binds its own block, objects, signature and site to it. Returns None
    for a call it cannot take (keywords, lists, a value that is not a plain object)."""
    fn, mode = key[0], key[1]
    if info.fn is not fn:       # its nodes are CallNodes (NOTE [lean nodes])
        return None
    namespace = {"_fn": fn, "_mode": mode, "_info": info, "_site": site,
                 "_LT": LazyTensor, "_Node": Node, "_ArgsNode": ArgsNode, "_packed": packed,
                 "_new": object.__new__,
                 "_inference": _is_inference, "_grad": _is_grad_enabled}
    guards = [f"len(args) != {len(args)}"]
    unpack = []
    lazies = []          # names of the lazy tensors, in the order the general loop meets them
    k = 2                # position in the key, which the general loop filled in this order
    for i, a in enumerate(args):
        t = type(a)
        name = f"a{i}"
        if t is LazyTensor:
            namespace[f"_t{len(lazies)}"] = key[k]
            guards.append(_lazy_guard(name, len(lazies)))
            lazies.append(name)
            k += 1
        elif t is tuple:
            if key[k] is not tuple or any(type(x) is not LazyTensor for x in a):
                return None
            guards.append(f"type({name}) is not tuple or len({name}) != {len(a)}")
            names = []
            for j in range(len(a)):
                names.append(f"x{i}_{j}")
                namespace[f"_t{len(lazies)}"] = key[k + 2 + j]
                lazies.append(names[-1])
            unpack.append((name, names))
            k += 2 + len(a)
        elif t in _SCALARS:
            namespace[f"_v{i}"] = a
            guards.append(f"type({name}) is not {t.__name__} or {name} != _v{i}")
            k += 2
        elif t in _OTHER_TYPES:
            namespace[f"_v{i}"] = a
            guards.append(f"{name} is not _v{i}")
            k += 1
        else:       # lists are copied, tensors and slices are keyed otherwise
            return None
    if not lazies or k != len(key):
        return None
    lines = ["if fn is not _fn or " + guards[0] + ":", "    return None",
             f"{', '.join(f'a{i}' for i in range(len(args)))}{',' if len(args) == 1 else ''}"
             " = args"]
    lines += [f"if {' or '.join(f'({g})' for g in guards[1:])}:", "    return None"]
    for name, names in unpack:
        if names:           # (an empty tuple has nothing to unpack)
            lines.append(f"{', '.join(names)}, = {name}")
    item_guards = [_lazy_guard(x, n) for n, x in enumerate(lazies)
                   if any(x in names for _, names in unpack)]
    if item_guards:
        lines += [f"if {' or '.join(f'({g})' for g in item_guards)}:", "    return None"]
    nodes = [f"n{n}" for n in range(len(lazies))]
    lines.append(f"{', '.join(nodes)} = {', '.join(f'{x}.node' for x in lazies)}")
    lines += [f"if {' or '.join(f'{n}.owner is not run' for n in nodes)}:", "    return None",
              "if (2 if _inference() else 1 if _grad() else 0) != _mode:", "    return None"]
    # the inputs and depth as the general loop finds them (NOTE [block edges])
    # (one id alone, else a tuple: NOTE [one input] in graph.py; () is shared)
    if len(nodes) == 1 and not unpack:
        # NOTE [plain blocks]: the one lazy argument, a first output, comes from inputs
        namespace["_template"] = tuple(None if type(a) is LazyTensor else a for a in args)
        lines += [f"last = {nodes[0]}.id", f"depth = {nodes[0]}.depth",
                  "if last >= 0:",
                  "    inputs = last",
                  f"    if not {lazies[0]}.index and not run.block_trace:",
                  "        templates = run.templates",
                  "        if _info not in templates:",
                  "            templates[_info] = _template",
                  "        args = None",
                  "else:",
                  "    inputs = ()"]
    elif len(nodes) == 1:
        lines += [f"last = {nodes[0]}.id", "inputs = last if last >= 0 else ()",
                  f"depth = {nodes[0]}.depth"]
    else:
        lines += [f"last = {nodes[0]}.id", "inputs = [last] if last >= 0 else []",
                  f"depth = {nodes[0]}.depth"]
        for n in nodes[1:]:
            lines += [f"i = {n}.id", "if i != last and i >= 0:", "    inputs.append(i)",
                      "    last = i", f"if {n}.depth > depth:", f"    depth = {n}.depth"]
        lines.append("inputs = _packed(inputs)")
    lines += ["nodes = run.graph.nodes",
              "if args is None:",
              "    node = _Node(len(nodes), _info, inputs, depth + 1, _site, run)",
              "else:",
              "    node = _ArgsNode(len(nodes), args, _info, inputs, depth + 1, _site, run)",
              "nodes.append(node)"]
    # lazy outputs made in place: a class call with a Python __init__ costs 60 ns more
    outs = []
    for index, tkey in enumerate(info.outputs):
        namespace[f"_o{index}"] = tkey
        lines += [f"o{index} = _new(_LT)", f"o{index}.node = node", f"o{index}.index = {index}",
                  f"o{index}.tkey = _o{index}", f"o{index}._value = None"]
        outs.append(f"o{index}")
    if info.structure is None:
        lines.append("return o0")
    elif info.structure is tuple:
        lines.append(f"return ({', '.join(outs)},)")
    else:
        namespace["_structure"] = info.structure
        lines.append(f"return _structure(({', '.join(outs)},))")
    source = "def record(fn, args, run):\n" + "".join(f"    {line}\n" for line in lines)
    # one code object per layout, whichever block: the name titles no block of its own
    exec(_compiled(source, "site recorder"), namespace)
    return namespace["record"]


def _lazy_guard(name, n) -> str:
    # equal tkeys of two signatures (a leaf's h and an inner node's) are two tuples
    return f"type({name}) is not _LT or ({name}.tkey is not _t{n} and {name}.tkey != _t{n})"


def _block_signature(run, key, fn, args, kwargs) -> Signature:
    key = tuple(key)
    info = run.local_signatures.get(key)
    if info is None:    # (none is nested deeper than an item: the loop above saw to that)
        info = run.local_signatures[key] = _new_block_signature(run, fn, args, kwargs, None)
    return info


_OTHER_TYPES: set = set()   # types met among block arguments that are not tensors


def _record_block_general(fn, args, kwargs, run):
    key, inputs, depth, _ = signature_key(fn, args, kwargs, run)
    if not inputs:
        return _call_body(fn, args, kwargs)
    info = run.local_signatures.get(key)
    if info is None:
        info = run.local_signatures[key] = _new_block_signature(run, fn, args, kwargs,
                                                                len(inputs))
    return trace.append_node(run, fn, args, kwargs, info, inputs, depth, False)


def _name(fn) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", repr(fn))


def _new_block_signature(run, fn, args, kwargs, n_inputs) -> Signature:
    paths, flags = layout_of(args, kwargs)
    name = _name(fn)
    if any(p[0] == "kw" for p in paths):
        raise TraceError(f"block {name}: pass per-example tensors positionally "
                         f"({where(run.example, raw_site(3))})")
    if n_inputs is not None and len(paths) != n_inputs:
        raise TraceError(f"block {name}: per-example tensors must be arguments or items of "
                         f"a list/tuple argument, not nested deeper "
                         f"({where(run.example, raw_site(3))})")
    if isinstance(fn, nn.Module) and type(fn) in BUILTIN_BLOCKS:
        with torch._C.DisableTorchFunction():
            return _builtin_block_signature(run, fn, args, kwargs, paths, flags, name)
    program = _trace_body(run, fn, args, kwargs, paths, name)
    return Signature(BLOCK, fn, program, program.outputs, program.structure, paths, flags,
                     autograd_mode(), name=name)


def _builtin_block_signature(run, fn, args, kwargs, paths, flags, name) -> Signature:
    try:
        out = infer.infer(lambda *a, **k: _original_call(fn, *a, **k), args, kwargs)
    except Exception as err:
        raise TraceError(f"{name} failed for {where(run.example, raw_site(3))}\n"
                         f"  {type(err).__name__}: {err}") from err
    outputs, structure = _output_spec(out)
    info = Signature(BLOCK, fn, rules.native_module_rule, outputs, structure, paths,
                     flags, autograd_mode(), name=name)
    info.direct = specialize.specialize(info.rule, fn, args, kwargs, flags)
    return info


def _output_spec(out):
    if isinstance(out, torch.Tensor):
        return ((out.shape, out.dtype, out.device),), None
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return tuple((o.shape, o.dtype, o.device) for o in out), type(out)
    raise BlockError(f"a block must return a tensor or a tuple of tensors, got "
                     f"{type(out).__name__}")


def _call_body(fn, args, kwargs):
    if isinstance(fn, nn.Module):
        return _original_call(fn, *args, **kwargs)
    return fn.fn(*args, **kwargs)


def _trace_body(run, fn, args, kwargs, paths, name) -> "Program":
    """Trace the block once on placeholders into a sub-graph, then compile it to a replay
    program. Values the body makes from no argument are the same for every example of one
    signature, so they stay shared (unbatched) in the replay."""
    sub = trace.Run(run.strategy, block_trace=True)
    sub.example = run.example
    placeholders = []
    new_args = list(args)
    for path in paths:
        original = args[path[0]] if len(path) == 1 else args[path[0]][path[1]]
        with torch._C.DisableTorchFunction():
            dummy = torch.empty(0)
        # marks a position; its value is never read
        ph = trace.constant(sub, dummy, None, _ARGUMENT)
        ph.tkey = original.tkey
        placeholders.append(ph.node)
        if len(path) == 1:
            new_args[path[0]] = ph
        else:
            seq = list(new_args[path[0]])
            seq[path[1]] = ph
            new_args[path[0]] = type(args[path[0]])(seq)
    try:
        with trace.switched_to(sub):
            out = _call_body(fn, tuple(new_args), kwargs)
    except BlockError as err:
        warnings.warn(f"dynbatch: block {name} cannot be traced once for a whole batch ({err});"
                      f" it will run one example at a time", stacklevel=3)
        return _PerExampleProgram(fn, args, kwargs)
    except Exception as err:
        if isinstance(err, TraceError):
            raise
        raise TraceError(f"block {name} failed for {where(run.example, raw_site(3))}\n"
                         f"  {type(err).__name__}: {err}") from err
    with torch._C.DisableTorchFunction():   # building the program must record nothing
        return Program(sub, placeholders, out, name, paths)


class _ArgumentMarker:
    def __repr__(self):
        return "argument"


_ARGUMENT = _ArgumentMarker()


class Program:
    """A block body compiled for replay on a whole batch: straight-line Python generated
    once per signature (as torch.fx generates code), one line per recorded op. Where a
    rule's decision is fixed by the signature (``specialize.specialize``) the line is the plain
    batched torch call; elsewhere it calls the rule. Values that depend on no argument are
    computed unbatched (NOTE [batch dim]) and expanded only if returned."""

    def __init__(self, sub, placeholders, out, name, paths):
        self.name = name
        nodes = sub.graph.nodes
        batched = [False] * len(nodes)
        for p in placeholders:
            batched[p.id] = True
        namespace = {"_expand": _expand_rows}
        consts = {}
        lines = []
        for k, (ph, path) in enumerate(zip(placeholders, paths)):
            src = f"_args[{path[0]}]" if len(path) == 1 else f"_args[{path[0]}][{path[1]}]"
            lines.append(f"s{ph.id} = {src}")
        lines.append(f"_B = s{placeholders[0].id}.shape[0]")

        def const(value) -> str:
            name = consts.get(id(value))
            if name is None:
                name = consts[id(value)] = f"k{len(consts)}"
                namespace[name] = value
            return name

        multi = {}
        for node in nodes:
            if node.fn is _ARGUMENT:
                continue
            info = node.info
            if info.kind is CONST:
                value = node.args[0]
                if not isinstance(value, torch.Tensor):   # a torch.tensor(scalar) constant
                    _, dtype, device = info.outputs[0]
                    value = torch.tensor(value, dtype=dtype, device=device)
                namespace[f"s{node.id}"] = value
                continue
            multi[node.id] = info.structure is not None
            any_batched = any(batched[i] for i in input_ids(node))
            batched[node.id] = any_batched
            pe = _flags(node.args, batched)
            fn = node.fn
            call_fn = fn
            args = list(node.args)
            kwargs = dict(node.kwargs or {})
            generic = False
            if not any_batched:
                if isinstance(fn, nn.Module):
                    call_fn = functools.partial(_original_call, fn)
            else:
                spec = specialize.specialize(info.rule, fn, node.args, node.kwargs or {}, pe)
                if spec is not None:
                    call_fn, edits = spec
                    kwargs = specialize.apply_edits(args, kwargs, edits)
                else:
                    generic = True
            # A nested block sees all its tensor inputs batched: expand the unbatched ones.
            expand = batched if info.kind is BLOCK and not _all_batched(pe) else None
            if expand is not None:
                pe = _flags(node.args, [True] * len(batched))
            rendered = [_render(a, const, multi, expand) for a in args]
            rendered_kw = [f"{k}={_render(v, const, multi, expand)}"
                           for k, v in kwargs.items()]
            fname = const(call_fn)
            if generic:
                kw = "{" + ", ".join(f"{k!r}: {_render(v, const, multi, expand)}"
                                     for k, v in kwargs.items()) + "}"
                line = (f"s{node.id} = {const(info.rule)}({fname}, "
                        f"({', '.join(rendered)}{',' if len(rendered) == 1 else ''}), "
                        f"{kw}, {const(pe)})")
            else:
                line = f"s{node.id} = {fname}({', '.join(rendered + rendered_kw)})"
            lines.append(line)
        if isinstance(out, LazyTensor):
            outs, self.structure = [out], None
        elif isinstance(out, (tuple, list)) and all(isinstance(o, LazyTensor) for o in out):
            outs, self.structure = list(out), type(out)
        else:
            raise BlockError(f"block {name} must return per-example tensors (a tensor or a "
                             f"tuple of them), got {type(out).__name__}")
        results = []
        for o in outs:
            if o.node.owner is not sub:
                raise BlockError(f"block {name} returns a tensor it did not compute from "
                                 "its arguments")
            ref = _ref(o, multi)
            results.append(ref if batched[o.node.id] else f"_expand({ref}, _B)")
        if self.structure is None:
            lines.append(f"return {results[0]}")
        else:
            lines.append(f"return {const(self.structure)}([{', '.join(results)}])")
        self.outputs = tuple(o.tkey for o in outs)
        self.source = ("def replay(_fn, _args, _kwargs, _pe):\n" +
                       "".join(f"    {line}\n" for line in lines))
        exec(_compiled(self.source, name), namespace)
        self.replay = namespace["replay"]

    def __call__(self, fn, args, kwargs, per_example):
        return self.replay(fn, args, kwargs, per_example)


_CODE: dict = {}          # (replay source, block name) -> its code object
_CODE_LIMIT = 1_000


def _compiled(source: str, name: str):
    """A block's signatures are made anew each run (its parameters may be replaced between
    runs), but the same body gives the same source: compiling it again costs about 0.1 ms
    a signature, some 0.7 ms of a Tree-LSTM minibatch. Constants and callables are names
    bound in the namespace, never literals, so one code object serves every run."""
    key = (source, name)    # the name titles the code's tracebacks
    code = _CODE.get(key)
    if code is None:
        if len(_CODE) >= _CODE_LIMIT:
            _CODE.clear()
        code = _CODE[key] = compile(source, f"<dynbatch block {name}>", "exec")
    return code


def _ref(lt, multi) -> str:
    return f"s{lt.node.id}[{lt.index}]" if multi.get(lt.node.id) else f"s{lt.node.id}"


def _render(a, const, multi, expand=None) -> str:
    """Source text for one argument: a slot reference, a literal, or a named constant."""
    t = type(a)
    if t is LazyTensor:
        ref = _ref(a, multi)
        return ref if expand is None or expand[a.node.id] else f"_expand({ref}, _B)"
    if (t is list or t is tuple) and any(type(x) is LazyTensor for x in a):
        inner = ", ".join(_render(x, const, multi, expand) for x in a)
        return f"[{inner}]" if t is list else f"({inner},)"
    if t in (int, bool, str, type(None)) or (t is float and a == a and abs(a) != float("inf")):
        return repr(a)
    return const(a)


def _flags(args, batched):
    """The rule's per-example flags for a step: which lazy inputs are batched."""
    flags = []
    for a in args:
        t = type(a)
        if t is LazyTensor:
            flags.append(batched[a.node.id])
        elif (t is list or t is tuple) and any(type(x) is LazyTensor for x in a):
            flags.append(tuple(type(x) is LazyTensor and batched[x.node.id] for x in a))
        else:
            flags.append(False)
    return tuple(flags)


def _all_batched(pe) -> bool:
    return all(p is True or p is False or all(p) for p in pe)


def _expand_rows(value, n):
    return value.unsqueeze(0).expand(n, *value.shape)


class _PerExampleProgram:
    """Fallback for a block whose body cannot be traced once: run it per example."""

    def __init__(self, fn, args, kwargs):
        self.fn = fn
        out = infer.infer(lambda *a, **k: _call_body(fn, a, k), args, kwargs)
        self.outputs, self.structure = _output_spec(out)

    def __call__(self, fn, args, kwargs, per_example):
        return rules.loop_rule(lambda *a, **k: _call_body(fn, a, k), args, kwargs, per_example,
                               reason=BlockError("block body reads a value"))
