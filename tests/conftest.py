"""Fixtures over the backends this process runs (tests/support.py finds them at run time), and
the CUDA kernels' forced size class."""

import os

import pytest
from hypothesis import settings

from support import BACKEND_CASES, CPU_BACKENDS

# Property tests draw the same examples on every run (CI must not change its verdict from one run
# to the next); HYPOTHESIS_PROFILE=explore draws fresh ones, to look for new failures.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Each backend that runs on CPU tensors in this process ("reference", "cpu" when built;
    "triton" alone under TRITON_INTERPRET=1)."""
    return request.param


@pytest.fixture(params=BACKEND_CASES)
def backend_device(request):
    """(backend, device) of each backend this process runs, on each device it takes."""
    return request.param


@pytest.fixture
def size_class(monkeypatch):
    """force(name): the CUDA host plans every launch in that size class (DSNT_CUDA_FORCE_CLASS;
    None: the automatic one). Harmless where the CUDA kernels do not run."""

    def force(name):
        if name is None:
            monkeypatch.delenv("DSNT_CUDA_FORCE_CLASS", raising=False)
        else:
            monkeypatch.setenv("DSNT_CUDA_FORCE_CLASS", name)

    return force
