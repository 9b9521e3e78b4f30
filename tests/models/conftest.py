"""Model tests run tiny GEMMs: one intra-op thread avoids OpenMP barrier stalls on 2 shared cores."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
