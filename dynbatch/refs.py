"""Plans across processes: a Plan pickled with its shared objects named by reference, and
unpickled against the live arguments of another process.

A plan's signatures hold callables, modules and shared tensors (parameters): pickled as
they are, they would be copies, stale after the next optimizer step. So a shared tensor or
module reachable from the batched call's arguments is pickled as its path from them
(``("arg", 1, "node_gates.weight")``: argument 1's named parameter), and every signature
as its source (the call's function and template), from which the process that unpickles
it makes the signature again (signature.rebuilt_op, blocks.block_signature). Functions
pickle by qualified name; per-example constants and index tensors by value.
"""
from __future__ import annotations

import importlib
import io
import pickle
import warnings

import torch
from torch import nn

from . import blocks, signature
from .errors import PlanError
from .template import metas_of


def _named(args) -> dict:
    """{id(obj): path} of the modules, parameters and buffers reachable from ``args``, and
    of tensors among them."""
    paths: dict = {}
    for i, arg in enumerate(args):
        if isinstance(arg, nn.Module):
            for name, module in arg.named_modules(remove_duplicate=False):
                paths.setdefault(id(module), ("arg", i, "module", name))
            for name, p in arg.named_parameters(remove_duplicate=False):
                paths.setdefault(id(p), ("arg", i, "param", name))
            for name, b in arg.named_buffers(remove_duplicate=False):
                paths.setdefault(id(b), ("arg", i, "buffer", name))
        elif isinstance(arg, torch.Tensor):
            paths.setdefault(id(arg), ("arg", i, "tensor", ""))
    return paths


def _resolve(path, args):
    _, i, kind, name = path
    try:
        arg = args[i]
        if kind == "module":
            return arg.get_submodule(name) if name else arg
        if kind == "param":
            return arg.get_parameter(name)
        if kind == "buffer":
            return arg.get_buffer(name)
        return arg
    except (IndexError, AttributeError) as err:
        raise PlanError(f"the plan reads argument {i}{f' {kind} {name!r}' if name else ''}, "
                        f"which the arguments it is loaded with do not have ({err}); load "
                        "it with the arguments of the call it was made for") from None


def binding(args) -> tuple[tuple, tuple, tuple]:
    """What a plan made for ``args`` depends on, in one walk: their structure (every
    module's path and class, every parameter's and buffer's path, shape, dtype and
    device: a plan names them by path), the identity of each of those objects, and each
    module's plain state (``training`` and its other bool, int, float, str and None
    attributes: what per-example code may branch on)."""
    structure: list = []
    ids: list = []
    modules: list = []
    for i, arg in enumerate(args):
        if isinstance(arg, nn.Module):
            for name, m in arg.named_modules(remove_duplicate=False):
                structure.append((i, name, type(m).__qualname__))
                ids.append(id(m))
                modules.append(tuple((k, v) for k, v in m.__dict__.items()
                                     if type(v) in _PLAIN))
                for table in (m._parameters, m._buffers):
                    for k, t in table.items():
                        structure.append((i, name, k) if t is None else
                                         (i, name, k, t.shape, t.dtype, t.device))
                        ids.append(id(t))
        elif isinstance(arg, torch.Tensor):
            structure.append((i, arg.shape, arg.dtype, arg.device))
            ids.append(id(arg))
        else:
            structure.append((i, type(arg).__qualname__))
            ids.append(id(arg))
    return tuple(structure), tuple(ids), tuple(modules)


_PLAIN = (bool, int, float, str, type(None))


def set_module_state(args, modules: tuple) -> None:
    """Give the modules reachable from ``args`` the plain state ``binding`` read (in a
    DataLoader worker: the main process's, as it was when the minibatch was asked for)."""
    states = iter(modules)
    for arg in args:
        if isinstance(arg, nn.Module):
            for _, m in arg.named_modules(remove_duplicate=False):
                m.__dict__.update(next(states))


class SignatureKeys:
    """``keys(signature)``: the signature's source pickled by reference against ``args``
    (bytes, the same for the same source), for a plan made in one process and run in
    another (``Signatures`` there)."""

    def __init__(self, args):
        self.paths = _named(args)
        self.cache: dict = {}       # id(signature) -> (signature, key)

    def __call__(self, sig) -> bytes:
        hit = self.cache.get(id(sig))
        if hit is None or hit[0] is not sig:
            buf = io.BytesIO()
            _Pickler(buf, self.paths).dump(sig)
            hit = self.cache[id(sig)] = (sig, buf.getvalue())
        return hit[1]


class Signatures:
    """The signatures of keys made by ``SignatureKeys``, made again here against ``args``
    (each once: a block's body traced, outputs inferred), inside ``recording()``."""

    def __init__(self, args, recording):
        self.args, self.recording = args, recording
        self.cache: dict = {}       # key -> signature

    def __call__(self, key: bytes):
        sig = self.cache.get(key)
        if sig is None:
            sig = self.cache[key] = loads(key, self.args, self.recording)
        return sig


class _Pickler(pickle.Pickler):
    def __init__(self, file, paths: dict):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.paths = paths
        self.signatures: dict = {}      # id(signature) -> its number in this pickle

    def persistent_id(self, obj):
        path = self.paths.get(id(obj))
        if path is not None:
            return ("ref", path)
        if isinstance(obj, signature.Signature):
            n = self.signatures.get(id(obj))
            if n is not None:
                return ("sig", n)
            n = self.signatures[id(obj)] = len(self.signatures)
            if obj.source is None:
                raise pickle.PicklingError(f"the signature of {obj.name} cannot be made again "
                                           "in another process")
            return ("sig", n, obj.source, obj.state)
        if isinstance(obj, blocks.BlockFunction):   # the function the user marked
            return ("block",) + obj.key
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, args, recording):
        super().__init__(file)
        self.args = args
        self.recording = recording
        self.signatures: dict = {}

    def persistent_load(self, pid):
        kind = pid[0]
        if kind == "ref":
            return _resolve(pid[1], self.args)
        if kind == "block":
            return _marked_block(pid[1:])
        if len(pid) == 2:
            return self.signatures[pid[1]]
        with self.recording():
            sig = self.signatures[pid[1]] = _rebuilt(pid[2], pid[3])
        return sig


def _marked_block(key: tuple):
    """The block marked as ``key`` (blocks.BlockFunction) names it: its module imported
    here marks it again. A function marked once and reachable by its name (marked after
    import) is found by name."""
    module_name, qualname, k = key
    obj = importlib.import_module(module_name)
    found = blocks.marked(key)
    if found is not None:
        return found
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    found = getattr(obj, "__dynbatch_block__", None)
    if k != 0 or found is None:
        raise PlanError(f"the plan names the block {qualname} of {module_name} (mark {k}), "
                        "which this process has not marked; mark blocks at import time")
    return found


def _rebuilt(source, state):
    kind = source[0]
    if kind == "stacked-sum":
        return signature.stacked_sum_signature(state, source[1], source[2])
    if kind == "op":
        return signature.rebuilt_op(source[1], source[2], source[3], state)
    if kind == "block":
        metas = metas_of(source[2], source[3])
        return blocks.block_signature(source[1], source[2], source[3], metas, state, None,
                                      None)
    raise ValueError(f"a plan's signature of unknown kind {kind!r}")


def dumps(obj, args) -> bytes:
    """``obj`` (a plan, or anything holding plans) pickled, with the shared objects reachable
    from ``args`` named by path."""
    buf = io.BytesIO()
    _Pickler(buf, _named(args)).dump(obj)
    return buf.getvalue()


def loads(data: bytes, args, recording):
    """What ``dumps`` pickled, its references resolved against ``args`` of this process and
    its signatures made again here, each inside ``recording()`` (a context in which a
    block's body is traced as a run traces it)."""
    with warnings.catch_warnings():     # (pytree's own specs unpickle with a warning)
        warnings.simplefilter("ignore", FutureWarning)
        return _Unpickler(io.BytesIO(data), args, recording).load()
