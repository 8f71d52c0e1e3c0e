"""Shared test and benchmark setup: Triton's CPU interpreter without a GPU, GPU skips.

Imported by `tests/conftest.py` and `bench/conftest.py` before anything defines a Triton
kernel (the interpreter must be chosen before `motg_fast.kernels` is imported).
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def configure_environment() -> None:
    """Triton's interpreter when there is no GPU; tests choose their backend explicitly."""
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.pop("MOTG_BACKEND", None)


def skip_gpu_tests(items) -> None:
    """Skip every test marked `gpu` when no CUDA device is present."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
