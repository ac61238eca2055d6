"""Error classes, and where in the user's code a recorded op came from.

Every error raised while tracing or executing names the example (``examples[i]``) and the
user's own ``file:line`` with its source line. Sites are captured cheaply at record time as
``(code, offset)``, the offset of the calling instruction: the line number is worked out from
it, and the source text read with ``linecache``, only when an error is raised.
Must not import the rest of dynbatch.
"""
from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass
from types import CodeType

import torch

_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_is_internal_file: dict[str, bool] = {}


def _internal(filename: str) -> bool:
    """Frames in dynbatch's engine files or in torch are not the user's. dynbatch's own
    models/ and data/ packages are user code as far as error messages go."""
    hit = _is_internal_file.get(filename)
    if hit is None:
        path = os.path.abspath(filename)
        hit = os.path.dirname(path) == _ENGINE_DIR or path.startswith(_TORCH_DIR + os.sep)
        hit = hit or filename.startswith("<frozen") or os.path.basename(path) == "contextlib.py"
        _is_internal_file[filename] = hit
    return hit


RawSite = tuple  # (code object, instruction offset): what a node keeps; cheap to capture


def line_of(code: CodeType, offset: int) -> int:
    """The line of the instruction at byte ``offset`` of ``code``. A frame's ``f_lineno`` is
    this same search, done per read: about 100 ns per recorded op, so it is deferred here."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


def raw_site(skip: int = 2) -> RawSite | None:
    """The first frame outside dynbatch and torch, as (code, offset). Called per recorded op."""
    try:
        frame = sys._getframe(skip)
    except ValueError:        # fewer frames than that: no user frame to name
        return None
    table = _is_internal_file
    while frame is not None:
        code = frame.f_code
        hit = table.get(code.co_filename)
        if hit is None:
            hit = _internal(code.co_filename)
        if not hit:
            return (code, frame.f_lasti)
        frame = frame.f_back
    return None


@dataclass(frozen=True, slots=True)
class Site:
    filename: str
    lineno: int
    function: str

    @staticmethod
    def of(raw: RawSite | None) -> "Site | None":
        if raw is None:
            return None
        code, offset = raw
        assert isinstance(code, CodeType)
        return Site(code.co_filename, line_of(code, offset), code.co_name)

    @property
    def source(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        text = f"{self.filename}:{self.lineno} in {self.function}"
        src = self.source
        return f"{text}\n      {src}" if src else text


def where(example: int | None, raw: RawSite | None) -> str:
    """'examples[3], at file.py:57 in node_forward\n      h = torch.cat(...)'"""
    who = f"examples[{example}]" if example is not None else "the autobatch scope"
    site = Site.of(raw)
    return f"{who}, at {site}" if site is not None else who


class DynbatchError(RuntimeError):
    """Base class of dynbatch's own errors. A subclass of RuntimeError, so code that catches
    torch's shape errors still catches them when they surface through dynbatch."""


class TraceError(DynbatchError):
    """A torch call inside the per-example code failed while it was being recorded, usually a
    shape or dtype mismatch that plain PyTorch would also reject. The message names the
    example and the line; fix the model code there (run it eagerly on that example to see)."""


class ExecuteError(DynbatchError):
    """A batched call failed. dynbatch reran the batch one example at a time and names the
    first example whose op fails on its own; if none fails alone, the batching rule is at
    fault and the message says so (please report it)."""


class MixedRunError(DynbatchError):
    """A lazy tensor from one dynbatch run was used inside another. Lazy tensors belong to the
    run (the @batched call or autobatch scope) that made them; pass `.value` instead."""


class UnsupportedError(DynbatchError):
    """The per-example code did something dynbatch cannot record faithfully, such as an
    in-place op or an item assignment on a per-example tensor. Rewrite it out of place
    (`y = x + 1` for `x += 1`, `torch.cat`/`torch.where` for item assignment)."""


class BlockError(DynbatchError):
    """A function or module marked as a block could not be traced once and replayed for a
    whole batch (for example it reads a tensor's value). Blocks must be pure functions of
    their arguments; remove the `db.block` mark to record it op by op instead."""
