"""Shared fixtures: float64 everywhere, STRICT mode on request, a seeded RNG.

Every comparison in the core suite is made in float64 with atol 1e-8, so a difference in
the batched computation (not float rounding) is what fails a test.
"""
from __future__ import annotations

import random

import pytest
import torch

from dynbatch.testing import strict as strict_mode

ATOL = 1e-8
RTOL = 1e-6

# The suite's tensors are tiny: intra-op threads never help them, and on a shared, loaded
# machine (2 cores here) their wake-ups made batched calls ~10x slower in wall time
# (measured: the 1..30 LSTM test took 9-12 s with 2 threads, 1 s with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def strict():
    """Running a batch one example at a time raises FallbackError instead."""
    with strict_mode():
        yield


@pytest.fixture
def rng() -> random.Random:
    """A seeded Python RNG; torch's global generator is seeded too, for parameter init."""
    torch.manual_seed(0)
    return random.Random(0)
