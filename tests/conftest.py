"""Test setup: Triton's CPU interpreter when no GPU is present, GPU skips, shared fixtures."""

from motg_fast.testing import configure_environment, save_tiny_model, skip_gpu_tests

configure_environment()  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

FAST_EXCLUDES = ("slow", "subprocess", "interpreter")


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help=f"the fast tier: leave out tests marked {', '.join(FAST_EXCLUDES)}",
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu_tests(items)
    if config.getoption("--fast"):
        kept = [item for item in items if not any(m in item.keywords for m in FAST_EXCLUDES)]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny Qwen2 and the tiny tokenizer saved as a local model directory (its path)."""
    return str(save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on a shared 2-core runner OpenMP spin-waits make 2 threads slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator():
    """A CPU generator seeded the same way in every test."""
    return torch.Generator().manual_seed(1234)
