"""Benchmark setup: the same environment as the tests (`motg_fast.testing`)."""

from motg_fast.testing import configure_environment, skip_gpu_tests

configure_environment()  # before any Triton kernel is defined


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)
