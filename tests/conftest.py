"""Shared test settings.

Tests build tiny models whose tensors are far too small to gain from intra-op threads; on a loaded 2-core
machine two threads make them 5-20x slower (oversubscription), so the suite runs torch single-threaded.
"""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
