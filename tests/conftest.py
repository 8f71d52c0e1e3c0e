"""Test setup: Triton's CPU interpreter when no GPU is present, GPU skips, a seeded generator."""

from testing_env import configure_environment, skip_gpu_tests

configure_environment()  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)


@pytest.fixture
def generator():
    """A CPU generator seeded the same way in every test."""
    return torch.Generator().manual_seed(1234)
