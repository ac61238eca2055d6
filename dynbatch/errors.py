"""Error classes, and where in the user's code a recorded call came from.

Every error raised while tracing or executing names the example (``examples[i]``) and the
user's own ``file:line`` with its source line. A site is captured at record time as
``(code, offset)``, the offset of the calling instruction; the line number and the source
text are worked out only when a message needs them. Imports nothing else of dynbatch.
"""
from __future__ import annotations

import linecache
import os
import sys
import warnings
from dataclasses import dataclass
from types import CodeType

import torch

_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_internal_files: dict[str, bool] = {}
internal_files = _internal_files    # {filename: is_internal} of the files met so far

RawSite = tuple  # (code object, instruction offset), interned: one tuple per call site


def is_internal(filename: str) -> bool:
    """Frames of the engine (dynbatch/ and its subpackages, but not models/ or data/, which
    are user code as far as messages go) and of torch are not the user's."""
    hit = _internal_files.get(filename)
    if hit is None:
        path = os.path.abspath(filename)
        inside = path.startswith(_ENGINE_DIR + os.sep)
        user_parts = (os.path.join(_ENGINE_DIR, "models"), os.path.join(_ENGINE_DIR, "data"))
        hit = (inside and not path.startswith(user_parts)) or \
            path.startswith(_TORCH_DIR + os.sep) or filename.startswith("<frozen") or \
            filename.startswith("<dynbatch") or os.path.basename(path) == "contextlib.py"
        _internal_files[filename] = hit
    return hit


_sites: dict = {}       # (id(code), offset) -> (code, offset); the value keeps code alive


def user_site(skip: int = 1) -> RawSite | None:
    """The first frame outside dynbatch and torch above the caller, as an interned
    ``(code, offset)``; None when there is none."""
    try:
        frame = sys._getframe(skip + 1)
    except ValueError:
        return None
    table = _internal_files
    while frame is not None:
        code = frame.f_code
        hit = table.get(code.co_filename)
        if hit is None:
            hit = is_internal(code.co_filename)
        if not hit:
            key = (id(code), frame.f_lasti)
            site = _sites.get(key)
            if site is None:
                if len(_sites) > 100_000:
                    _sites.clear()
                site = _sites[key] = (code, frame.f_lasti)
            return site
        frame = frame.f_back
    return None


def line_of(code: CodeType, offset: int) -> int:
    """The line of the instruction at byte ``offset`` of ``code``."""
    for start, end, line in code.co_lines():
        if start <= offset < end and line is not None:
            return line
    return code.co_firstlineno


@dataclass(frozen=True, slots=True)
class Site:
    filename: str
    lineno: int
    function: str

    @staticmethod
    def of(raw: RawSite | None) -> Site | None:
        if raw is None:
            return None
        code, offset = raw
        return Site(code.co_filename, line_of(code, offset), code.co_name)

    @property
    def source(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        text = f"{self.filename}:{self.lineno} in {self.function}"
        src = self.source
        return f"{text}\n      {src}" if src else text


def where(example: int | None, raw: RawSite | None) -> str:
    """'examples[3], at file.py:57 in node_forward\\n      h = torch.cat(...)'"""
    who = f"examples[{example}]" if example is not None else "the autobatch scope"
    site = Site.of(raw)
    return f"{who}, at {site}" if site is not None else who


def warn_at(message: str, raw: RawSite | None, category=RuntimeWarning) -> None:
    """A warning attributed to the user's line (``raw``), not to dynbatch's."""
    site = Site.of(raw)
    if site is None:
        warnings.warn(message, category, stacklevel=2)
    else:
        warnings.warn_explicit(message, category, site.filename, site.lineno)


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
    in-place op on a per-example tensor that other recorded calls already read. Rewrite it
    out of place (`y = x + 1` for `x += 1`, `torch.where` for a masked assignment)."""


class BlockError(DynbatchError):
    """A function or module marked as a block could not be traced once and replayed for a
    whole batch (for example it reads a tensor's value). Blocks must be pure functions of
    their arguments; remove the `db.block` mark to record it op by op instead."""


class FallbackError(DynbatchError):
    """Raised instead of running a batch one example at a time while strict mode is on
    (``dynbatch.testing.strict()``): no batching rule and no vmap rule applied."""


class PlanError(DynbatchError):
    """A plan made elsewhere (refs.py) names an argument, module or parameter that the
    arguments it is loaded with lack: load it with the arguments of the call it was made
    for (the same model, as passed to the batched function)."""


class PlanAheadError(UnsupportedError):
    """Per-example code that cannot be planned ahead of execution (db.DataLoader's
    workers): it reads values mid-run (``int(x)``, ``x.item()``), whose answers exist only
    once earlier batches have run, or it stores lazy values into its arguments. Plan it in
    the main process (``num_workers=0``), where it runs as ``@db.batched`` runs it."""
