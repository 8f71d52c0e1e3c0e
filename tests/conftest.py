"""Test setup: Triton's CPU interpreter when no GPU is present, seeded generators, markers."""

import os

import torch

# Must happen before any Triton kernel is defined (i.e. before motg_fast.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MOTG_BACKEND", None)  # tests choose their backend explicitly

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator():
    """A CPU generator seeded the same way in every test."""
    return torch.Generator().manual_seed(1234)
