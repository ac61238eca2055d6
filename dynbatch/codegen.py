"""A block's body, traced once, compiled to straight-line Python that computes a whole
batch (as torch.fx generates code from its graphs).

Each node of the body's graph becomes one line calling its signature's batched call on
its inputs' values. A value that depends on no argument of the block is the same for
every example of the batch: it is computed once, unbatched, and expanded (a view) where a
batched call reads it or the block returns it. A node recorded under another grad mode or
autocast state than the block call's runs under its own.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_flatten

from .errors import user_site, warn_at
from .graph import Constant, Node, outs_of
from .lazy import LazyTensor
from .state import entered, state_now

_CODE: dict = {}        # source -> code object: one per distinct body, whatever the run


class Argument(Constant):
    """The k-th per-example argument of a block, standing in its body's graph."""

    __slots__ = ("k",)


def _expand(value, n: int):
    return value.unsqueeze(0).expand(n, *value.shape)


def compile_body(graph, arguments: list, outputs: list, name: str, state,
                 options: dict | None = None):
    """A function of the batched values of the block's per-example arguments (in order)
    returning the tuple of its batched outputs; with torch.compile's keyword ``options``,
    that function compiled (NOTE [compiled blocks])."""
    namespace = {"_expand": _expand, "_entered": entered}
    names: dict[int, str] = {}       # constant id -> its name in the code
    batched: dict[int, bool] = {}    # node or constant id -> depends on an argument
    lines = [f"a{k} = _values[{k}]" for k in range(len(arguments))]
    lines.append("B = a0.shape[0]")
    for arg in arguments:
        names[arg.id] = f"a{arg.k}"
        batched[arg.id] = True

    def ref(i: int, out: int, want_batched: bool) -> str:
        if i < 0:
            if i not in names:
                c = graph.constants[~i]
                names[i] = f"c{~i}"
                namespace[names[i]] = c.as_tensor()
                batched[i] = False
            text = names[i]
        else:
            text = f"v{i}[{out}]"
        return f"_expand({text}, B)" if want_batched and not batched[i] else text

    for node in graph.nodes:
        refs = node.input_refs()
        any_batched = any(batched.get(i, False) for i, _ in refs)
        batched[node.id] = any_batched
        values = ", ".join(ref(i, out, any_batched) for i, out in refs)
        namespace[f"_s{node.id}"] = node.sig.batched if any_batched else \
            _unbatched(node.sig)
        line = f"v{node.id} = _s{node.id}([{values}])"
        if node.sig.state != state:
            namespace[f"_state{node.id}"] = node.sig.state
            lines.append(f"with _entered(_state{node.id}):")
            line = "    " + line
        lines.append(line)
    results = []
    for lt in outputs:
        results.append(ref(lt.node.id, lt.index, True))
    lines.append(f"return ({', '.join(results)},)")
    if options is not None:
        return _compiled_replay(lines, namespace, name, options)
    source = "def replay(_values):\n" + "".join(f"    {line}\n" for line in lines)
    code = _CODE.get(source)
    if code is None:
        if len(_CODE) > 1000:
            _CODE.clear()
        code = _CODE[source] = compile(source, f"<dynbatch block {name}>", "exec")
    exec(code, namespace)
    replay = namespace["replay"]
    replay.source = source
    return replay


_COMPILED: dict = {}    # (name, source, options) -> _Compiled, for the process


def _compiled_replay(lines: list, namespace: dict, name: str, options: dict):
    """NOTE [compiled blocks]: the replay through torch.compile (dynamic by default: the
    batch size changes from batch to batch). Dynamo caches what it compiles on the code
    object, under guards on what the code reads, and writes the compiled functions into
    the function's globals: so there is one function object per distinct replay, kept for
    the process, and what a signature of this run holds (its nodes' batched calls, its
    constants) comes in as an argument, never through globals. A signature made again in
    the next run, or from a plan in another process, finds the compiled code; what
    differs (a replaced parameter, another dtype) reaches it through that argument, under
    dynamo's guards, as for any compiled function."""
    free = [k for k in namespace if k not in _STABLE]
    source = ("def replay(_values, _free):\n" +
              (f"    {', '.join(free)}, = _free\n" if free else "") +
              "".join(f"    {line}\n" for line in lines))
    key = (name, source, repr(sorted(options.items())))
    entry = _COMPILED.get(key)
    if entry is None:
        if len(_COMPILED) > 1000:
            _COMPILED.clear()
        scope = {k: namespace[k] for k in _STABLE}
        exec(compile(source, f"<dynbatch compiled block {name}>", "exec"), scope)
        entry = _COMPILED[key] = _Compiled(scope["replay"], name, options)
    values = tuple(namespace[k] for k in free)
    batched = functools.partial(entry, _free=values)
    batched.source = source
    return batched


_STABLE = ("_expand", "_entered")       # the replay's globals that no run changes


class _Compiled:
    """A replay and its compiled form. A call the compiled form fails is made again by
    the plain replay: if that fails too, the error is the block's own (the executor then
    names the example and line); if not, the compiler is at fault, and the block runs
    plain from then on, with one warning, instead of compiling again at every batch."""

    __slots__ = ("compiled", "name", "plain")

    def __init__(self, plain, name: str, options: dict):
        self.plain, self.name = plain, name
        self.compiled = torch.compile(plain, **{"dynamic": True, **options})

    def __call__(self, values, _free):
        compiled = self.compiled
        if compiled is None:
            return self.plain(values, _free)
        try:
            return compiled(values, _free)
        except Exception as err:  # noqa: BLE001 - the plain replay tells whose it is
            out = self.plain(values, _free)
            self.compiled = None
            warn_at(f"dynbatch: torch.compile of block {self.name} failed "
                    f"({type(err).__name__}: {err}); the block runs uncompiled",
                    user_site())
            return out


def _unbatched(sig):
    """One example's call of ``sig``, as the tuple of its outputs (for values that are the
    same for every example)."""
    flat = sig.flat
    return lambda values: flat(sig.per_example(values))


def returned_lazies(out) -> list[LazyTensor] | None:
    """The lazy tensors a block body returns, in pytree order; None if it returns anything
    else among them."""
    leaves = tree_flatten(out)[0]
    if not leaves or not all(type(x) is LazyTensor for x in leaves):
        return None
    return leaves


# -- call-site recorders -------------------------------------------------------------------

def site_recorder(fn, args, sig, site, kwargs=None):
    """NOTE [call sites] (trace.py): straight-line code that records, from one call site,
    a call laid out as ``args`` (the same function or block, the same objects by identity,
    Python values equal, per-example tensors of the same metas, in the state ``sig`` was
    recorded in) as one more node of ``sig``; it returns None for any other call. None
    when the layout is one it does not handle."""
    namespace = {"_fn": fn, "_sig": sig, "_site": site, "_LT": LazyTensor, "_Node": Node,
                 "_outs_of": outs_of}
    names = tuple(kwargs or ())
    namespace["_names"] = names
    lines = [f"if fn is not _fn or len(args) != {len(args)}:", "    return None",
             "if not kwargs or tuple(kwargs) != _names:" if names else "if kwargs:",
             "    return None",
             "if _state_now() != _state:",
             "    return None"]
    namespace["_state_now"], namespace["_state"] = state_now, sig.state
    lazies: list[str] = []
    check = functools.partial(_check_argument, namespace, lines, lazies)
    for j, name in enumerate(names):     # keywords: plain values only
        value = kwargs[name]
        if type(value) not in (int, float, bool, str) or value != value:
            return None
        lines.append(f"w{j} = kwargs[{name!r}]")
        if type(value) is str:
            lines.extend([f"if w{j} != {value!r}:", "    return None"])
        else:
            check(f"w{j}", value)
    for i, a in enumerate(args):
        lines.append(f"a{i} = args[{i}]")
        if type(a) in (tuple, list):
            if not a or not all(type(x) is LazyTensor for x in a):
                return None
            lines.extend([f"if type(a{i}) is not {type(a).__name__} or len(a{i}) != {len(a)}:",
                          "    return None"])
            for j in range(len(a)):
                lines.append(f"a{i}_{j} = a{i}[{j}]")
                check(f"a{i}_{j}", a[j])
        elif not check(f"a{i}", a):
            return None
    if not lazies:
        return None
    for k, name in enumerate(lazies):
        lines.extend([f"n{k} = {name}.node", f"if n{k}.owner is not tracer:", "    return None"])
    ids = ", ".join(f"n{k}.id" for k in range(len(lazies)))
    idx = ", ".join(f"{name}.index" for name in lazies)
    # Tracer.append, inlined: the recorder is the hot path's hot path
    lines.extend([f"inputs = ({ids},)", f"outs = _outs_of(({idx},))",
                  "nodes = tracer.graph.nodes",
                  "node = _Node(len(nodes), _sig, inputs, outs, _site, tracer)",
                  "nodes.append(node)"])
    if sig.view:
        lines.append("tracer.viewed.update(inputs)")
    if sig.single is not None:
        namespace["_o"] = sig.single
        lines.append("return _LT(node, 0, _o)")
    elif len(sig.outputs) == 2 and _is_pair(sig):
        namespace["_o0"], namespace["_o1"] = sig.outputs
        lines.append("return (_LT(node, 0, _o0), _LT(node, 1, _o1))")
    else:
        lines.append("return _sig.wrap(node)")
    source = "def record(fn, args, kwargs, tracer):\n" + "".join(f"    {x}\n" for x in lines)
    code = _CODE.get(source)
    if code is None:
        code = _CODE[source] = compile(source, "<dynbatch call site>", "exec")
    exec(code, namespace)
    return namespace["record"]


def _check_argument(namespace: dict, lines: list, lazies: list, name: str, value) -> bool:
    """Append to a recorder's ``lines`` the check that argument ``name`` is like ``value``
    (a lazy tensor of the same meta, an equal Python number, the same object); whether
    the recorder can check such a value."""
    t = type(value)
    if t is LazyTensor:
        k = len(lazies)
        lazies.append(name)
        namespace[f"_m{k}"] = value.meta
        lines.extend([f"if type({name}) is not _LT or {name}.meta is not _m{k}:",
                      "    return None"])
    elif t in (int, float, bool) and value == value:
        namespace[f"_v{name}"] = value
        lines.extend([f"if type({name}) is not {t.__name__} or {name} != _v{name}:",
                      "    return None"])
    elif isinstance(value, torch.Tensor) or (t.__hash__ is object.__hash__ and
                                             t not in (tuple, list, dict)):
        namespace[f"_k{name}"] = value      # a shared tensor, a module: by identity
        lines.extend([f"if {name} is not _k{name}:", "    return None"])
    else:
        return False
    return True


def _is_pair(sig) -> bool:
    """Whether a signature's two outputs come back as a plain pair (a cell's (h, c))."""
    probe = sig.wrap(_Probe())
    return type(probe) is tuple and len(probe) == 2


class _Probe:
    id = 0

