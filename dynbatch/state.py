"""The state that changes what a torch call computes, beyond its arguments: grad mode
(or inference mode), autocast, and the default dtype. It is part of every signature key,
so a node runs under the state it was recorded in, whatever the state at execution.
"""
from __future__ import annotations

import contextlib

import torch

_grad = torch.is_grad_enabled
_inference = torch.is_inference_mode_enabled
_any_autocast = torch._C._is_any_autocast_enabled
_default_dtype = torch.get_default_dtype
_F32 = torch.float32
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def state_now():
    """The state that changes what a torch call computes: 1 (grad), 0 (no grad) or 2
    (inference mode), as an int in the common case; a tuple ``(mode, default dtype,
    autocast)`` when the default dtype is not float32 or autocast is on, autocast as
    ((device type, dtype), ...) for each device type it is on for."""
    mode = 1 if _grad() else 2 if _inference() else 0
    if _any_autocast():
        cast = tuple((d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES
                     if torch._C._is_autocast_available(d) and torch.is_autocast_enabled(d))
        return (mode, _default_dtype(), cast)
    dtype = _default_dtype()
    return mode if dtype is _F32 else (mode, dtype, ())


def grad_mode_of(state) -> int:
    return state if type(state) is int else state[0]


@contextlib.contextmanager
def entered(state):
    """Run under ``state`` (as recorded), whatever the caller's state is."""
    if state == state_now():
        yield
        return
    mode, dtype, cast = (state, _F32, ()) if type(state) is int else state
    with contextlib.ExitStack() as stack:
        if mode == 2:
            stack.enter_context(torch.inference_mode(True))
        else:
            if _inference():
                stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.set_grad_enabled(bool(mode)))
        for device in _AUTOCAST_DEVICES:
            if torch._C._is_autocast_available(device) and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        for device, cast_dtype in cast:
            stack.enter_context(torch.autocast(device, dtype=cast_dtype))
        old = _default_dtype()
        if dtype is not old:
            torch.set_default_dtype(dtype)
            stack.callback(torch.set_default_dtype, old)
        yield




def snapshot() -> tuple:
    """This thread's grad mode, default dtype and autocast settings, to restore with
    ``restore`` (examples suspended at a read resume in their own)."""
    cast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                 for d in _AUTOCAST_DEVICES if torch._C._is_autocast_available(d))
    return (_grad(), _default_dtype(), cast)


def restore(saved: tuple) -> None:
    grad, dtype, cast = saved
    with torch._C.DisableTorchFunction():
        if _grad() != grad:
            torch._C._set_grad_enabled(grad)
        if _default_dtype() is not dtype:
            torch.set_default_dtype(dtype)
        for device, enabled, cast_dtype in cast:
            if torch.is_autocast_enabled(device) != enabled:
                torch.set_autocast_enabled(device, enabled)
            if torch.get_autocast_dtype(device) != cast_dtype:
                torch.set_autocast_dtype(device, cast_dtype)
