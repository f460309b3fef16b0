"""Test-session setup: the Triton interpreter on CPU-only machines, NaN-poisoned outputs, markers, seeds.

This must run before any ``pyfastpeft.triton_kernels`` module is imported: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is decorated.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYFASTPEFT_POISON_EMPTY", "1")
os.environ.setdefault("PYFASTPEFT_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
# Not PYFASTPEFT_STRICT: op tests pin backend= (forced is never silent); module tests use auto on purpose.

import pytest  # noqa: E402

from pyfastpeft.core import ext as _ext  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "cuda_ext" in item.keywords and not _ext.load():
            item.add_marker(pytest.mark.skip(reason=f"pyfastpeft._C unavailable: {_ext.LOAD_ERROR}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
