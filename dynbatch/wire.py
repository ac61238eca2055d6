"""A plan as it travels between processes: a few arrays, not a graph of Python objects.

``pack`` turns a Plan (plan.py) into a ``Packed``: its steps, gathers and result places as
one int64 array of codes, every index and integer constant as slices of one int64
tensor (one shared-memory transfer from a DataLoader worker; one host-to-device copy on a
GPU), other constants stacked into a tensor each, and its signatures numbered, each named
by a key the caller chooses (loader.py: the signature's source pickled by reference).
``unpack`` makes the Plan again around signatures the receiving process has; the
gathers' index tensors are views into the one tensor.

Codes, per step: signature number, node count, joint, frees (count, entries), gathers (count;
each: its inputs (count, numbers) and its spec), extras (count; each a spec). A spec is a
kind and its fields (the ``_SLICE`` ... constants below); a Joined spec nests its parts.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field

import torch

from .plan import Index, Joined, Plan, Slice, Stacked, Step, Values

_SLICE, _INDEX, _INTS, _TENSOR, _JOINED, _INT = range(6)
_ROW, _VALUE = 0, 1


@dataclass
class Packed:
    """A plan in transit. ``signatures``: the key of each signature the steps number;
    ``code`` and ``ints``: int64 tensors; ``tensors``: constants that are not int64 on
    the CPU, ``devices``: where each goes when the plan runs (None: where it is; NOTE
    [host constants] in plan.py); ``specs``: the results' pytree structures, pickled (the same bytes for the
    same structures: unpickled once per process); ``objects``: the plain values among the
    results; ``meta``: whatever the sender adds (loader.py: what the plan was made
    for, and the planning times)."""
    signatures: list
    code: torch.Tensor
    ints: torch.Tensor
    tensors: list
    specs: bytes
    objects: list
    nodes: int
    devices: list = field(default_factory=list)
    device: torch.device | None = None
    meta: dict = field(default_factory=dict)

    def pin_memory(self) -> Packed:
        """(DataLoader(pin_memory=True)): the index tensor, page-locked."""
        self.ints = self.ints.pin_memory()
        self.tensors = [t.pin_memory() for t in self.tensors]
        return self


class _Writer:
    def __init__(self, key_of):
        self.key_of = key_of
        self.numbers: dict = {}       # id(signature) -> its number
        self.keys: list = []
        self.code: list = []
        self.ints: list = []          # int64 tensors, concatenated at the end
        self.offset = 0
        self.tensors: list = []
        self.devices: list = []       # where each of ``tensors`` goes (None: as it is)
        self.device = None            # where host constants of the int64 tensor go
        self.objects: list = []

    def signature(self, sig) -> int:
        n = self.numbers.get(id(sig))
        if n is None:
            n = self.numbers[id(sig)] = len(self.keys)
            self.keys.append(self.key_of(sig))
        return n

    def int_slice(self, t: torch.Tensor, host: bool = False) -> None:
        """``t`` as a slice of the one int64 tensor; ``host``: read from its host copy
        (a CPU constant), else from its copy on the device the plan runs on."""
        self.ints.append(t)
        self.code += (self.offset, t.numel(), 0 if host else 1)
        self.offset += t.numel()

    def spec(self, spec) -> None:
        kind, code = type(spec), self.code
        if kind is Slice:
            code += (_SLICE, spec.entry, spec.output, spec.start, spec.stop, spec.detach)
        elif kind is Index:
            code += (_INDEX, spec.entry, spec.output)
            self.int_slice(spec.rows)
            code.append(spec.detach)
        elif kind is Values or kind is Stacked:
            value = spec.tensor if kind is Values else _stacked(spec.tensors)
            device = spec.device if kind is Values else None
            if device is not None and self.device in (None, device):
                self.device = device        # NOTE [host constants]: the one device
            if _is_cpu_int64(value) and value.dim() == 1 and device in (None, self.device):
                code.append(_INTS)
                self.int_slice(value, host=device is None)
            else:
                code += (_TENSOR, len(self.tensors))
                self.tensors.append(value)
                self.devices.append(device)
        elif kind is Joined:
            code += (_JOINED, len(spec.parts))
            if spec.order is None:
                code += (-1, 0, 1)
            else:
                self.int_slice(spec.order)
            for part in spec.parts:
                self.spec(part)
        else:
            raise TypeError(f"a gather spec of unknown kind {kind.__name__}")

    def extra(self, value) -> None:
        if type(value) is int:
            self.code += (_INT, value)
        elif isinstance(value, torch.Tensor) and _is_cpu_int64(value) and value.dim() == 1:
            self.code.append(_INTS)
            self.int_slice(value)
        else:
            self.code += (_TENSOR, len(self.tensors))
            self.tensors.append(value)
            self.devices.append(None)


def _is_cpu_int64(t: torch.Tensor) -> bool:
    return t.dtype is torch.int64 and t.device.type == "cpu" and not t.requires_grad


def _stacked(tensors) -> torch.Tensor:
    return torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)


def pack(plan: Plan, key_of, nodes: int = 0) -> Packed:
    """``plan`` (made ahead: ``plan.results`` set, ``plan.first`` 0) as arrays; each
    signature named by ``key_of(signature)``."""
    if plan.results is None or plan.first != 0:
        raise ValueError("only a plan made ahead (ahead.plan_ahead) can be packed")
    w = _Writer(key_of)
    code = w.code
    code.append(len(plan.steps))
    with torch._C.DisableTorchFunction():
        for step in plan.steps:
            code += (w.signature(step.sig), len(step.nodes), step.joint, len(step.frees),
                     *step.frees, len(step.gathers))
            for spec, inputs in step.gathers:
                code += (len(inputs), *inputs)
                w.spec(spec)
            code.append(len(step.extra))
            for value in step.extra:
                w.extra(value)
        specs: list = []
        code.append(len(plan.results))
        for spec, places in plan.results:
            if spec not in specs:
                specs.append(spec)
            code += (specs.index(spec), len(places))
            for place in places:
                if place[0] == "row":
                    code += (_ROW, place[1], place[2], place[3], place[4])
                else:
                    code += (_VALUE, len(w.objects))
                    w.objects.append(place[1])
        ints = torch.cat(w.ints) if w.ints else torch.empty(0, dtype=torch.int64)
    return Packed(w.keys, torch.tensor(code, dtype=torch.int64), ints, w.tensors,
                  pickle.dumps(specs, protocol=pickle.HIGHEST_PROTOCOL), w.objects, nodes,
                  w.devices, w.device)


_specs: dict = {}       # pickled result structures -> the structures


def _specs_of(data: bytes) -> list:
    specs = _specs.get(data)
    if specs is None:
        if len(_specs) > 256:
            _specs.clear()
        with warnings.catch_warnings():     # (pytree's own specs unpickle with a warning)
            warnings.simplefilter("ignore", FutureWarning)
            specs = _specs[data] = pickle.loads(data)
    return specs


class _Reader:
    def __init__(self, packed: Packed, host: torch.Tensor, ints: torch.Tensor):
        self.code = packed.code.tolist()
        self.at = 0
        self.host, self.ints = host, ints
        self.tensors = [t if d is None else t.to(d, non_blocking=True)
                        for t, d in zip(packed.tensors, packed.devices)]

    def next(self) -> int:
        self.at += 1
        return self.code[self.at - 1]

    def take(self, n: int) -> tuple:
        at = self.at
        self.at = at + n
        return tuple(self.code[at:at + n])

    def int_slice(self) -> torch.Tensor:
        start, n, where = self.take(3)
        return (self.ints if where else self.host)[start:start + n]

    def spec(self):
        kind = self.next()
        if kind == _SLICE:
            entry, output, start, stop, detach = self.take(5)
            return Slice(entry, output, start, stop, bool(detach))
        if kind == _INDEX:
            entry, output = self.take(2)
            rows = self.int_slice()
            return Index(entry, output, rows, bool(self.next()))
        if kind == _INTS:
            return Values(self.int_slice())
        if kind == _TENSOR:
            return Values(self.tensors[self.next()])
        if kind == _JOINED:
            n = self.next()
            order = None if self.code[self.at] < 0 else self.int_slice()
            if order is None:
                self.at += 3
            return Joined(tuple(self.spec() for _ in range(n)), order)
        raise ValueError(f"a packed plan with a gather of unknown kind {kind}")

    def extra(self):
        kind = self.next()
        if kind == _INT:
            return self.next()
        if kind == _INTS:
            return self.int_slice()
        return self.tensors[self.next()]


def unpack(packed: Packed, signatures: list, device=None) -> Plan:
    """The Plan again, its signature number k being ``signatures[k]``; the int64 tensor
    moved to ``device`` (else to the device its host constants go to) first, when there
    is one: one copy for the whole plan."""
    host = ints = packed.ints
    device = device if device is not None else packed.device
    if device is not None and ints.device != device:
        ints = ints.to(device, non_blocking=True)
    r = _Reader(packed, host, ints)
    plan = Plan()
    steps = plan.steps
    for _ in range(r.next()):
        sig, n, joint, n_frees = r.take(4)
        step = Step(signatures[sig], range(n), [], (), r.take(n_frees), joint)
        for _ in range(r.next()):
            inputs = r.take(r.next())
            step.gathers.append((r.spec(), inputs))
        step.extra = tuple(r.extra() for _ in range(r.next()))
        steps.append(step)
    results = []
    specs = _specs_of(packed.specs)
    for _ in range(r.next()):
        spec, n = r.take(2)
        places = []
        for _ in range(n):
            if r.next() == _ROW:
                entry, output, row, grad = r.take(4)
                places.append(("row", entry, output, row, bool(grad)))
            else:
                places.append(("value", packed.objects[r.next()]))
        results.append((specs[spec], places))
    plan.results = results
    return plan
