"""Fixtures over the backends this process runs (tests/support.py finds them at run time)."""

import pytest

from support import BACKEND_CASES, CPU_BACKENDS


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Each backend that runs on CPU tensors in this process ("reference", "cpu" when built;
    "triton" alone under TRITON_INTERPRET=1)."""
    return request.param


@pytest.fixture(params=BACKEND_CASES)
def backend_device(request):
    """(backend, device) of each backend this process runs, on each device it takes."""
    return request.param
