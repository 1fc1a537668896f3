import os

# Triton kernels run on CPU tensors only through the interpreter, and the flag is read when
# the kernels are decorated: set it before anything imports fastexit.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")
    parser.addoption("--aot-matrix", action="store_true",
                     help="also compile every other option subset on every other arch (tests/test_aot_compile.py)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: skipped unless pytest runs with --runslow")
    config.addinivalue_line("markers", "aot_matrix: skipped unless pytest runs with --aot-matrix")


def pytest_collection_modifyitems(config, items):
    skips = {marker: pytest.mark.skip(reason=f"{marker}: run with --{option}")
             for marker, option in (("slow", "runslow"), ("aot_matrix", "aot-matrix"))
             if not config.getoption(option.replace("-", "_"), default=False)}
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
