import os

# Triton kernels run on CPU tensors only through the interpreter, and the flag is read when
# the kernels are decorated: set it before anything imports fastexit.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: skipped unless pytest runs with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
